//! The source's side of the ownership handoff (docs/PROTOCOL.md, "Commit and
//! ownership"), and how a source in doubt learns the outcome.
//!
//! Ownership of the VM passes from the source the moment it sends `Released`:
//! before that, any failure resumes the source (the destination has restored
//! nothing and discards). After it, only the destination's answer (`Committed`, or
//! `Error`/`Veto`, after which it discarded) or its outcome record decides; a source
//! that cannot learn it stays paused and reports [`MigrationError::InDoubt`].
//! Every transition is one arm of [`SourceState::on`].

use std::time::{Duration, Instant};

use super::{MigrationError, OutcomeUnknown};
use crate::transport::framed::FrameReader;
use crate::transport::Connector;
use crate::wire::control::{SessionId, SessionOutcome};
use crate::wire::{ControlMsg, ProtocolViolation};

/// Who may run the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The source (it runs the VM, or resumes it on failure).
    Source,
    /// The destination.
    Destination,
    /// Not known to the source: it keeps the VM paused.
    Unknown,
}

/// The source's commit state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Pre-copy rounds; the VM runs here.
    Running,
    /// Paused; final pages, device state and `Commit` being sent.
    Paused,
    /// `Commit` sent; waiting for `Prepared`.
    AwaitPrepared,
    /// `Prepared` received; participants releasing their devices.
    Releasing,
    /// `Released` sent: the VM is no longer the source's to resume. Waiting for
    /// `Committed`.
    AwaitCommitted,
    /// The channel broke (or went silent, or carried garbage) after `Released`:
    /// asking the destination for the outcome.
    InDoubt,
    /// Terminal: the destination runs the VM.
    Committed,
    /// Terminal: the source runs the VM again (rolled back if it had released).
    Resumed,
    /// Terminal: the outcome could not be learned; the VM stays paused.
    Unresolved,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEvent {
    /// `VmControl::pause` succeeded.
    Paused,
    /// `Commit` was sent.
    CommitSent,
    /// `Prepared` arrived (within the brownout deadline).
    Prepared,
    /// Every participant released; `Released` is being written (a failed write
    /// may still have delivered it).
    ReleasedSent,
    /// `Committed` arrived.
    Committed,
    /// The destination answered `Veto` or `Error`: it discarded.
    Refused,
    /// A local or transport failure, a timeout, a cancel, or a bad frame.
    Failed,
    /// An outcome query answered committed or discarded.
    Learned(SessionOutcome),
    /// No final answer within the outcome deadline.
    GaveUp,
}

impl SourceState {
    /// The next state. Total: every (state, event) pair has an arm, and none
    /// after `ReleasedSent` leads to `Resumed` without the destination's word.
    pub fn on(self, e: SourceEvent) -> SourceState {
        use SourceEvent as E;
        use SourceState as S;
        match (self, e) {
            (S::Running, E::Paused) => S::Paused,
            (S::Running, _) => S::Resumed,
            (S::Paused, E::CommitSent) => S::AwaitPrepared,
            (S::Paused, _) => S::Resumed,
            (S::AwaitPrepared, E::Prepared) => S::Releasing,
            (S::AwaitPrepared, _) => S::Resumed,
            (S::Releasing, E::ReleasedSent) => S::AwaitCommitted,
            // A participant failed to release, or `Released` could not be written:
            // the destination cannot restore without it.
            (S::Releasing, _) => S::Resumed,
            (S::AwaitCommitted, E::Committed) => S::Committed,
            (S::AwaitCommitted, E::Refused) => S::Resumed,
            (S::AwaitCommitted, _) => S::InDoubt,
            (S::InDoubt, E::Learned(SessionOutcome::Committed)) => S::Committed,
            (S::InDoubt, E::Learned(SessionOutcome::Discarded)) => S::Resumed,
            (S::InDoubt, E::GaveUp) => S::Unresolved,
            (S::InDoubt, _) => S::InDoubt,
            (S::Committed, _) => S::Committed,
            (S::Resumed, _) => S::Resumed,
            (S::Unresolved, E::Learned(SessionOutcome::Committed)) => S::Committed,
            (S::Unresolved, E::Learned(SessionOutcome::Discarded)) => S::Resumed,
            (S::Unresolved, _) => S::Unresolved,
        }
    }

    /// Who may run the VM in this state.
    pub fn owner(self) -> Owner {
        match self {
            Self::Running
            | Self::Paused
            | Self::AwaitPrepared
            | Self::Releasing
            | Self::Resumed => Owner::Source,
            Self::AwaitCommitted | Self::InDoubt | Self::Unresolved => Owner::Unknown,
            Self::Committed => Owner::Destination,
        }
    }
}

/// Ask the destination (through `connector`, i.e. any of its addresses) what
/// became of `session`, once. Sends `OutcomeKnown` after a final answer.
pub fn query_outcome(
    connector: &dyn Connector,
    session: SessionId,
    timeout: Duration,
) -> Result<SessionOutcome, MigrationError> {
    let t = |source| MigrationError::Transport {
        phase: "outcome query",
        source,
    };
    let stream = connector.connect().map_err(t)?;
    stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(|e| {
            t(crate::transport::TransportError::Io {
                what: "control",
                source: e,
            })
        })?;
    let mut c = FrameReader::new(stream, "control");
    c.send_control(&ControlMsg::QueryOutcome { session }, &[])
        .map_err(t)?;
    match c.control().map_err(t)?.0 {
        ControlMsg::Outcome {
            session: s,
            outcome,
        } if s == session => {
            if outcome.is_final() {
                let _ = c.send_control(&ControlMsg::OutcomeKnown { session }, &[]);
            }
            Ok(outcome)
        }
        ControlMsg::Error { message } => Err(MigrationError::Remote(message.into())),
        other => Err(MigrationError::Protocol {
            phase: "outcome query",
            violation: ProtocolViolation::Unexpected {
                expected: "this session's outcome",
                got: other.name(),
            },
        }),
    }
}

/// Ask until a final answer (committed or discarded) or `deadline`, with backoff
/// between attempts. `Err` carries the last reason the outcome stayed unknown.
pub fn resolve(
    connector: &dyn Connector,
    session: SessionId,
    per_try: Duration,
    deadline: Instant,
) -> Result<SessionOutcome, OutcomeUnknown> {
    let mut backoff = Duration::from_millis(50);
    let mut last = OutcomeUnknown::NoAnswer;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last);
        }
        match query_outcome(connector, session, per_try.min(left)) {
            Ok(o) if o.is_final() => return Ok(o),
            Ok(o) => last = OutcomeUnknown::NotFinal(o),
            Err(e) => last = OutcomeUnknown::Query(Box::new(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SourceEvent as E;
    use SourceState as S;

    const ALL_EVENTS: [SourceEvent; 11] = [
        E::Paused,
        E::CommitSent,
        E::Prepared,
        E::ReleasedSent,
        E::Committed,
        E::Refused,
        E::Failed,
        E::Learned(SessionOutcome::Committed),
        E::Learned(SessionOutcome::Discarded),
        E::Learned(SessionOutcome::Unknown),
        E::GaveUp,
    ];

    #[test]
    fn the_happy_path_hands_the_vm_over() {
        let s = [
            E::Paused,
            E::CommitSent,
            E::Prepared,
            E::ReleasedSent,
            E::Committed,
        ]
        .into_iter()
        .fold(S::Running, S::on);
        assert_eq!(s, S::Committed);
        assert_eq!(s.owner(), Owner::Destination);
    }

    #[test]
    fn before_released_every_failure_resumes() {
        for s in [S::Running, S::Paused, S::AwaitPrepared, S::Releasing] {
            for e in [E::Failed, E::Refused, E::GaveUp] {
                assert_eq!(s.on(e), S::Resumed, "{s:?} + {e:?}");
            }
        }
    }

    #[test]
    fn after_released_only_the_destination_can_give_the_vm_back() {
        // From every state where ownership is unknown, no event but an explicit
        // refusal or a "discarded" answer leads to Resumed.
        for s in [S::AwaitCommitted, S::InDoubt, S::Unresolved] {
            assert_eq!(s.owner(), Owner::Unknown);
            for e in ALL_EVENTS {
                let n = s.on(e);
                if n == S::Resumed {
                    assert!(
                        matches!(e, E::Refused | E::Learned(SessionOutcome::Discarded)),
                        "{s:?} + {e:?} resumed the source"
                    );
                }
            }
        }
        assert_eq!(S::AwaitCommitted.on(E::Failed), S::InDoubt);
        assert_eq!(
            S::InDoubt.on(E::Learned(SessionOutcome::Unknown)),
            S::InDoubt
        );
        assert_eq!(S::InDoubt.on(E::GaveUp), S::Unresolved);
    }
}
