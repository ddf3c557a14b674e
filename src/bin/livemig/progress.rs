//! Terminal progress bar over the engine's event stream, and Ctrl-C → cancel.
//!
//! The bar shows the engine's monotone progress fraction (defined in
//! `livemig::stats::progress`: pages sent ÷ (sent + still owed), never
//! decreasing), the wire rate, the predicted downtime and an ETA computed from the
//! pages still owed and the measured bandwidth; the ETA is only shown once a round
//! has measured the bandwidth.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use livemig::engine::CancelToken;
use livemig::stats::{Event, ProgressSink};

const SCALE: u64 = 10_000;

#[derive(Debug, Default)]
struct BarState {
    bandwidth_bps: f64,
    bytes_per_page: f64,
    predicted_ms: f64,
    throttle: u8,
}

/// Renders events on a terminal bar.
#[derive(Debug)]
pub struct Bar {
    bar: ProgressBar,
    state: Mutex<BarState>,
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
            state: Mutex::new(BarState::default()),
        }
    }
}

impl ProgressSink for Bar {
    fn on_event(&self, event: &Event) {
        let mut st = self.state.lock().expect("bar lock");
        match event {
            Event::Progress {
                fraction,
                remaining,
                round,
                ..
            } => {
                self.bar.set_position((fraction * SCALE as f64) as u64);
                let eta = if st.bandwidth_bps > 0.0 {
                    format!(
                        "ETA {:.1} s",
                        *remaining as f64 * st.bytes_per_page / st.bandwidth_bps
                    )
                } else {
                    "ETA …".into()
                };
                self.bar.set_message(format!(
                    "round {round}  {:.2} Gbit/s  predicted downtime {:.1} ms  throttle {} %  {eta}",
                    st.bandwidth_bps * 8.0 / 1e9,
                    st.predicted_ms,
                    st.throttle
                ));
            }
            Event::RoundFinished(r) => {
                st.bandwidth_bps = r.ewma_bandwidth_bps;
                if r.pages > 0 {
                    st.bytes_per_page = r.wire_bytes as f64 / r.pages as f64;
                }
                st.predicted_ms = r.predicted_downtime_ms;
            }
            Event::Throttled { percent } => st.throttle = *percent,
            Event::Brownout {
                pages,
                predicted_downtime_ms,
                ..
            } => self.bar.set_message(format!(
                "brownout: {pages} pages, predicted downtime {predicted_downtime_ms:.1} ms"
            )),
            Event::Completed(r) => {
                self.bar.set_position(SCALE);
                self.bar.finish_with_message(format!(
                    "done: downtime {:.1} ms (predicted {:.1} ms)",
                    r.downtime_ms, r.predicted_downtime_ms
                ));
            }
            Event::Failed { error, .. } => {
                self.bar.abandon_with_message(format!("failed: {error}"))
            }
            _ => {}
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
