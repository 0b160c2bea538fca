//! A progress line on stderr while a run goes: the phase, how far it is, and the time.
//!
//! On a terminal the line redraws in place a few times a second; otherwise (CI logs) each
//! phase prints one line when it starts, so logs stay short.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the line redraws.
const REDRAW: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Shared {
    phase: Mutex<(String, usize)>,
    done: AtomicUsize,
    stop: AtomicBool,
}

/// The progress of one run (quiet unless enabled: library users and tests get no output).
pub(crate) struct Progress {
    shared: Arc<Shared>,
    started: Instant,
    enabled: bool,
    tty: bool,
}

impl Progress {
    pub(crate) fn new(enabled: bool) -> Self {
        let tty = enabled && std::io::stderr().is_terminal();
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        if tty {
            let s = shared.clone();
            std::thread::spawn(move || {
                while !s.stop.load(Ordering::Relaxed) {
                    draw(&s, started);
                    std::thread::sleep(REDRAW);
                }
            });
        }
        Progress {
            shared,
            started,
            enabled,
            tty,
        }
    }

    /// A new phase of `total` steps (0: no count).
    pub(crate) fn phase(&self, name: &str, total: usize, net: &str) {
        *self.shared.phase.lock().unwrap_or_else(|e| e.into_inner()) = (name.to_owned(), total);
        self.shared.done.store(0, Ordering::Relaxed);
        if self.enabled && !self.tty {
            eprintln!(
                "[{:>6.1} s] {name}{} ({net})",
                self.started.elapsed().as_secs_f64(),
                if total > 0 {
                    format!(" {total}")
                } else {
                    String::new()
                }
            );
        }
    }

    /// One step done.
    pub(crate) fn tick(&self) {
        self.shared.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Clears the line.
    pub(crate) fn finish(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn draw(s: &Shared, started: Instant) {
    let (name, total) = s.phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let done = s.done.load(Ordering::Relaxed).min(total.max(1));
    const WIDTH: usize = 30;
    let bar = match (done * WIDTH).checked_div(total) {
        Some(filled) => format!(
            "[{}{}] {done}/{total}",
            "#".repeat(filled),
            " ".repeat(WIDTH - filled)
        ),
        None => String::new(),
    };
    eprint!(
        "\r\x1b[2K{:>7.1} s  {name:<10} {bar}",
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().flush();
}
