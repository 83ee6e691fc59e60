//! The pipeline engine: YAML spec, DAG, hashing, the artifact store and the executor.

pub mod executor;
pub mod gc;
pub mod graph;
pub mod hash;
pub mod spec;
pub mod store;

pub use spec::{Pipeline, StageDecl};
