//! Bandwidth, dirty-rate and downtime estimates.
//!
//! The downtime model is the sum of what the brownout really does, in order:
//!
//! | term | estimate |
//! |---|---|
//! | pause | `FixedCosts::pause_s` (default 0.5 ms: the dirtier/vCPU stop handshake) |
//! | final harvest | median pre-copy harvest time (+ full rescan if `verify=full`) |
//! | final pages | `(bytes + min(bytes, DRAIN_BYTES)) ÷ final_bandwidth + round_overhead` |
//! | device state | `FixedCosts::device_state_s` (participants/config give it) |
//! | digest | reading the running digest: a fixed 20 µs (`digest_s`) |
//! | commit | handshake RTT + destination verify (the same read and compare) + drain slack |
//!
//! `final_bandwidth` is the EWMA of the rounds after round 0 when there are any:
//! round 0 runs into the destination's first-touch page faults and is slower than
//! the small, cache-warm rounds that follow; the final round resembles the latter.
//! `round_overhead` covers the end-of-round gate (RoundEnd frames + barrier) and the
//! worker shutdown, which a tiny final round still pays.

/// Bytes still in flight (socket buffers of two streams, 4 MiB each on this
/// machine) that the destination applies after the source's last write, before it
/// can answer the commit.
pub const DRAIN_BYTES: f64 = 8.0 * 1024.0 * 1024.0;

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
}

impl Default for FixedCosts {
    fn default() -> Self {
        Self {
            pause_s: 0.0005,
            rtt_s: 0.0002,
            digest_s: 0.0005,
            dest_verify_s: 0.0005,
            device_state_s: 0.0,
            rescan_s: 0.0,
            drain_s: 0.001,
        }
    }
}

impl FixedCosts {
    /// Sum of the fixed terms.
    pub fn total(&self) -> f64 {
        self.pause_s
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
    /// Fixed cost of gating / finishing a round (s).
    pub round_overhead_s: f64,
    /// Costs independent of the page count.
    pub fixed: FixedCosts,
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
            round_overhead_s: 0.001,
            fixed: FixedCosts::default(),
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
                let drain = bytes.min(DRAIN_BYTES);
                (bytes + drain) / self.final_bandwidth() + self.round_overhead_s
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
    fn prediction_adds_every_term() {
        let mut e = Estimator::default();
        e.record_round(1 << 18, 1 << 30, 1.0, 0, 1.0, 0.002);
        e.fixed.device_state_s = 0.010;
        let p = e.predict(1 << 18);
        let drain = DRAIN_BYTES / (1u64 << 30) as f64;
        assert!((p.pages_s - (1.0 + drain + e.round_overhead_s)).abs() < 1e-9);
        assert_eq!(p.harvest_s, 0.002);
        assert!((p.total() - (p.pages_s + 0.002 + e.fixed.total())).abs() < 1e-12);
        assert!(e.fixed.total() >= 0.010);
    }
}
