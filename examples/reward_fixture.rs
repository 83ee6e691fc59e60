//! Writes a reward model the way sepo makes one (not a test): `RewardModel::from_causal_lm` on a
//! causal LM folder with a seed, saved with the LM's tokenizer files.
//!
//!   cargo run --example reward_fixture -- FROM_DIR SEED OUT_DIR
//!
//! `scripts/make_reward_fixtures.py` runs it to make `tests/fixtures/hf/sepo-rm/` and then scores
//! that folder with transformers; `tests/reward_model.rs` checks that sepo still writes the same
//! bytes and gets the same scores.

use std::path::Path;

use anyhow::{Context, Result, bail};
use sepo::artifacts::ModelDir;
use sepo::model::{CausalLm, RewardModel};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [from, seed, out] = args.as_slice() else {
        bail!("usage: reward_fixture FROM_DIR SEED OUT_DIR");
    };
    let seed: u64 = seed.parse().context("SEED must be an integer")?;
    let device = sepo::device::parse_device("cpu")?;
    let lm = CausalLm::load(Path::new(from), &device)?;
    let rm = RewardModel::from_causal_lm(lm, seed, None)?;
    rm.save(Path::new(out))?;
    ModelDir::at(Path::new(from)).copy_tokenizer_to(&ModelDir::at(Path::new(out)))?;
    println!("{out}: {} parameters", rm.param_count());
    Ok(())
}
