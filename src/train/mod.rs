//! Training math: the preference / SFT objectives, the learning-rate schedule, and the optimizer
//! pieces (PyTorch-exact AdamW, global gradient-norm clipping, checkpointable optimizer state).
//!
//! The training loop and the `train` stage live elsewhere; everything here is plain functions and
//! small structs over burn tensors and modules, tested against values produced by PyTorch /
//! transformers (`tests/fixtures/losses.json`, `tests/fixtures/optim.json`).

pub mod objectives;
pub mod optim;
pub mod phases;
pub mod rows;
pub mod schedule;
pub mod trainer;

pub use objectives::{
    PairLoss, PairMetrics, bradley_terry, dpo, ipo, masked_count, masked_sum, sepo, sft, simpo,
};
pub use optim::{AdamW, AdamWConfig, DecayScope, ParamGrads, load_module, save_module};
pub use schedule::{lr_at, num_warmup_steps};
