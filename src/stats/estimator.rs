//! Bandwidth, dirty-rate and downtime estimates.
//!
//! The downtime model is the sum of what the brownout really does, in order:
//!
//! | term | estimate |
//! |---|---|
//! | pause | `FixedCosts::pause_s` (default 0.5 ms: the dirtier/vCPU stop handshake) |
//! | final harvest | median pre-copy harvest time (+ full rescan if `verify=full`) |
//! | final pages | `(bytes + min(bytes, DRAIN_BYTES)) ÷ final_bandwidth + final_round_overhead` |
//! | device state | `FixedCosts::device_state_s` (participants/config give it) |
//! | digest | reading the running digest: a fixed 20 µs (`digest_s`) |
//! | commit | handshake RTT + destination verify (the same read and compare) + drain slack |
//! | handoffs | twice the drain's round trip, measured just before the pause (pause and final gate) |
//!
//! `final_bandwidth` is the EWMA of the rounds after round 0 when there are any:
//! round 0 runs into the destination's first-touch page faults and is slower than
//! the small, cache-warm rounds that follow; the final round resembles the latter.
//! `final_round_overhead` covers the end-of-round gate (RoundEnd frames + barrier),
//! the worker shutdown and the paused side's bookkeeping, which a final round with
//! no page at all still pays.
//!
//! **The model checks itself.** Before each pre-copy round after round 0 the loop
//! asks for the time that round's pages should take ([`Estimator::expect_round`]);
//! after it, [`Estimator::record_round`] keeps `actual ÷ predicted`. On a busy host
//! (another process on one of the cores, a noisy neighbour) that ratio rises above
//! 1, and [`Estimator::margin`] turns the recent ratios into a factor applied to the
//! time-dependent terms (final harvest and final pages). The policy judges the
//! prediction *with* its margin ([`Prediction::with_margin`]). Until two rounds have
//! been measured the margin is [`Calibration::PRIOR_MARGIN`]; the first round after
//! round 0 is reported but not kept (its prediction rests on round 0's sequential
//! sweep, and the bandwidth it measures corrects that from then on). The default
//! policy does not pause the VM on the prior margin while a round could still
//! measure it ([`crate::engine::DowntimePolicy::measure_first`]).
//!
//! Every machine-specific constant of the model lives in [`Calibration`].

/// The downtime model's calibration: every constant measured on this project's
/// machine kind (2 vCPUs, nested KVM; `shared/design/machine.md`), in one place.
#[derive(Debug, Clone, Copy)]
pub struct Calibration;

impl Calibration {
    /// Bytes still in flight (socket buffers of two streams, 4 MiB each on this
    /// machine) that the destination applies after the source's last write, before
    /// it can answer the commit.
    pub const DRAIN_BYTES: f64 = 8.0 * 1024.0 * 1024.0;
    /// Source digest cost at brownout (s): reading the two lanes of the running
    /// digest (src/proof), whatever the guest size; sub-µs measured, 20 µs covers a
    /// preempted read.
    pub const DIGEST_S: f64 = 20e-6;
    /// Destination verify cost (s): the same read and a 16-byte comparison.
    pub const VERIFY_S: f64 = 20e-6;
    /// Full rescan of source memory at brownout (`verify=full`): xxh3 on 2 threads.
    pub const RESCAN_BYTES_PER_S: f64 = 8e9;
    /// A handshake RTT above this is a scheduling stall of one of the two ends (2
    /// shared cores), not the path; it would pin every prediction above the target.
    pub const MAX_RTT_S: f64 = 0.010;
    /// Pausing the VM (the dirtier/vCPU stop handshake).
    pub const PAUSE_S: f64 = 0.0005;
    /// Gating one pre-copy round (RoundEnd frames, barrier).
    pub const ROUND_OVERHEAD_S: f64 = 0.001;
    /// The final round's own cost with no page to send: its gate, the workers'
    /// shutdown and the paused-side bookkeeping. Measured as `final_pages_ms` of
    /// rate-0 brownouts (`bench --memory 2G --dirty-rate 0`): median 0.30 ms
    /// (0.20-0.43) on an idle host and with one core kept busy alike; 2 of 10
    /// busy-host runs stalled there (1.9 and 3.8 ms), which the margin covers.
    /// Since that part also counts the `Brownout` message and event before the
    /// pages: 0.32-0.42 ms in 3 idle-host runs.
    pub const FINAL_ROUND_OVERHEAD_S: f64 = 0.0005;
    /// Slack for the destination draining its last frames and joining its workers.
    pub const DRAIN_S: f64 = 0.001;
    /// One wake-up that waits for the scheduler's tick or for the hypervisor,
    /// budgeted when other processes keep the host's CPUs busy
    /// ([`crate::stats::host_load`]): the longest wake-up of a 300 µs sleep with
    /// both CPUs busy was 2.9-3.7 ms (1,500 sleeps, three times), and a busy-host
    /// commit round trip took 4.3 ms. One tick at this kernel's `HZ=250`.
    pub const BUSY_STALL_S: f64 = 0.004;
    /// Margin before the model has measured its own error: a final round on this
    /// shared machine has taken up to 1.47x its prediction (2 GiB, 1600 MB/s
    /// dirtying), so a prediction is trusted only with half again on top.
    pub const PRIOR_MARGIN: f64 = 1.5;
    /// Measured rounds needed before the measured margin replaces the prior.
    pub const MARGIN_MIN_SAMPLES: usize = 2;
    /// Recent rounds whose error forms the margin (the worst of them is kept).
    pub const MARGIN_WINDOW: usize = 8;
    /// Largest margin: beyond it the model is not predicting anything and the
    /// policy's other rules (throttle, local minimum, limits) decide.
    pub const MAX_MARGIN: f64 = 4.0;
    /// Rounds smaller than this many pages measure the gate, not the link: their
    /// error is not kept.
    pub const MARGIN_MIN_PAGES: u64 = 64;
}

/// Exponentially weighted moving average.
#[derive(Debug, Clone, Copy)]
pub struct Ewma {
    alpha: f64,
    value: Option<f64>,
}

impl Ewma {
    /// New average giving weight `alpha` (0..=1) to each new sample.
    pub fn new(alpha: f64) -> Self {
        Self { alpha, value: None }
    }
    /// Add a sample.
    pub fn add(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.value = Some(match self.value {
            None => x,
            Some(v) => v + self.alpha * (x - v),
        });
    }
    /// Current value.
    pub fn get(&self) -> Option<f64> {
        self.value
    }
}

/// Brownout costs that do not scale with the number of dirty pages (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedCosts {
    /// Pausing the VM.
    pub pause_s: f64,
    /// Control round trip measured at the handshake.
    pub rtt_s: f64,
    /// Reading the source's running digest.
    pub digest_s: f64,
    /// Destination digest verification (a read and a 16-byte comparison).
    pub dest_verify_s: f64,
    /// Expected device-state save + transfer + restore (from participants or config).
    pub device_state_s: f64,
    /// Full rescan of source memory at brownout (`verify=full`), else 0.
    pub rescan_s: f64,
    /// Slack for the destination draining its last frames and joining its workers.
    pub drain_s: f64,
    /// A round trip through both sides' threads as the host runs them now: the
    /// drain's, measured just before the pause (0 until then). The pause (the vCPU
    /// threads' stop handshake) and the final round's gate each wait for threads
    /// to be scheduled as that round trip did: on a host with a core taken by
    /// another process, 2.5-3.9 ms for the pause alone, against 0.1 ms idle.
    pub handoff_s: f64,
    /// One stalled wake-up ([`Calibration::BUSY_STALL_S`]) when, just before the
    /// pause, other processes left our threads fewer than two CPUs; else 0. A
    /// single round trip rarely meets such a stall, a brownout's dozen hand-offs
    /// sometimes do.
    pub stall_s: f64,
}

impl Default for FixedCosts {
    fn default() -> Self {
        Self {
            pause_s: Calibration::PAUSE_S,
            rtt_s: 0.0002,
            digest_s: 0.0005,
            dest_verify_s: 0.0005,
            device_state_s: 0.0,
            rescan_s: 0.0,
            drain_s: Calibration::DRAIN_S,
            handoff_s: 0.0,
            stall_s: 0.0,
        }
    }
}

impl FixedCosts {
    /// The fixed costs of migrating `bytes` bytes of memory with a handshake round
    /// trip of `rtt_s`, from the [`Calibration`] (the digest's cost does not depend
    /// on the size).
    pub fn calibrated(bytes: u64, rtt_s: f64, full_rescan: bool, device_state_s: f64) -> Self {
        Self {
            rtt_s: rtt_s.min(Calibration::MAX_RTT_S),
            digest_s: Calibration::DIGEST_S,
            dest_verify_s: Calibration::VERIFY_S,
            device_state_s,
            rescan_s: if full_rescan {
                bytes as f64 / Calibration::RESCAN_BYTES_PER_S
            } else {
                0.0
            },
            ..Self::default()
        }
    }

    /// Take in a control round trip measured just before the pause (the drain's,
    /// the destination's own wait taken out): the pause and the final gate cost one
    /// each, and the commit's round trip is at least as slow. Capped at
    /// [`Calibration::MAX_RTT_S`] like the handshake's.
    pub fn observe_round_trip(&mut self, secs: f64) {
        if secs.is_finite() && secs >= 0.0 {
            self.handoff_s = secs.min(Calibration::MAX_RTT_S);
            self.rtt_s = self.rtt_s.max(self.handoff_s);
        }
    }

    /// Take in whether other processes keep the host busy just before the pause
    /// ([`crate::stats::host_load::is_busy`]): a busy host budgets one stalled
    /// wake-up.
    pub fn observe_host_load(&mut self, busy: bool) {
        self.stall_s = if busy { Calibration::BUSY_STALL_S } else { 0.0 };
    }

    /// Sum of the fixed terms.
    pub fn total(&self) -> f64 {
        self.pause_s
            + 2.0 * self.handoff_s
            + self.stall_s
            + self.rtt_s
            + self.digest_s
            + self.dest_verify_s
            + self.device_state_s
            + self.rescan_s
            + self.drain_s
    }
}

/// A downtime prediction split like [`crate::stats::DowntimeBreakdown`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prediction {
    /// Final harvest (s).
    pub harvest_s: f64,
    /// Final pages (s).
    pub pages_s: f64,
    /// Fixed costs (s).
    pub fixed_s: f64,
}

impl Prediction {
    /// Total predicted downtime (s).
    pub fn total(&self) -> f64 {
        self.harvest_s + self.pages_s + self.fixed_s
    }

    /// The prediction with `margin` applied to the terms that depend on how fast
    /// this host runs right now (final harvest and final pages).
    pub fn with_margin(&self, margin: f64) -> Self {
        Self {
            harvest_s: self.harvest_s * margin,
            pages_s: self.pages_s * margin,
            fixed_s: self.fixed_s,
        }
    }
}

/// Estimates what brownout would cost now, from per-round measurements.
#[derive(Debug, Clone)]
pub struct Estimator {
    /// Wire bandwidth of round 0 (bytes/s).
    pub round0_bandwidth: Option<f64>,
    /// Wire bandwidth of rounds ≥ 1 (bytes/s), smoothed.
    pub bandwidth: Ewma,
    /// Dirty rate (pages/s), smoothed.
    pub dirty_rate: Ewma,
    /// Wire bytes per sent page, smoothed (accounts for zero pages and compression).
    pub bytes_per_page: Ewma,
    /// Harvest times (s) of the pre-copy rounds; the prediction uses their median
    /// (a harvest is a fixed amount of work; outliers are scheduling noise).
    pub harvests: Vec<f64>,
    /// Fixed cost of gating a pre-copy round (s).
    pub round_overhead_s: f64,
    /// Fixed cost of the final round (s), pages aside.
    pub final_round_overhead_s: f64,
    /// Costs independent of the page count.
    pub fixed: FixedCosts,
    /// `actual ÷ predicted` time of recent rounds (see [`Estimator::margin`]).
    pub errors: std::collections::VecDeque<f64>,
    /// The prediction made by [`Estimator::expect_round`] for the round under way,
    /// and whether it rested on round 0's bandwidth alone.
    expected_s: Option<(f64, bool)>,
    /// `actual ÷ predicted` of the last recorded round, when it had a prediction.
    last_error: Option<f64>,
    rounds: u32,
}

impl Default for Estimator {
    fn default() -> Self {
        Self {
            round0_bandwidth: None,
            bandwidth: Ewma::new(0.5),
            dirty_rate: Ewma::new(0.5),
            bytes_per_page: Ewma::new(0.5),
            harvests: Vec::new(),
            round_overhead_s: Calibration::ROUND_OVERHEAD_S,
            final_round_overhead_s: Calibration::FINAL_ROUND_OVERHEAD_S,
            fixed: FixedCosts::default(),
            errors: std::collections::VecDeque::new(),
            expected_s: None,
            last_error: None,
            rounds: 0,
        }
    }
}

impl Estimator {
    /// Record one finished round: `wire` bytes for `pages` pages in `secs`, then
    /// `dirty` pages found over `since_last` seconds by a harvest of `harvest_s`.
    pub fn record_round(
        &mut self,
        pages: u64,
        wire: u64,
        secs: f64,
        dirty: u64,
        since_last: f64,
        harvest_s: f64,
    ) {
        // The model's own error on this round, judged before its bandwidth enters.
        self.last_error = None;
        if let Some((expected, from_round0)) = self.expected_s.take() {
            if pages >= Calibration::MARGIN_MIN_PAGES && expected > 0.0 && secs > 0.0 {
                let ratio = secs / expected;
                self.last_error = Some(ratio);
                // Predicted from round 0's sequential sweep, the first dirty-page
                // round measures how much slower scattered pages go; the bandwidth
                // of the rounds after round 0 takes that in from now on, so keeping
                // the ratio too would count it twice.
                if !from_round0 {
                    self.errors.push_back(ratio);
                }
                while self.errors.len() > Calibration::MARGIN_WINDOW {
                    self.errors.pop_front();
                }
            }
        }
        // Tiny rounds measure the gate, not the link: only use rounds that moved
        // at least 1 MiB for the bandwidth.
        if pages > 0 && wire >= (1 << 20) && secs > 0.0 {
            let bw = wire as f64 / secs;
            if self.rounds == 0 {
                self.round0_bandwidth = Some(bw);
            } else {
                self.bandwidth.add(bw);
            }
        }
        if pages > 0 && wire > 0 {
            self.bytes_per_page.add(wire as f64 / pages as f64);
        }
        if since_last > 0.0 {
            self.dirty_rate.add(dirty as f64 / since_last);
        }
        if harvest_s.is_finite() {
            self.harvests.push(harvest_s);
        }
        self.rounds += 1;
    }

    /// Note that a round of `pages` pages is about to be sent and remember how long
    /// the model says it takes (no drain term: the round ends at its gate, after
    /// the destination applied everything). Round 0 has no estimate yet.
    pub fn expect_round(&mut self, pages: u64) {
        self.expected_s = (self.rounds > 0).then(|| {
            (
                pages as f64 * self.bytes_per_page.get().unwrap_or(4096.0) / self.final_bandwidth()
                    + self.round_overhead_s,
                self.bandwidth.get().is_none(),
            )
        });
    }

    /// `actual ÷ predicted` time of the last recorded round (None: no prediction).
    pub fn last_error(&self) -> Option<f64> {
        self.last_error
    }

    /// The factor the time-dependent terms of a prediction need on this host now:
    /// the worst `actual ÷ predicted` ratio of the recent rounds (never below 1),
    /// or [`Calibration::PRIOR_MARGIN`] until enough rounds were measured; at
    /// most [`Calibration::MAX_MARGIN`].
    pub fn margin(&self) -> f64 {
        if self.errors.len() < Calibration::MARGIN_MIN_SAMPLES {
            return Calibration::PRIOR_MARGIN;
        }
        self.errors
            .iter()
            .copied()
            .fold(1.0, f64::max)
            .min(Calibration::MAX_MARGIN)
    }

    /// Whether [`Estimator::margin`] is measured (enough rounds judged) rather
    /// than the prior.
    pub fn margin_measured(&self) -> bool {
        self.errors.len() >= Calibration::MARGIN_MIN_SAMPLES
    }

    /// Median pre-copy harvest time (s).
    pub fn harvest_median(&self) -> f64 {
        if self.harvests.is_empty() {
            return 0.0;
        }
        let mut v = self.harvests.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// Bandwidth (bytes/s) expected for the final round.
    pub fn final_bandwidth(&self) -> f64 {
        self.bandwidth
            .get()
            .or(self.round0_bandwidth)
            .unwrap_or(1e9)
            .max(1.0)
    }

    /// Dirty rate in bytes/s (4 KiB pages).
    pub fn dirty_bytes_per_s(&self) -> f64 {
        self.dirty_rate.get().unwrap_or(0.0) * crate::memory::PAGE_SIZE as f64
    }

    /// Predicted downtime of a brownout that must send `pages` pages.
    pub fn predict(&self, pages: u64) -> Prediction {
        let bpp = self.bytes_per_page.get().unwrap_or(4096.0);
        Prediction {
            harvest_s: self.harvest_median(),
            pages_s: {
                let bytes = pages as f64 * bpp;
                // The destination still drains what sits in the socket buffers when
                // the source has written its last frame (up to ~2 × 4 MiB here).
                let drain = bytes.min(Calibration::DRAIN_BYTES);
                (bytes + drain) / self.final_bandwidth() + self.final_round_overhead_s
            },
            fixed_s: self.fixed.total(),
        }
    }

    /// Predicted downtime (seconds) to send `pages` dirty pages plus the fixed costs.
    pub fn predict_downtime(&self, pages: u64) -> f64 {
        self.predict(pages).total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_bandwidth_prefers_later_rounds() {
        let mut e = Estimator::default();
        e.record_round(1000, 1 << 30, 1.0, 100, 1.0, 0.0);
        assert_eq!(e.final_bandwidth(), (1u64 << 30) as f64);
        e.record_round(100, 2 << 30, 1.0, 10, 1.0, 0.0);
        assert_eq!(e.final_bandwidth(), (2u64 << 30) as f64);
        // A tiny round does not move the bandwidth estimate.
        e.record_round(1, 4096, 1.0, 10, 1.0, 0.0);
        assert_eq!(e.final_bandwidth(), (2u64 << 30) as f64);
    }

    #[test]
    fn margin_is_the_prior_then_the_worst_recent_error() {
        let mut e = Estimator::default();
        assert_eq!(e.margin(), Calibration::PRIOR_MARGIN);
        // Round 0 sets the bandwidth: 1 GiB/s, 4 KiB per page.
        e.record_round(1 << 18, 1 << 30, 1.0, 0, 1.0, 0.0);
        assert!(e.last_error().is_none(), "round 0 has no prediction");
        // Round 1 (predicted from round 0's bandwidth) took three times its
        // prediction: reported, but its bandwidth, not its error, is what is kept.
        e.expect_round(1 << 16);
        let predicted = 0.25 + e.round_overhead_s;
        e.record_round(1 << 16, 1 << 28, 3.0 * predicted, 0, 1.0, 0.0);
        assert!((e.last_error().unwrap() - 3.0).abs() < 1e-9);
        assert!(!e.margin_measured());
        // Round 2: 1 << 12 pages at the rounds' bandwidth, took twice the prediction.
        e.expect_round(1 << 12);
        let bw = e.final_bandwidth();
        let predicted = (1u64 << 12) as f64 * 4096.0 / bw + e.round_overhead_s;
        e.record_round(1 << 12, 1 << 24, 2.0 * predicted, 0, 1.0, 0.0);
        assert!((e.last_error().unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(
            e.margin(),
            Calibration::PRIOR_MARGIN,
            "one sample is not enough"
        );
        // Round 3 ran at the predicted speed: the worst recent error stays.
        e.expect_round(1 << 10);
        let bw = e.final_bandwidth();
        let predicted = (1u64 << 10) as f64 * 4096.0 / bw + e.round_overhead_s;
        e.record_round(1 << 10, 1 << 22, predicted, 0, 1.0, 0.0);
        assert!(e.margin_measured());
        assert!((e.margin() - 2.0).abs() < 1e-9, "{}", e.margin());
        // Faster than predicted never lowers the margin below 1.
        let mut f = Estimator::default();
        f.record_round(1 << 18, 1 << 30, 1.0, 0, 1.0, 0.0);
        for _ in 0..4 {
            f.expect_round(1 << 12);
            f.record_round(1 << 12, 1 << 24, 1e-6, 0, 1.0, 0.0);
        }
        assert_eq!(f.margin(), 1.0);
        // Tiny rounds (the gate, not the link) are not judged.
        f.expect_round(1);
        f.record_round(1, 4096, 10.0, 0, 1.0, 0.0);
        assert!(f.last_error().is_none());
        assert_eq!(f.margin(), 1.0);
    }

    #[test]
    fn margin_applies_to_the_time_dependent_terms_only() {
        let p = Prediction {
            harvest_s: 0.002,
            pages_s: 0.020,
            fixed_s: 0.005,
        };
        let m = p.with_margin(1.5);
        assert!((m.total() - (0.003 + 0.030 + 0.005)).abs() < 1e-12);
    }

    #[test]
    fn a_slow_round_trip_before_the_pause_raises_the_fixed_costs() {
        let mut f = FixedCosts::calibrated(1 << 30, 0.0002, false, 0.0);
        let before = f.total();
        f.observe_round_trip(0.003);
        // Pause and final gate pay it once each; the commit's round trip is as slow.
        assert!((f.total() - (before + 2.0 * 0.003 + (0.003 - 0.0002))).abs() < 1e-12);
        f.observe_round_trip(1.0);
        assert_eq!(f.handoff_s, Calibration::MAX_RTT_S, "a stall is capped");
        f.observe_round_trip(f64::NAN);
        assert_eq!(f.handoff_s, Calibration::MAX_RTT_S, "nonsense is ignored");
    }

    #[test]
    fn a_busy_host_budgets_one_stalled_wake_up() {
        let mut f = FixedCosts::default();
        let idle = f.total();
        f.observe_host_load(true);
        assert!((f.total() - idle - Calibration::BUSY_STALL_S).abs() < 1e-12);
        // Not cumulative: the latest observation decides.
        f.observe_host_load(true);
        assert!((f.total() - idle - Calibration::BUSY_STALL_S).abs() < 1e-12);
        f.observe_host_load(false);
        assert_eq!(f.total(), idle);
    }

    #[test]
    fn prediction_adds_every_term() {
        let mut e = Estimator::default();
        e.record_round(1 << 18, 1 << 30, 1.0, 0, 1.0, 0.002);
        e.fixed.device_state_s = 0.010;
        let p = e.predict(1 << 18);
        let drain = Calibration::DRAIN_BYTES / (1u64 << 30) as f64;
        assert!((p.pages_s - (1.0 + drain + e.final_round_overhead_s)).abs() < 1e-9);
        assert_eq!(p.harvest_s, 0.002);
        assert!((p.total() - (p.pages_s + 0.002 + e.fixed.total())).abs() < 1e-12);
        assert!(e.fixed.total() >= 0.010);
    }
}
