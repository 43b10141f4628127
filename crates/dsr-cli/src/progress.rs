//! Progress of training phases: a bar per phase on a terminal (step, loss terms, it/s, ETA), a
//! plain line every few steps otherwise (logs, CI).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Shows the progress of the current phase.
pub struct Progress {
    bar: Option<ProgressBar>,
    terminal: bool,
    phase: u8,
    done: u64,
    total: u64,
    phase_start: Instant,
    phase_start_step: u64,
    last_line: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// A bar on standard error when it is a terminal, plain lines otherwise.
    pub fn new() -> Self {
        Self {
            bar: None,
            terminal: std::io::stderr().is_terminal(),
            phase: 0,
            done: 0,
            total: 0,
            phase_start: Instant::now(),
            phase_start_step: 0,
            last_line: Instant::now(),
        }
    }

    /// A phase begins with `done` of `total` steps already taken.
    pub fn start_phase(&mut self, phase: u8, done: u64, total: u64) {
        self.finish();
        self.phase = phase;
        self.done = done;
        self.total = total;
        self.phase_start = Instant::now();
        self.phase_start_step = done;
        self.last_line = Instant::now();
        if self.terminal {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:28.cyan/blue}] {pos}/{len} {msg} · {per_sec} · ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("phase {phase}"));
            bar.set_position(done);
            self.bar = Some(bar);
        } else {
            eprintln!("phase {phase}: {total} steps{}", resumed(done));
        }
    }

    /// One step finished with these loss terms.
    pub fn step(&mut self, losses: &BTreeMap<String, f64>) {
        self.done += 1;
        let msg = losses
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect::<Vec<_>>()
            .join(" ");
        match &self.bar {
            Some(bar) => {
                bar.set_message(msg);
                bar.set_position(self.done);
            }
            None => {
                let every = (self.total / 20).max(1);
                if self.done % every == 0
                    || self.done == self.total
                    || self.last_line.elapsed() > Duration::from_secs(30)
                {
                    let steps = (self.done - self.phase_start_step) as f64;
                    let secs = self.phase_start.elapsed().as_secs_f64();
                    let per_step = secs / steps.max(1.0);
                    let eta = per_step * (self.total - self.done) as f64;
                    eprintln!(
                        "phase {} step {}/{} {msg} · {per_step:.2} s/it · ETA {}",
                        self.phase,
                        self.done,
                        self.total,
                        human(eta)
                    );
                    self.last_line = Instant::now();
                }
            }
        }
    }

    /// The current phase now has `total` steps (a re-planned budgeted run).
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// A message printed above the bar.
    pub fn message(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Ends the current bar.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

fn resumed(done: u64) -> String {
    if done > 0 {
        format!(" (resuming after step {done})")
    } else {
        String::new()
    }
}

/// Seconds as `1h02m`, `3m05s` or `12s`.
pub fn human(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
