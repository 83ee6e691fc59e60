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

/// Whether the error is a write to a pipe whose reader is gone: stdout closed early, as in
/// `sepo dag P.yaml | head -1` (sepo writes to no other pipe). The reader has what it wanted, so
/// the command ends quietly with status 0, as ripgrep does.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Renders the chain as `outer: inner: innermost`, the way a user reads it on one line.
///
/// Each part goes through [`clip_message`], so a message built elsewhere (serde, a library)
/// that quotes a huge user value still prints as a line a terminal can show.
pub fn render(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let s = cause.to_string();
        if parts.last().is_some_and(|p| p.ends_with(&s)) {
            continue;
        }
        parts.push(s);
    }
    parts
        .iter()
        .map(|p| clip_message(p))
        .collect::<Vec<_>>()
        .join(": ")
}

/// Longest user value (in bytes) an error message repeats whole.
pub const ECHO_MAX: usize = 100;
/// How much of a longer value is shown (in bytes, cut at a character boundary).
const ECHO_HEAD: usize = 60;
/// Longest message part [`render`] prints whole, once every quoted value in it is clipped.
const MESSAGE_MAX: usize = 4000;

/// A user value as an error message repeats it: whole when short, else its start, `…` and its
/// size (`aaaa… (1048576 bytes)`), so a megabyte stage name, kind or `--set` value never comes
/// back as a megabyte of stderr. Every echo of a user value goes through here.
pub fn clip(value: &str) -> String {
    if value.len() <= ECHO_MAX {
        return value.to_string();
    }
    format!("{}… ({} bytes)", head(value, ECHO_HEAD), value.len())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn head(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The last resort for messages sepo did not build itself (serde's "unknown variant `…`",
/// library errors): every backquoted span longer than [`ECHO_MAX`] is [`clip`]ped, and a part
/// that is still longer than [`MESSAGE_MAX`] keeps its start and end around the byte count cut.
pub fn clip_message(msg: &str) -> String {
    if msg.len() <= ECHO_MAX {
        return msg.to_string();
    }
    let mut out = String::with_capacity(msg.len().min(MESSAGE_MAX + 64));
    let mut rest = msg;
    while let Some(open) = rest.find('`') {
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        match after.find('`') {
            Some(close) => {
                out.push_str(&clip(&after[..close]));
                out.push('`');
                rest = &after[close + 1..];
            }
            None => {
                rest = after;
                break;
            }
        }
    }
    out.push_str(rest);
    if out.len() <= MESSAGE_MAX {
        return out;
    }
    let keep = MESSAGE_MAX / 2;
    let start = head(&out, keep);
    let mut tail_at = out.len() - keep;
    while !out.is_char_boundary(tail_at) {
        tail_at += 1;
    }
    format!(
        "{start} …({} bytes cut)… {}",
        tail_at - start.len(),
        &out[tail_at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_values_and_sizes_long_ones() {
        assert_eq!(clip("pairs"), "pairs");
        let long = "é".repeat(600_000);
        let c = clip(&long);
        assert!(c.ends_with("… (1200000 bytes)"), "{c}");
        assert!(c.len() < 100, "{c}");
        let msg = format!("unknown variant `{long}`, expected `a` or `b`");
        let m = clip_message(&msg);
        assert!(m.len() < 200 && m.ends_with(", expected `a` or `b`"), "{m}");
        let unquoted = "x".repeat(1 << 20);
        let m = clip_message(&unquoted);
        assert!(
            m.len() < MESSAGE_MAX + 100 && m.contains("bytes cut"),
            "{}",
            m.len()
        );
        let err = user(format!("stage `{long}`: bad"));
        assert!(render(&err).len() < 200);
    }
}
