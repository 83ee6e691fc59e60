//! sepo: Selective Preference Optimization (arXiv 2408.13518) as a reproducible,
//! content-hashed dataflow pipeline. The product contract is `SPEC.md`'s copy in the README.

pub mod artifacts;
pub mod bridge;
pub mod cli;
pub mod compare;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod export;
pub mod inspect;
pub mod keyview;
pub mod logprobs;
pub mod model;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod schema;
pub mod stages;
pub mod template;
pub mod testhook;
pub mod tokenizer;
pub mod train;
pub mod util;
