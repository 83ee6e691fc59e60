//! Held-out preference metrics of a model against the reference, as TRL logs them during DPO
//! evaluation (`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`),
//! SimPO's reference-free view (length-normalized log-probs), and the same restricted to the key
//! tokens of a `select` stage.

use super::report::row;
use super::stats::mean_se;
use crate::artifacts::ReportRow;

/// One test pair's per-token log-probs under the evaluated model and the reference, and its
/// key-token masks when the data came from a `select` stage.
pub struct PairLogps<'a> {
    pub chosen: &'a [f32],
    pub rejected: &'a [f32],
    pub ref_chosen: &'a [f32],
    pub ref_rejected: &'a [f32],
    pub chosen_mask: Option<&'a [bool]>,
    pub rejected_mask: Option<&'a [bool]>,
}

/// The key-token masks of a pair when `masked`, else none (every token counts).
fn masks<'a>(p: &PairLogps<'a>, masked: bool) -> (Option<&'a [bool]>, Option<&'a [bool]>) {
    if masked {
        (p.chosen_mask, p.rejected_mask)
    } else {
        (None, None)
    }
}

fn sum(v: &[f32], mask: Option<&[bool]>) -> f64 {
    match mask {
        Some(m) => v
            .iter()
            .zip(m)
            .filter(|(_, k)| **k)
            .map(|(x, _)| *x as f64)
            .sum(),
        None => v.iter().map(|&x| x as f64).sum(),
    }
}

fn count(v: &[f32], mask: Option<&[bool]>) -> usize {
    mask.map_or(v.len(), |m| m.iter().take(v.len()).filter(|k| **k).count())
}

/// The mean log-prob per token, 0 for an empty side (it then carries nothing, as in SePO's loss).
fn mean_logp(v: &[f32], mask: Option<&[bool]>) -> f64 {
    sum(v, mask) / count(v, mask).max(1) as f64
}

/// TRL's evaluation figures for `model` over `pairs`, with implicit rewards
/// `beta * (log pi - log pi_ref)` summed over each response, then the length-normalized log-prob
/// accuracy, then (when every pair has masks) the `key_` versions on key tokens only.
pub fn preference(model: &str, role: &str, pairs: &[PairLogps], beta: f64) -> Vec<ReportRow> {
    let mut rows = Vec::new();
    let mut push = |metric: &str, xs: Vec<f64>| {
        let (value, stderr, n) = mean_se(&xs);
        rows.push(row(model, role, metric, value, stderr, n));
    };
    let with_masks = !pairs.is_empty() && pairs.iter().all(|p| p.chosen_mask.is_some());
    let passes: &[(&str, bool)] = if with_masks {
        &[("", false), ("key_", true)]
    } else {
        &[("", false)]
    };
    for &(prefix, masked) in passes {
        let rc: Vec<f64> = pairs
            .iter()
            .map(|p| {
                let (m, _) = masks(p, masked);
                beta * (sum(p.chosen, m) - sum(p.ref_chosen, m))
            })
            .collect();
        let rr: Vec<f64> = pairs
            .iter()
            .map(|p| {
                let (_, m) = masks(p, masked);
                beta * (sum(p.rejected, m) - sum(p.ref_rejected, m))
            })
            .collect();
        let margin: Vec<f64> = rc.iter().zip(&rr).map(|(c, r)| c - r).collect();
        let acc: Vec<f64> = margin.iter().map(|m| f64::from(*m > 0.0)).collect();
        let norm: Vec<f64> = pairs
            .iter()
            .map(|p| {
                let (c, r) = masks(p, masked);
                mean_logp(p.chosen, c) - mean_logp(p.rejected, r)
            })
            .collect();
        let norm_acc: Vec<f64> = norm.iter().map(|m| f64::from(*m > 0.0)).collect();
        push(&format!("{prefix}reward_chosen"), rc);
        push(&format!("{prefix}reward_rejected"), rr);
        push(&format!("{prefix}reward_margin"), margin);
        push(&format!("{prefix}reward_accuracy"), acc);
        push(&format!("{prefix}logp_margin"), norm);
        push(&format!("{prefix}logp_accuracy"), norm_acc);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }
    fn bools(v: &serde_json::Value) -> Vec<bool> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_bool().unwrap())
            .collect()
    }

    /// Every figure equals TRL's DPO evaluation formulas computed with torch in float64
    /// (scripts/make_eval_fixtures.py), on whole responses and on key tokens.
    #[test]
    fn matches_trl_formulas() {
        let f: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/eval/preference.json"))
                .unwrap();
        type Owned = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<bool>, Vec<bool>);
        let owned: Vec<Owned> = f["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    floats(&p["chosen"]),
                    floats(&p["rejected"]),
                    floats(&p["ref_chosen"]),
                    floats(&p["ref_rejected"]),
                    bools(&p["chosen_mask"]),
                    bools(&p["rejected_mask"]),
                )
            })
            .collect();
        let pairs: Vec<PairLogps> = owned
            .iter()
            .map(|o| PairLogps {
                chosen: &o.0,
                rejected: &o.1,
                ref_chosen: &o.2,
                ref_rejected: &o.3,
                chosen_mask: Some(&o.4),
                rejected_mask: Some(&o.5),
            })
            .collect();
        let rows = preference("m", "policy", &pairs, f["beta"].as_f64().unwrap());
        let expected = f["expected"].as_object().unwrap();
        assert_eq!(rows.len(), expected.len());
        for r in &rows {
            let e = &expected[&r.metric];
            let (v, se) = (e["value"].as_f64().unwrap(), e["stderr"].as_f64().unwrap());
            assert!(
                (r.value - v).abs() < 1e-5,
                "{}: {} vs {v}",
                r.metric,
                r.value
            );
            assert!((r.stderr.unwrap() - se).abs() < 1e-5, "{} stderr", r.metric);
            assert_eq!(r.n, 12);
        }
    }
}
