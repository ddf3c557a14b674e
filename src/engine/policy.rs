//! Convergence policy: *when* to stop pre-copy. The round loop (mechanism) only asks.

use std::time::Duration;

/// What the policy sees after each round.
#[derive(Debug, Clone)]
pub struct PolicySnapshot<'a> {
    /// Rounds finished so far (round 0 included).
    pub rounds: u32,
    /// Time since pre-copy started.
    pub elapsed: Duration,
    /// Pages dirty right now (what brownout would send).
    pub remaining_pages: u64,
    /// Predicted downtime of a brownout now.
    pub predicted_downtime: Duration,
    /// Per-round history.
    pub history: &'a [crate::stats::RoundStats],
    /// Current throttle (percent).
    pub throttle_percent: u8,
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
    Abort(String),
}

/// Decides when pre-copy ends.
pub trait ConvergencePolicy: Send + std::fmt::Debug {
    /// Decide after a round.
    fn decide(&mut self, snap: &PolicySnapshot<'_>) -> Decision;
}

/// What to do when the round or time limit is hit before the target is met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLimit {
    /// Cancel the migration; the source keeps running.
    Cancel,
    /// Brown out anyway (longer downtime).
    ForceBrownout,
}

/// Default policy: brown out once the predicted downtime is within `target`; at
/// `max_rounds` or `max_time`, follow `on_limit`.
#[derive(Debug, Clone)]
pub struct DowntimePolicy {
    /// Downtime target.
    pub target: Duration,
    /// Maximum pre-copy rounds (round 0 included).
    pub max_rounds: u32,
    /// Maximum pre-copy time.
    pub max_time: Duration,
    /// What to do at a limit.
    pub on_limit: OnLimit,
}

impl Default for DowntimePolicy {
    fn default() -> Self {
        Self {
            target: Duration::from_millis(50),
            max_rounds: 30,
            max_time: Duration::from_secs(300),
            on_limit: OnLimit::ForceBrownout,
        }
    }
}

impl ConvergencePolicy for DowntimePolicy {
    fn decide(&mut self, s: &PolicySnapshot<'_>) -> Decision {
        if s.predicted_downtime <= self.target {
            return Decision::Brownout(format!(
                "converged: predicted downtime {:.1} ms within target {} ms",
                s.predicted_downtime.as_secs_f64() * 1e3,
                self.target.as_millis()
            ));
        }
        let limit = if s.rounds >= self.max_rounds {
            Some(format!("round limit {} reached", self.max_rounds))
        } else if s.elapsed >= self.max_time {
            Some(format!("time limit {:?} reached", self.max_time))
        } else {
            None
        };
        match (limit, self.on_limit) {
            (None, _) => Decision::Continue,
            (Some(why), OnLimit::ForceBrownout) => Decision::Brownout(format!("forced: {why}")),
            (Some(why), OnLimit::Cancel) => Decision::Abort(format!("did not converge: {why}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(rounds: u32, ms: u64) -> PolicySnapshot<'static> {
        PolicySnapshot {
            rounds,
            elapsed: Duration::from_secs(1),
            remaining_pages: 10,
            predicted_downtime: Duration::from_millis(ms),
            history: &[],
            throttle_percent: 0,
        }
    }

    #[test]
    fn decides_by_target_and_limits() {
        let mut p = DowntimePolicy {
            max_rounds: 5,
            ..Default::default()
        };
        assert!(matches!(p.decide(&snap(1, 10)), Decision::Brownout(_)));
        assert_eq!(p.decide(&snap(1, 500)), Decision::Continue);
        assert!(
            matches!(p.decide(&snap(5, 500)), Decision::Brownout(r) if r.starts_with("forced"))
        );
        p.on_limit = OnLimit::Cancel;
        assert!(matches!(p.decide(&snap(5, 500)), Decision::Abort(_)));
    }
}
