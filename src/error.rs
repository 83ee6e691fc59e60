//! Two kinds of failure matter to a user: their input is wrong (exit 2) or a stage broke (exit 1).
//! Input errors are tagged with [`UserError`] anywhere in the `anyhow` chain, so context added on
//! the way up (file, stage, row) never loses the exit status.

use std::fmt;

/// An error caused by what the user wrote: YAML, CLI, parameters, data files.
#[derive(Debug)]
pub struct UserError(pub String);

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

/// Builds an input error (exit status 2).
pub fn user(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UserError(msg.into()))
}

/// `bail!` for input errors.
#[macro_export]
macro_rules! user_bail {
    ($($arg:tt)*) => {
        return Err($crate::error::user(format!($($arg)*)))
    };
}

/// Whether any error in the chain is the user's.
pub fn is_user_error(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<UserError>().is_some())
}

/// Exit status for an error: 2 for bad input, 1 for a failure.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if is_user_error(err) { 2 } else { 1 }
}

/// Renders the chain as `outer: inner: innermost`, the way a user reads it on one line.
pub fn render(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let s = cause.to_string();
        if parts.last().is_some_and(|p| p.ends_with(&s)) {
            continue;
        }
        parts.push(s);
    }
    parts.join(": ")
}
