//! Judging a run against the paused source: completed and verified, failed
//! cleanly, or in doubt and then resolved, and never both running.
//!
//! [`judge`] is a pure function of what was observed ([`Observed`]), so that
//! every rule can be tested by feeding it a broken run.

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use crate::wire::control::SessionOutcome;

/// How the source's `Migration::run` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEnd {
    /// `Ok(report)`.
    Completed {
        /// The report says the destination's memory was verified.
        verified: bool,
        /// The report says the migration resumed after a broken connection
        /// (`resumed`, or `reconnects` > 0).
        resumed: bool,
    },
    /// An error other than in doubt.
    Failed {
        /// The error, for the record.
        error: String,
        /// `MigrationError::source_running` (what the error claims).
        claims_running: bool,
    },
    /// `MigrationError::InDoubt`, then resolved as `livemig resolve` does.
    InDoubt {
        /// The destination's answer (`None`: no final answer).
        resolved: Option<SessionOutcome>,
    },
}

/// Everything the judge looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The source's result.
    pub source: SourceEnd,
    /// The destination's outcome record (after a kill: what a restarted
    /// destination loads) says `committed`.
    pub dest_committed: bool,
    /// Pages where the destination's memory differs from the paused source's
    /// (`None`: no destination memory to compare, e.g. it failed).
    pub dest_pages_differing: Option<u64>,
    /// Source pages that break the shadow model (the engine wrote to them, or
    /// the VM lost writes).
    pub source_model_mismatches: u64,
    /// The source VM runs after the run (and after acting on a resolution): the
    /// ledger says so and the guest writes.
    pub source_running_after: bool,
    /// The destination runs the VM after the run.
    pub dest_running_after: bool,
    /// Some instant had both running.
    pub both_running: bool,
}

/// A run's classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Migrated and verified; the destination runs the VM.
    Completed,
    /// Failed; the source runs, its memory intact.
    FailedClean,
    /// In doubt, then resolved through the destination's record, consistently.
    InDoubtResolved,
    /// None of the above: an invariant broke (see the problems).
    Broken,
}

impl Outcome {
    /// Name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::FailedClean => "failed_clean",
            Self::InDoubtResolved => "in_doubt_resolved",
            Self::Broken => "broken",
        }
    }
}

/// The judge's verdict on one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The class.
    pub outcome: Outcome,
    /// Completed by resuming a broken connection.
    pub resumed: bool,
    /// Pages lost: destination pages differing from the source where the
    /// destination took the VM.
    pub pages_lost: u64,
    /// A failed (or resolved-discarded) run left the source damaged or not running.
    pub source_damaged: bool,
    /// Both ran the VM at some instant.
    pub both_running: bool,
    /// What broke, in words.
    pub problems: Vec<String>,
}

/// Judge one run.
pub fn judge(o: &Observed) -> Verdict {
    let mut problems = Vec::new();
    let mut pages_lost = 0;
    let mut source_damaged = false;
    let mut resumed = false;
    if o.both_running {
        problems.push("both sides ran the VM at the same time".to_string());
    }
    if o.source_model_mismatches > 0 {
        source_damaged = true;
        problems.push(format!(
            "{} source page(s) differ from what the guest wrote",
            o.source_model_mismatches
        ));
    }
    // The destination took the VM: its memory must be the paused source's.
    let mut check_dest = |problems: &mut Vec<String>| {
        if !o.dest_committed {
            problems.push("the destination has no committed record".into());
        }
        if o.source_running_after {
            problems.push("the source runs although the destination took the VM".into());
        }
        match o.dest_pages_differing {
            Some(0) => {}
            Some(n) => {
                pages_lost = n;
                problems.push(format!("{n} destination page(s) differ from the source"));
            }
            None => problems.push("no destination memory to compare".into()),
        }
    };
    // The source kept (or got back) the VM: it must run, the destination not.
    let mut check_source = |problems: &mut Vec<String>| {
        if !o.source_running_after {
            source_damaged = true;
            problems.push("the source VM does not run".into());
        }
        if o.dest_running_after || o.dest_committed {
            problems.push("the destination kept the VM although the source runs".into());
        }
    };
    let outcome = match &o.source {
        SourceEnd::Completed {
            verified,
            resumed: r,
        } => {
            resumed = *r;
            if !verified {
                problems.push("the report does not say verified".into());
            }
            check_dest(&mut problems);
            Outcome::Completed
        }
        SourceEnd::Failed {
            error,
            claims_running,
        } => {
            if !claims_running {
                problems.push(format!("the error says the source does not run: {error}"));
            }
            check_source(&mut problems);
            Outcome::FailedClean
        }
        SourceEnd::InDoubt { resolved } => {
            match resolved {
                Some(SessionOutcome::Committed) => check_dest(&mut problems),
                Some(SessionOutcome::Discarded) => check_source(&mut problems),
                other => problems.push(format!("in doubt and unresolved ({other:?})")),
            }
            Outcome::InDoubtResolved
        }
    };
    Verdict {
        outcome: if problems.is_empty() {
            outcome
        } else {
            Outcome::Broken
        },
        resumed: resumed && problems.is_empty(),
        pages_lost,
        source_damaged,
        both_running: o.both_running,
        problems,
    }
}

/// Pages whose content differs between `a` and `b` (or all of them if the
/// sizes differ).
pub fn differing_pages(a: &GuestMemory, b: &GuestMemory) -> Result<u64, MemoryError> {
    if a.total_pages() != b.total_pages() {
        return Ok(a.total_pages().max(b.total_pages()));
    }
    let mut x = vec![0u8; PAGE_SIZE];
    let mut y = vec![0u8; PAGE_SIZE];
    let mut n = 0;
    for p in 0..a.total_pages() {
        a.read_pages(p, &mut x)?;
        b.read_pages(p, &mut y)?;
        n += u64::from(x != y);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed_clean() -> Observed {
        Observed {
            source: SourceEnd::Failed {
                error: "transport".into(),
                claims_running: true,
            },
            dest_committed: false,
            dest_pages_differing: None,
            source_model_mismatches: 0,
            source_running_after: true,
            dest_running_after: false,
            both_running: false,
        }
    }

    fn completed() -> Observed {
        Observed {
            source: SourceEnd::Completed {
                verified: true,
                resumed: false,
            },
            dest_committed: true,
            dest_pages_differing: Some(0),
            source_model_mismatches: 0,
            source_running_after: false,
            dest_running_after: true,
            both_running: false,
        }
    }

    #[test]
    fn clean_runs_are_classified() {
        assert_eq!(judge(&failed_clean()).outcome, Outcome::FailedClean);
        let v = judge(&completed());
        assert_eq!(v.outcome, Outcome::Completed);
        assert_eq!(v.pages_lost, 0);
        let mut o = completed();
        o.source = SourceEnd::InDoubt {
            resolved: Some(SessionOutcome::Committed),
        };
        assert_eq!(judge(&o).outcome, Outcome::InDoubtResolved);
        let mut o = failed_clean();
        o.source = SourceEnd::InDoubt {
            resolved: Some(SessionOutcome::Discarded),
        };
        assert_eq!(judge(&o).outcome, Outcome::InDoubtResolved);
    }

    #[test]
    fn a_damaged_source_is_reported() {
        let mut o = failed_clean();
        o.source_model_mismatches = 3;
        let v = judge(&o);
        assert_eq!(v.outcome, Outcome::Broken);
        assert!(v.source_damaged, "{v:?}");
        let mut o = failed_clean();
        o.source_running_after = false;
        let v = judge(&o);
        assert!(v.source_damaged && v.outcome == Outcome::Broken, "{v:?}");
    }

    #[test]
    fn lost_pages_split_brain_and_unresolved_doubt_break_the_run() {
        let mut o = completed();
        o.dest_pages_differing = Some(2);
        let v = judge(&o);
        assert_eq!((v.outcome, v.pages_lost), (Outcome::Broken, 2));
        let mut o = completed();
        o.both_running = true;
        let v = judge(&o);
        assert!(v.both_running && v.outcome == Outcome::Broken);
        let mut o = failed_clean();
        o.dest_committed = true;
        assert_eq!(judge(&o).outcome, Outcome::Broken);
        let mut o = failed_clean();
        o.source = SourceEnd::InDoubt { resolved: None };
        assert_eq!(judge(&o).outcome, Outcome::Broken);
        let mut o = completed();
        o.source = SourceEnd::Completed {
            verified: false,
            resumed: false,
        };
        assert_eq!(judge(&o).outcome, Outcome::Broken);
    }

    #[test]
    fn differing_pages_counts_pages() {
        let a = GuestMemory::anonymous(4 * PAGE_SIZE, false).unwrap();
        let b = GuestMemory::anonymous(4 * PAGE_SIZE, false).unwrap();
        assert_eq!(differing_pages(&a, &b).unwrap(), 0);
        b.write_pages(2, &[7u8; PAGE_SIZE]).unwrap();
        assert_eq!(differing_pages(&a, &b).unwrap(), 1);
    }
}
