//! Progress on stderr (rows/s, tokens/s, ETA). Silent under `--quiet`; stdout stays for results.

use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    quiet: bool,
    multi: MultiProgress,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        let multi = MultiProgress::with_draw_target(if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        Progress { quiet, multi }
    }

    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// A line of log on stderr that does not tear progress bars.
    pub fn log(&self, msg: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        // indicatif draws nothing when stderr is not a terminal; logs must still reach it. A
        // closed stderr (`2>&1 | head`) must not end a long run: the write error is dropped.
        if self.multi.is_hidden() {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "{}", msg.as_ref());
        } else {
            let _ = self.multi.println(msg.as_ref());
        }
    }

    /// A bar for `len` units of work (`unit` e.g. "rows", "tokens").
    pub fn bar(&self, stage: &str, len: u64, unit: &str) -> Bar {
        let pb = if self.quiet {
            ProgressBar::hidden()
        } else {
            self.multi.add(ProgressBar::new(len))
        };
        let style = ProgressStyle::with_template(&format!(
            "{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        pb.set_style(style);
        pb.set_prefix(stage.to_string());
        Bar {
            pb,
            start: Instant::now(),
        }
    }
}

pub struct Bar {
    pub pb: ProgressBar,
    start: Instant,
}

impl Bar {
    pub fn inc(&self, n: u64) {
        self.pb.inc(n);
    }

    pub fn set_message(&self, m: impl Into<String>) {
        self.pb.set_message(m.into());
    }

    /// Clears the bar; returns the seconds it ran.
    pub fn finish(&self) -> f64 {
        self.pb.finish_and_clear();
        self.start.elapsed().as_secs_f64()
    }
}
