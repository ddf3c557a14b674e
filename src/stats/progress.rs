//! Monotone migration progress.
//!
//! Pre-copy has no fixed amount of work: pages dirtied while a round runs must be
//! sent again. Progress is therefore defined as
//!
//! ```text
//! fraction = sent_total / (sent_total + remaining)
//! ```
//!
//! where `sent_total` counts every page put on the wire so far (all rounds) and
//! `remaining` is what the source still owes the destination as far as it knows:
//! the pages left in the current round plus the pages held back for the final round
//! (deferred hot pages); after a harvest, everything dirty plus deferred. A burst
//! of dirtying can make this ratio fall; the reported value is clamped so it never
//! decreases (`max` of every value reported so far), it reaches 1 only at
//! completion, and it is capped at 0.999 before that. An ETA derived from it
//! (`remaining × bytes per page ÷ bandwidth`) therefore never makes the bar go
//! backwards, it only stalls while the guest redirties memory.

/// Computes the monotone progress fraction from page counts.
#[derive(Debug, Clone, Default)]
pub struct ProgressMeter {
    best: f64,
}

impl ProgressMeter {
    /// A meter at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Update with `sent_total` pages sent and `remaining` pages owed; returns the
    /// monotone fraction (< 1 until [`ProgressMeter::complete`]).
    pub fn update(&mut self, sent_total: u64, remaining: u64) -> f64 {
        let denom = (sent_total + remaining).max(1) as f64;
        let raw = (sent_total as f64 / denom).min(0.999);
        if raw > self.best {
            self.best = raw;
        }
        self.best
    }

    /// Completed: 1.
    pub fn complete(&mut self) -> f64 {
        self.best = 1.0;
        1.0
    }

    /// Current value.
    pub fn get(&self) -> f64 {
        self.best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_decreases() {
        let mut m = ProgressMeter::new();
        assert_eq!(m.update(0, 100), 0.0);
        assert_eq!(m.update(50, 50), 0.5);
        // Dirtying grew the remaining work: the fraction holds.
        assert_eq!(m.update(60, 200), 0.5);
        assert!(m.update(400, 1) > 0.99);
        assert!(m.get() < 1.0);
        assert_eq!(m.complete(), 1.0);
    }
}
