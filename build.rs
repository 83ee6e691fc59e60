// No build step: this file exists so that `[build-dependencies]` in Cargo.toml takes effect
// (see the comment there: it keeps one compiled dependency graph for the flex and tch builds).
fn main() {}
