//! Device names (`auto | cpu | flex | tch-cpu | tch-cuda:N | cuda:N`) to burn devices.
//!
//! Which backends exist depends on the cargo features sepo was built with: `flex` (the default,
//! pure Rust CPU) and `tch` (libtorch, CPU and CUDA). Asking for a device whose backend is not
//! built in is an error that says which feature to build with, never a panic.

// burn 0.22 marks its LibTorch constructors deprecated (burn-tch is on its way out); sepo still
// offers them for CUDA.
#![allow(deprecated)]

use anyhow::{Result, bail};
use burn::tensor::Device;

/// Parses a device name as written in a pipeline YAML or on the command line.
///
/// - `cpu`: the fastest CPU backend built in (`tch-cpu` with the `tch` feature, else `flex`);
/// - `auto`: `cuda:0` when sepo has the `tch` feature and libtorch sees a CUDA device, else `cpu`;
/// - `cuda:N`: same as `tch-cuda:N`; `cuda` alone means `cuda:0`.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        "auto" => Ok(auto_device()),
        "cpu" => cpu_device(),
        "flex" => flex_device(name),
        "tch-cpu" | "tch" | "libtorch" => tch_cpu_device(name),
        _ => {
            let index = if let Some(rest) = lower.strip_prefix("tch-cuda") {
                parse_index(name, rest)?
            } else if let Some(rest) = lower.strip_prefix("cuda") {
                parse_index(name, rest)?
            } else {
                bail!(
                    "unknown device `{}`: expected one of auto, cpu, flex, tch-cpu, tch-cuda:N, cuda:N",
                    crate::error::clip(name)
                )
            };
            tch_cuda_device(name, index)
        }
    }
}

/// `f` over `items`, results in order: on flex by two workers side by side (`rayon::join`; each
/// item's own operations still spread over idle threads), each taking the next item not yet
/// taken, in order, until none is left; elsewhere one after another. For independent pieces of
/// model work made of many small operations (generation, a token at a time; batches of
/// log-probs; a judge's scores), which burn-flex splits over rayon's threads with little gain:
/// two side by side keep two cores busy (the main job's `evaluate` stage went from 7.6-8.0 s to
/// 4.7-5.0 s, the long-sequence `score` benchmark from 31.3 s to 26.1 s). Two, not one per
/// core, so that at most two models or batches are in memory at once; libtorch keeps its own
/// threads busy, and a GPU its memory for one. Taking items as workers come free, rather than in
/// fixed pairs, keeps both busy when items differ in cost (put the costliest first): a pair
/// waited for its slower item, and an odd last item ran alone. After an error, no new item is
/// started, and the first error in item order is returned.
pub fn side_by_side<T: Sync, R: Send>(
    device: &Device,
    items: &[T],
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let two = is_flex(device) && !device.is_autodiff() && rayon::current_num_threads() > 1;
    if !two || items.len() < 2 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let worker = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else {
                return done;
            };
            let r = f(item);
            if r.is_err() {
                next.store(items.len(), Ordering::Relaxed);
            }
            done.push((i, r));
        }
    };
    let (a, b) = rayon::join(worker, worker);
    let mut all: Vec<(usize, Result<R>)> = a.into_iter().chain(b).collect();
    all.sort_by_key(|&(i, _)| i);
    all.into_iter().map(|(_, r)| r).collect()
}

/// Whether `device` is flex, with or without autodiff. A match, not [`device_name`]'s
/// formatting: the model's operations ask it on every call.
pub fn is_flex(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        use burn::backend::DispatchDevice;
        matches!(
            device.as_dispatch().clone().inner(),
            DispatchDevice::Flex(_)
        )
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// A short, stable name for a device, in the syntax [`parse_device`] accepts (`flex`, `tch-cpu`,
/// `tch-cuda:0`), with ` (autodiff)` appended when the device records gradients.
pub fn device_name(device: &Device) -> String {
    let dbg = format!("{:?}", device.clone().without_autodiff());
    let base = if dbg.contains("Flex") {
        "flex".to_string()
    } else if dbg.contains("LibTorch") {
        if dbg.contains("Cpu") {
            "tch-cpu".to_string()
        } else if let Some(i) = dbg.find("Cuda(") {
            let digits: String = dbg[i + 5..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            format!("tch-cuda:{digits}")
        } else {
            dbg.trim_start_matches("Device<")
                .trim_end_matches('>')
                .to_lowercase()
        }
    } else {
        dbg.trim_start_matches("Device<")
            .trim_end_matches('>')
            .to_string()
    };
    if device.is_autodiff() {
        format!("{base} (autodiff)")
    } else {
        base
    }
}

fn parse_index(name: &str, rest: &str) -> Result<usize> {
    if rest.is_empty() {
        return Ok(0);
    }
    let name = crate::error::clip(name);
    let Some(digits) = rest.strip_prefix(':') else {
        bail!("bad device `{name}`: expected `cuda:N` or `tch-cuda:N` with N a GPU index")
    };
    digits.parse::<usize>().map_err(|_| {
        anyhow::anyhow!(
            "bad device `{name}`: `{}` is not a GPU index",
            crate::error::clip(digits)
        )
    })
}

fn auto_device() -> Device {
    #[cfg(feature = "tch")]
    {
        if tch_cuda_count() > 0 {
            return Device::libtorch_cuda(0);
        }
    }
    // With no CPU backend built in at all, burn picks whatever exists.
    cpu_device().unwrap_or_default()
}

fn cpu_device() -> Result<Device> {
    #[cfg(feature = "tch")]
    {
        return Ok(Device::libtorch());
    }
    #[cfg(all(not(feature = "tch"), feature = "flex"))]
    {
        return Ok(Device::flex());
    }
    #[allow(unreachable_code)]
    {
        bail!("device `cpu` needs sepo built with `--features flex` or `--features tch`")
    }
}

fn flex_device(name: &str) -> Result<Device> {
    #[cfg(feature = "flex")]
    {
        let _ = name;
        return Ok(Device::flex());
    }
    #[allow(unreachable_code)]
    {
        bail!("device `{name}` needs sepo built with `--features flex`")
    }
}

fn tch_cpu_device(name: &str) -> Result<Device> {
    #[cfg(feature = "tch")]
    {
        let _ = name;
        return Ok(Device::libtorch());
    }
    #[allow(unreachable_code)]
    {
        bail!("device `{name}` needs sepo built with `--features tch`")
    }
}

fn tch_cuda_device(name: &str, index: usize) -> Result<Device> {
    #[cfg(feature = "tch")]
    {
        let count = tch_cuda_count();
        if index >= count {
            bail!(
                "device `{name}`: libtorch sees {count} CUDA device(s){}",
                if count == 0 {
                    " (is this a CUDA build of libtorch, and is a GPU visible?)"
                } else {
                    ""
                }
            );
        }
        return Ok(Device::libtorch_cuda(index));
    }
    #[allow(unreachable_code)]
    {
        let _ = index;
        bail!("device `{name}` needs sepo built with `--features tch`")
    }
}

#[cfg(feature = "tch")]
fn tch_cuda_count() -> usize {
    use burn::tensor::DeviceType;
    std::panic::catch_unwind(|| Device::enumerate(DeviceType::LibTorch).into_vec().len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Results come back in item order whichever worker ran what (items of very different
    /// cost, in a pool of two threads), and an error is the first failing item's, in order.
    #[test]
    fn side_by_side_keeps_order_and_reports_the_first_error() {
        let Ok(flex) = parse_device("flex") else {
            return;
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let items: Vec<u64> = vec![30, 1, 1, 20, 1, 5, 1, 1, 1];
        let spin = |ms: &u64| {
            std::thread::sleep(std::time::Duration::from_millis(*ms));
            Ok(*ms * 10)
        };
        let out = pool.install(|| side_by_side(&flex, &items, spin)).unwrap();
        assert_eq!(out, items.iter().map(|m| m * 10).collect::<Vec<_>>());
        let failing = |ms: &u64| -> Result<u64> {
            std::thread::sleep(std::time::Duration::from_millis(*ms));
            if *ms == 20 || *ms == 5 {
                anyhow::bail!("item {ms} failed");
            }
            Ok(*ms)
        };
        let err = pool
            .install(|| side_by_side(&flex, &items, failing))
            .unwrap_err();
        assert_eq!(err.to_string(), "item 20 failed");
    }

    #[test]
    fn parses_builtin_names() {
        #[cfg(feature = "flex")]
        {
            assert_eq!(device_name(&parse_device("flex").unwrap()), "flex");
            assert_eq!(
                device_name(&parse_device("flex").unwrap().autodiff()),
                "flex (autodiff)"
            );
        }
        #[cfg(feature = "flex")]
        {
            let flex = parse_device("flex").unwrap();
            assert!(is_flex(&flex) && is_flex(&flex.autodiff()));
        }
        let cpu = parse_device("cpu").unwrap();
        #[cfg(not(feature = "tch"))]
        assert_eq!(device_name(&cpu), "flex");
        #[cfg(feature = "tch")]
        {
            assert_eq!(device_name(&cpu), "tch-cpu");
            assert!(!is_flex(&cpu) && !is_flex(&cpu.clone().autodiff()));
        }
        assert!(parse_device("auto").is_ok());
    }

    #[test]
    fn rejects_bad_names() {
        let err = parse_device("gpu").unwrap_err().to_string();
        assert!(err.contains("unknown device `gpu`"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("not a GPU index"), "{err}");
    }

    #[cfg(not(feature = "tch"))]
    #[test]
    fn missing_backend_is_a_clear_error() {
        for name in ["tch-cuda:0", "cuda:1", "tch-cpu"] {
            let err = parse_device(name).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("device `{name}` needs sepo built with `--features tch`")
            );
        }
    }
}
