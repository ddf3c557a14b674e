//! Convergence policy: *when* to stop pre-copy. The round loop (mechanism) only asks.
//!
//! After every round the loop builds a [`PolicySnapshot`] (predicted downtime,
//! bandwidth, dirty rate, writable working set, history) and calls
//! [`ConvergencePolicy::decide`], which answers continue, throttle the guest
//! (auto-converge), brown out, or abort. The policy also owns the hot-page
//! threshold the loop uses to hold pages back for the final round.
//!
//! [`DowntimePolicy`], the default:
//! 1. predicted downtime ≤ target → brown out ("converged");
//! 2. round or time limit reached → `on_limit` (force brownout, or cancel);
//! 3. no progress — the prediction did not improve by `min_improvement` on the best
//!    so far, or (QEMU's rule) the guest dirtied more than half of what the round
//!    sent in each of the last two rounds — → raise the throttle to the next of
//!    `throttle_steps` (20, 40, 60, 80, 95 % like QEMU's cpu-throttle);
//! 4. no progress for `stall_rounds` rounds and no throttle left (or auto-converge
//!    off) → the prediction sits at a local minimum and the target is out of reach:
//!    brown out there with `OnLimit::ForceBrownout` (waiting cannot make the downtime
//!    smaller), or abort with `OnLimit::Cancel` (waiting cannot make it converge).

use std::sync::Arc;
use std::time::Duration;

/// What the policy sees after each round.
#[derive(Debug, Clone)]
pub struct PolicySnapshot<'a> {
    /// Rounds finished so far (round 0 included).
    pub rounds: u32,
    /// Time since pre-copy started.
    pub elapsed: Duration,
    /// Pages owed right now (dirty + deferred: what brownout would send).
    pub remaining_pages: u64,
    /// Predicted downtime of a brownout now, with the model's margin applied to its
    /// time-dependent terms: the figure to judge against a target.
    pub predicted_downtime: Duration,
    /// The same prediction before the margin.
    pub predicted_downtime_raw: Duration,
    /// The margin (≥ 1) the model's own recent error calls for on this host.
    pub prediction_margin: f64,
    /// Whether that margin was measured on this migration's own rounds; false while
    /// it is still the prior (fewer than two rounds after round 0 moved enough
    /// pages to be judged).
    pub margin_measured: bool,
    /// Per-round history.
    pub history: &'a [crate::stats::RoundStats],
    /// Current throttle (percent).
    pub throttle_percent: u8,
    /// Bandwidth expected for the final round (bytes/s, smoothed).
    pub bandwidth_bps: f64,
    /// Dirty rate (bytes/s, smoothed).
    pub dirty_bytes_per_s: f64,
    /// Pages currently held back for the final round.
    pub deferred_pages: u64,
}

/// A policy's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Another round.
    Continue,
    /// Another round with the guest throttled to this percent.
    Throttle(u8),
    /// Pause the VM and switch over now; the string says why.
    Brownout(String),
    /// Give up; the source keeps running.
    Abort(AbortReason),
}

/// Why a policy gave up ([`Decision::Abort`], then
/// `MigrationError::PolicyAbort`): the figures it decided on, not a sentence.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AbortReason {
    /// The round or time limit was reached before the predicted downtime met the
    /// target (and `on_limit` is [`OnLimit::Cancel`]).
    #[error("did not converge: {limit}; predicted downtime {:.1} ms > target {} ms", ms(*predicted), target.as_millis())]
    LimitReached {
        /// Which limit.
        limit: Limit,
        /// The predicted downtime at that point.
        predicted: Duration,
        /// The downtime target.
        target: Duration,
    },
    /// The predicted downtime stopped improving, with no throttle step left.
    #[error("not converging: predicted downtime stopped improving at {:.1} ms (best {:.1} ms) for {stalled_rounds} rounds, throttle {throttle_percent} %", ms(*predicted), ms(*best))]
    Stalled {
        /// The predicted downtime of the last round.
        predicted: Duration,
        /// The best prediction so far.
        best: Duration,
        /// Rounds without improvement.
        stalled_rounds: u32,
        /// The guest's throttle.
        throttle_percent: u8,
    },
    /// A policy of the embedder's own, with its own error.
    #[error("{0}")]
    Custom(#[source] Arc<dyn std::error::Error + Send + Sync>),
}

impl AbortReason {
    /// A policy's own reason (kept as the error's `source()`).
    pub fn custom(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Custom(Arc::from(e.into()))
    }
}

impl PartialEq for AbortReason {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Self::LimitReached {
                    limit: a,
                    predicted: b,
                    target: c,
                },
                Self::LimitReached {
                    limit: x,
                    predicted: y,
                    target: z,
                },
            ) => (a, b, c) == (x, y, z),
            (
                Self::Stalled {
                    predicted: a,
                    best: b,
                    stalled_rounds: c,
                    throttle_percent: d,
                },
                Self::Stalled {
                    predicted: w,
                    best: x,
                    stalled_rounds: y,
                    throttle_percent: z,
                },
            ) => (a, b, c, d) == (w, x, y, z),
            (Self::Custom(a), Self::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for AbortReason {}

/// A limit of [`DowntimePolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Limit {
    /// `max_rounds` rounds were sent.
    #[error("round limit {0} reached")]
    Rounds(u32),
    /// `max_time` passed.
    #[error("time limit {0:?} reached")]
    Time(Duration),
}

/// Decides when pre-copy ends.
pub trait ConvergencePolicy: Send + std::fmt::Debug {
    /// Decide after a round.
    fn decide(&mut self, snap: &PolicySnapshot<'_>) -> Decision;
    /// Pages dirtied in this many consecutive harvests are "hot": the loop defers
    /// them to the final round instead of resending them every round. Values
    /// below 2 disable deferral.
    fn hot_page_rounds(&self) -> u32;
}

/// What to do when the round or time limit is hit before the target is met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLimit {
    /// Cancel the migration; the source keeps running.
    Cancel,
    /// Brown out anyway (longer downtime).
    ForceBrownout,
}

/// Owed pages below which a brownout may rest on the prior margin: a round this
/// small times the round's fixed gate, not the pages, so it could not measure the
/// margin anyway (the estimator ignores such rounds' error), and its final pages
/// take well under a millisecond.
pub const MEASURED_ROUND_PAGES: u64 = crate::stats::estimator::Calibration::MARGIN_MIN_PAGES;

/// QEMU's cpu-throttle progression, capped at 95 % like `cpu-throttle-tailslow`.
pub const DEFAULT_THROTTLE_STEPS: [u8; 5] = [20, 40, 60, 80, 95];

/// Default policy (see the module docs).
#[derive(Debug, Clone)]
pub struct DowntimePolicy {
    /// Downtime target.
    pub target: Duration,
    /// Maximum pre-copy rounds (round 0 included).
    pub max_rounds: u32,
    /// Maximum pre-copy time.
    pub max_time: Duration,
    /// What to do at a limit (and at a local minimum above the target).
    pub on_limit: OnLimit,
    /// Throttle the guest when it outruns the link.
    pub auto_converge: bool,
    /// Throttle levels, ascending.
    pub throttle_steps: Vec<u8>,
    /// Rounds without progress before the prediction counts as a local minimum.
    pub stall_rounds: u32,
    /// Relative improvement of the prediction that counts as progress.
    pub min_improvement: f64,
    /// See [`ConvergencePolicy::hot_page_rounds`].
    pub hot_page_rounds: u32,
    /// Run more rounds, while the limits allow, before pausing on a prediction
    /// whose margin is still the prior rather than measured (see
    /// [`PolicySnapshot::margin_measured`]), unless fewer than
    /// [`MEASURED_ROUND_PAGES`] pages are owed.
    pub measure_first: bool,
    /// Progress bookkeeping across rounds (starts empty; see [`PolicyProgress`]).
    pub progress: PolicyProgress,
}

/// What [`DowntimePolicy`] remembers between rounds: the best prediction so far and
/// how many rounds in a row failed to improve on it.
#[derive(Debug, Clone, Default)]
pub struct PolicyProgress {
    best_s: Option<f64>,
    stalled: u32,
}

impl Default for DowntimePolicy {
    fn default() -> Self {
        Self {
            target: Duration::from_millis(50),
            max_rounds: 30,
            max_time: Duration::from_secs(300),
            on_limit: OnLimit::ForceBrownout,
            auto_converge: true,
            throttle_steps: DEFAULT_THROTTLE_STEPS.to_vec(),
            stall_rounds: 3,
            min_improvement: 0.10,
            hot_page_rounds: 3,
            measure_first: true,
            progress: PolicyProgress::default(),
        }
    }
}

impl DowntimePolicy {
    /// Default policy with this target.
    pub fn with_target(target: Duration) -> Self {
        Self {
            target,
            ..Default::default()
        }
    }

    fn next_step(&self, current: u8) -> Option<u8> {
        if !self.auto_converge {
            return None;
        }
        self.throttle_steps.iter().copied().find(|&s| s > current)
    }

    /// QEMU's rule: the guest dirtied more than half of what was sent, in each of
    /// the last two pre-copy rounds after round 0.
    fn outrun(history: &[crate::stats::RoundStats]) -> bool {
        let rounds: Vec<_> = history.iter().filter(|r| r.round > 0).collect();
        rounds.len() >= 2
            && rounds[rounds.len() - 2..]
                .iter()
                .all(|r| r.pages > 0 && r.dirty_after * 2 > r.pages)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl ConvergencePolicy for DowntimePolicy {
    fn hot_page_rounds(&self) -> u32 {
        self.hot_page_rounds
    }

    fn decide(&mut self, s: &PolicySnapshot<'_>) -> Decision {
        let pred = s.predicted_downtime;
        let limit = if s.rounds >= self.max_rounds {
            Some(Limit::Rounds(self.max_rounds))
        } else if s.elapsed >= self.max_time {
            Some(Limit::Time(self.max_time))
        } else {
            None
        };
        if pred <= self.target {
            if self.measure_first
                && !s.margin_measured
                && s.remaining_pages >= MEASURED_ROUND_PAGES
                && limit.is_none()
            {
                // Within the target only by the prior margin: how fast this host
                // runs now is a guess until rounds like the final one were timed.
                // Another round measures it (and sends what is owed, so the final
                // set shrinks).
                return Decision::Continue;
            }
            return Decision::Brownout(format!(
                "converged: predicted downtime {:.1} ms ({:.1} ms, margin {:.2}) within target {} ms",
                ms(pred),
                ms(s.predicted_downtime_raw),
                s.prediction_margin,
                self.target.as_millis()
            ));
        }
        if let Some(limit) = limit {
            return match self.on_limit {
                OnLimit::ForceBrownout => Decision::Brownout(format!(
                    "forced: {limit}; predicted downtime {:.1} ms",
                    ms(pred)
                )),
                OnLimit::Cancel => Decision::Abort(AbortReason::LimitReached {
                    limit,
                    predicted: pred,
                    target: self.target,
                }),
            };
        }
        // Progress bookkeeping on the best prediction so far.
        let p = pred.as_secs_f64();
        let improved = match self.progress.best_s {
            None => true,
            Some(b) => p < b * (1.0 - self.min_improvement),
        };
        if improved {
            self.progress.best_s = Some(p);
            self.progress.stalled = 0;
        } else {
            self.progress.stalled += 1;
        }
        let outrun = Self::outrun(s.history);
        if self.progress.stalled > 0 || outrun {
            if let Some(step) = self.next_step(s.throttle_percent) {
                // Give the new throttle its own rounds before judging it.
                self.progress.stalled = 0;
                return Decision::Throttle(step);
            }
        }
        if self.progress.stalled >= self.stall_rounds {
            let best = Duration::from_secs_f64(self.progress.best_s.unwrap_or(p));
            return match self.on_limit {
                OnLimit::ForceBrownout => Decision::Brownout(format!(
                    "local minimum: predicted downtime stopped improving at {:.1} ms (best {:.1} ms) for {} rounds, throttle {} %; target unreachable",
                    ms(pred),
                    ms(best),
                    self.progress.stalled,
                    s.throttle_percent
                )),
                OnLimit::Cancel => Decision::Abort(AbortReason::Stalled {
                    predicted: pred,
                    best,
                    stalled_rounds: self.progress.stalled,
                    throttle_percent: s.throttle_percent,
                }),
            };
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::RoundStats;

    fn snap<'a>(
        rounds: u32,
        ms: u64,
        throttle: u8,
        history: &'a [RoundStats],
    ) -> PolicySnapshot<'a> {
        PolicySnapshot {
            rounds,
            elapsed: Duration::from_secs(1),
            remaining_pages: 10,
            predicted_downtime: Duration::from_millis(ms),
            history,
            throttle_percent: throttle,
            bandwidth_bps: 1e9,
            dirty_bytes_per_s: 1e8,
            deferred_pages: 0,
            predicted_downtime_raw: Duration::from_millis(ms),
            prediction_margin: 1.0,
            margin_measured: true,
        }
    }

    fn round(round: u32, pages: u64, dirty_after: u64) -> RoundStats {
        RoundStats {
            round,
            pages,
            dirty_after,
            ..Default::default()
        }
    }

    #[test]
    fn a_prediction_on_the_prior_margin_runs_another_round_first() {
        let mut p = DowntimePolicy {
            max_rounds: 5,
            ..Default::default()
        };
        let unmeasured = |rounds, pages| PolicySnapshot {
            margin_measured: false,
            remaining_pages: pages,
            prediction_margin: 1.5,
            ..snap(rounds, 10, 0, &[])
        };
        assert_eq!(p.decide(&unmeasured(1, 5000)), Decision::Continue);
        // A handful of pages cannot measure the margin, nor cost the target.
        assert!(matches!(
            p.decide(&unmeasured(2, MEASURED_ROUND_PAGES - 1)),
            Decision::Brownout(r) if r.starts_with("converged")
        ));
        // At the round limit the prediction is all there is.
        assert!(matches!(
            p.decide(&unmeasured(5, 5000)),
            Decision::Brownout(r) if r.starts_with("converged")
        ));
        // Measured, or turned off: within the target is enough.
        assert!(matches!(
            p.decide(&PolicySnapshot {
                margin_measured: true,
                ..unmeasured(2, 5000)
            }),
            Decision::Brownout(_)
        ));
        p.measure_first = false;
        assert!(matches!(
            p.decide(&unmeasured(2, 5000)),
            Decision::Brownout(_)
        ));
    }

    #[test]
    fn decides_by_target_and_limits() {
        let mut p = DowntimePolicy {
            max_rounds: 5,
            ..Default::default()
        };
        assert!(
            matches!(p.decide(&snap(1, 10, 0, &[])), Decision::Brownout(r) if r.starts_with("converged"))
        );
        assert_eq!(p.decide(&snap(1, 500, 0, &[])), Decision::Continue);
        assert!(
            matches!(p.decide(&snap(5, 500, 0, &[])), Decision::Brownout(r) if r.starts_with("forced"))
        );
        p.on_limit = OnLimit::Cancel;
        assert!(matches!(
            p.decide(&snap(5, 500, 0, &[])),
            Decision::Abort(_)
        ));
        let mut t = DowntimePolicy {
            max_time: Duration::from_millis(500),
            on_limit: OnLimit::Cancel,
            ..Default::default()
        };
        assert!(
            matches!(t.decide(&snap(1, 500, 0, &[])), Decision::Abort(r @ AbortReason::LimitReached { limit: Limit::Time(_), .. }) if r.to_string().contains("time limit"))
        );
    }

    #[test]
    fn throttles_in_steps_when_stalled() {
        let mut p = DowntimePolicy::default();
        // Improving predictions: keep going.
        assert_eq!(p.decide(&snap(1, 1000, 0, &[])), Decision::Continue);
        assert_eq!(p.decide(&snap(2, 500, 0, &[])), Decision::Continue);
        // Stuck at ~500 ms: each stalled round raises the throttle one step.
        let mut throttle = 0;
        let mut seen = Vec::new();
        for r in 3..8 {
            match p.decide(&snap(r, 490, throttle, &[])) {
                Decision::Throttle(t) => {
                    assert!(t > throttle);
                    throttle = t;
                    seen.push(t);
                }
                other => panic!("round {r}: expected a throttle step, got {other:?}"),
            }
        }
        assert_eq!(seen, DEFAULT_THROTTLE_STEPS.to_vec());
        // Throttle exhausted: after `stall_rounds` stalled rounds, brown out at the
        // local minimum (default on-limit is force).
        let mut d = Decision::Continue;
        for r in 8..8 + p.stall_rounds {
            d = p.decide(&snap(r, 490, 95, &[]));
        }
        assert!(matches!(d, Decision::Brownout(r) if r.starts_with("local minimum")));
    }

    #[test]
    fn qemu_rule_throttles_even_while_improving() {
        let mut p = DowntimePolicy::default();
        let h = [round(0, 1000, 800), round(1, 800, 600), round(2, 600, 450)];
        assert_eq!(p.decide(&snap(1, 1000, 0, &h[..1])), Decision::Continue);
        assert_eq!(p.decide(&snap(2, 700, 0, &h[..2])), Decision::Continue);
        assert_eq!(p.decide(&snap(3, 400, 0, &h)), Decision::Throttle(20));
        // Sending outpaces dirtying: no throttle.
        let mut q = DowntimePolicy::default();
        let h = [round(0, 1000, 300), round(1, 300, 100), round(2, 100, 40)];
        assert_eq!(q.decide(&snap(1, 1000, 0, &h[..1])), Decision::Continue);
        assert_eq!(q.decide(&snap(3, 400, 0, &h)), Decision::Continue);
    }

    #[test]
    fn without_auto_converge_a_stall_cancels_or_forces() {
        let mut p = DowntimePolicy {
            auto_converge: false,
            on_limit: OnLimit::Cancel,
            ..Default::default()
        };
        let mut last = Decision::Continue;
        for r in 1..=1 + p.stall_rounds {
            last = p.decide(&snap(r, 300, 0, &[]));
            if r <= p.stall_rounds {
                assert_eq!(last, Decision::Continue, "round {r}");
            }
        }
        assert!(
            matches!(&last, Decision::Abort(r @ AbortReason::Stalled { .. }) if r.to_string().starts_with("not converging")),
            "{last:?}"
        );
        let mut f = DowntimePolicy {
            auto_converge: false,
            ..Default::default()
        };
        let mut last = Decision::Continue;
        for r in 1..=1 + f.stall_rounds {
            last = f.decide(&snap(r, 300, 0, &[]));
        }
        assert!(matches!(last, Decision::Brownout(r) if r.starts_with("local minimum")));
    }

    #[test]
    fn converged_wins_over_limits() {
        let mut p = DowntimePolicy {
            max_rounds: 1,
            on_limit: OnLimit::Cancel,
            ..Default::default()
        };
        assert!(matches!(
            p.decide(&snap(1, 50, 0, &[])),
            Decision::Brownout(_)
        ));
        assert!(matches!(p.decide(&snap(1, 51, 0, &[])), Decision::Abort(_)));
    }
}
