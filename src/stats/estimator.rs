//! Bandwidth and dirty-rate estimates (EWMA over rounds).

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

/// Estimates what brownout would cost now.
#[derive(Debug, Clone)]
pub struct Estimator {
    /// Wire bandwidth (bytes/s), smoothed.
    pub bandwidth: Ewma,
    /// Dirty rate (pages/s), smoothed.
    pub dirty_rate: Ewma,
    /// Wire bytes per sent page, smoothed (accounts for zero pages and compression).
    pub bytes_per_page: Ewma,
    /// Fixed brownout cost (pause + device state + digest + commit round trip), seconds.
    pub fixed_cost_s: f64,
}

impl Default for Estimator {
    fn default() -> Self {
        Self {
            bandwidth: Ewma::new(0.5),
            dirty_rate: Ewma::new(0.5),
            bytes_per_page: Ewma::new(0.5),
            fixed_cost_s: 0.002,
        }
    }
}

impl Estimator {
    /// Predicted downtime (seconds) to send `pages` dirty pages plus the fixed costs.
    pub fn predict_downtime(&self, pages: u64) -> f64 {
        let bw = self.bandwidth.get().unwrap_or(1e9).max(1.0);
        let bpp = self.bytes_per_page.get().unwrap_or(4096.0);
        pages as f64 * bpp / bw + self.fixed_cost_s
    }
}
