//! Data I/O shared by stages: reading user data files row by row (with locations for errors) and
//! writing/reading the Parquet artifacts.

pub mod parquet;
pub mod rows;
