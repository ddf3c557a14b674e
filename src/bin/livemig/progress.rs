//! Terminal progress bar over the engine's event stream, and Ctrl-C → cancel.
//!
//! The bar shows the engine's monotone progress fraction (defined in
//! `livemig::stats::progress`: pages sent ÷ (sent + still owed), never
//! decreasing). Its message, updated at every progress event (every 16384 pages,
//! so several times a second during a long round 0), says:
//! - the round, and the bytes put on the wire so far;
//! - the live wire rate: bytes moved since the previous event ÷ the time between
//!   the two (the first event of a migration averages over everything so far);
//! - an ETA: the pages still owed × the wire bytes per page so far ÷ the live rate;
//! - the predicted downtime once a round has measured it (`–` before that) and
//!   the throttle when auto-converge applies one.
//!
//! [`BarText`] computes the text from events alone (times come from the events),
//! so it is tested without a terminal or a clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use livemig::engine::CancelToken;
use livemig::stats::{Event, ProgressSink};

const SCALE: u64 = 10_000;

/// Weight of the newest interval in the smoothed live rate: enough to follow a
/// change of link rate within two or three events, not so much that one batch
/// stuck behind a full socket buffer swings the figure.
const RATE_WEIGHT: f64 = 0.5;

/// The bar's message, computed from the event stream.
#[derive(Debug, Default)]
pub struct BarText {
    /// (wire bytes, elapsed ms) at the previous progress event.
    last: Option<(u64, f64)>,
    /// Smoothed live wire rate (bytes/s).
    rate_bps: Option<f64>,
    /// Predicted downtime from the latest finished round (ms).
    predicted_ms: Option<f64>,
    throttle: u8,
}

impl BarText {
    /// Take one event; returns the new message when the event changes it.
    pub fn update(&mut self, event: &Event) -> Option<String> {
        match event {
            Event::Progress {
                round,
                sent_total,
                remaining,
                wire_bytes,
                elapsed_ms,
                ..
            } => {
                let (bytes, ms) = (*wire_bytes, *elapsed_ms);
                let sample = match self.last {
                    Some((b0, t0)) if ms > t0 && bytes >= b0 => {
                        Some((bytes - b0) as f64 / ((ms - t0) / 1e3))
                    }
                    Some(_) => None,
                    None if ms > 0.0 => Some(bytes as f64 / (ms / 1e3)),
                    None => None,
                };
                self.last = Some((bytes, ms));
                if let Some(s) = sample {
                    self.rate_bps = Some(match self.rate_bps {
                        Some(r) => r + RATE_WEIGHT * (s - r),
                        None => s,
                    });
                }
                Some(self.progress_text(*round, bytes, *sent_total, *remaining))
            }
            Event::RoundFinished(r) => {
                self.predicted_ms = Some(r.predicted_downtime_ms);
                None
            }
            Event::Throttled { percent } => {
                self.throttle = *percent;
                None
            }
            Event::Brownout {
                pages,
                predicted_downtime_ms,
                ..
            } => Some(format!(
                "brownout: {pages} pages, predicted downtime {predicted_downtime_ms:.1} ms"
            )),
            Event::Completed(r) => Some(format!(
                "done: downtime {:.1} ms (predicted {:.1} ms)",
                r.downtime_ms, r.predicted_downtime_ms
            )),
            Event::Failed { error, .. } => Some(format!("failed: {error}")),
            _ => None,
        }
    }

    fn progress_text(
        &self,
        round: u32,
        wire_bytes: u64,
        sent_total: u64,
        remaining: u64,
    ) -> String {
        let rate = match self.rate_bps {
            Some(r) => format!("{:.2} Gbit/s", r * 8.0 / 1e9),
            None => "– Gbit/s".into(),
        };
        let eta = match self.rate_bps {
            Some(r) if r > 0.0 && sent_total > 0 => {
                let bytes_per_page = wire_bytes as f64 / sent_total as f64;
                format!("ETA {}", secs(remaining as f64 * bytes_per_page / r))
            }
            _ => "ETA –".into(),
        };
        let predicted = match self.predicted_ms {
            Some(ms) => format!("predicted downtime {ms:.1} ms"),
            None => "predicted downtime –".into(),
        };
        let throttle = if self.throttle > 0 {
            format!("  throttle {} %", self.throttle)
        } else {
            String::new()
        };
        format!(
            "round {round}  {} sent  {rate}  {eta}  {predicted}{throttle}",
            bytes(wire_bytes)
        )
    }
}

/// `1.50 GiB`, `320.0 MiB`, `12.0 KiB`.
fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// `4.2 s`, `2m05s`.
fn secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        let s = s.round() as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Renders events on a terminal bar.
#[derive(Debug)]
pub struct Bar {
    bar: ProgressBar,
    text: Mutex<BarText>,
}

impl Bar {
    /// A bar with `label` (e.g. the migration's index).
    pub fn new(label: &str) -> Self {
        let bar = ProgressBar::new(SCALE);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg}",
            )
            .expect("valid template"),
        );
        bar.set_prefix(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Self {
            bar,
            text: Mutex::new(BarText::default()),
        }
    }
}

impl ProgressSink for Bar {
    fn on_event(&self, event: &Event) {
        let msg = self.text.lock().expect("bar lock").update(event);
        match event {
            Event::Progress { fraction, .. } => {
                self.bar.set_position((fraction * SCALE as f64) as u64)
            }
            Event::Completed(_) => {
                self.bar.set_position(SCALE);
                self.bar.finish_with_message(msg.unwrap_or_default());
                return;
            }
            Event::Failed { .. } => {
                self.bar.abandon_with_message(msg.unwrap_or_default());
                return;
            }
            _ => {}
        }
        if let Some(m) = msg {
            self.bar.set_message(m);
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_sig: libc::c_int) {
    // Async-signal-safe: one atomic store.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Install a SIGINT/SIGTERM handler and a watcher thread that cancels `tokens`
/// when the signal arrives. A second Ctrl-C while cancelling is ignored: the
/// engine needs a moment to resume the source and tell the destination.
pub fn cancel_on_interrupt(tokens: Vec<CancelToken>) {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `sa` is fully initialised (zeroed, then handler and empty mask
        // set) before `sigaction` reads it; the handler only stores to an atomic,
        // which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    std::thread::Builder::new()
        .name("livemig-sigint".into())
        .spawn(move || loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                eprintln!("livemig: interrupted, cancelling (the source keeps running)");
                tokens.iter().for_each(CancelToken::cancel);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        })
        .expect("spawn signal watcher");
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig::stats::RoundStats;

    fn progress(round: u32, sent_total: u64, remaining: u64, wire: u64, ms: f64) -> Event {
        Event::Progress {
            round,
            sent: sent_total,
            total: sent_total + remaining,
            sent_total,
            remaining,
            fraction: sent_total as f64 / (sent_total + remaining) as f64,
            wire_bytes: wire,
            elapsed_ms: ms,
        }
    }

    #[test]
    fn round_zero_shows_live_rate_bytes_and_eta_before_any_round_ends() {
        let mut t = BarText::default();
        // 16384 pages (64 MiB) in the first 256 ms: 2.10 Gbit/s averaged.
        let m = t
            .update(&progress(0, 16384, 245_760, 64 << 20, 256.0))
            .unwrap();
        assert!(m.starts_with("round 0  64.0 MiB sent  2.10 Gbit/s"), "{m}");
        // 245760 pages of 4 KiB at 2.10 Gbit/s: 3.84 s.
        assert!(m.contains("ETA 3.8 s"), "{m}");
        assert!(m.contains("predicted downtime –"), "{m}");
        assert!(!m.contains("throttle"), "{m}");
        // The next 64 MiB take 512 ms (1.05 Gbit/s): the smoothed rate moves
        // halfway, to 1.57 Gbit/s, and the ETA grows accordingly.
        let m = t
            .update(&progress(0, 32768, 229_376, 128 << 20, 768.0))
            .unwrap();
        assert!(m.contains("128.0 MiB sent  1.57 Gbit/s"), "{m}");
        assert!(m.contains("ETA 4.8 s"), "{m}");
    }

    #[test]
    fn later_rounds_show_prediction_and_throttle() {
        let mut t = BarText::default();
        t.update(&progress(0, 262_144, 0, 1 << 30, 4000.0));
        assert_eq!(
            t.update(&Event::RoundFinished(RoundStats {
                predicted_downtime_ms: 31.4,
                ..Default::default()
            })),
            None
        );
        assert_eq!(t.update(&Event::Throttled { percent: 20 }), None);
        // 1 GiB + 40 MiB by 5 s: 40 MiB in 1 s → the smoothed rate moves from
        // 2.15 to 1.24 Gbit/s.
        let m = t
            .update(&progress(1, 272_384, 1000, (1 << 30) + (40 << 20), 5000.0))
            .unwrap();
        assert!(m.starts_with("round 1  1.04 GiB sent  1.24 Gbit/s"), "{m}");
        assert!(
            m.contains("predicted downtime 31.4 ms  throttle 20 %"),
            "{m}"
        );
        assert!(m.contains("ETA 0.0 s"), "{m}");
    }

    #[test]
    fn long_etas_in_minutes_and_no_rate_without_time() {
        let mut t = BarText::default();
        let m = t.update(&progress(0, 0, 1000, 0, 0.0)).unwrap();
        assert!(m.contains("– Gbit/s  ETA –"), "{m}");
        // 4 MiB/s, 1024000 pages of 4 KiB owed: 1000 s.
        let m = t
            .update(&progress(0, 1024, 1_024_000, 4 << 20, 1000.0))
            .unwrap();
        assert!(m.contains("ETA 16m40s"), "{m}");
        assert_eq!(secs(59.94), "59.9 s");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
