//! The pipeline engine: YAML spec, DAG, hashing, the artifact store, the stage contract and the
//! executor.

pub mod dag;
pub mod executor;
pub mod gc;
pub mod graph;
pub mod hash;
pub mod integrity;
pub mod matrix;
pub mod spec;
pub mod stage;
pub mod store;
pub mod why;

pub use spec::{Pipeline, StageDecl};
