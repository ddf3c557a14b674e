//! The destination's side of the ownership handoff (docs/PROTOCOL.md, "Commit and
//! ownership"), and its heartbeat answers.
//!
//! The destination owns the VM from the moment it has restored every participant
//! and recorded `committed` (before it sends `Committed`). Until it receives
//! `Released` it has restored nothing and discards on any failure; after
//! `Released` a broken channel does not stop it (the source is in doubt and will
//! ask), and a failed restore discards and answers `Error`. Every transition is one
//! arm of [`DestState::on`].

use crate::transport::framed::FrameReader;
use crate::transport::TransportError;
use crate::wire::control::SessionOutcome;
use crate::wire::ControlMsg;

/// The destination's commit state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestState {
    /// Receiving pages, device state and `Commit`.
    Receiving,
    /// Memory verified, every participant validated, `Prepared` sent: waiting for
    /// `Released`. Nothing is restored.
    Prepared,
    /// `Released` received: restoring. The source no longer runs the VM.
    Restoring,
    /// Terminal: restored and recorded; the VM runs here.
    Committed,
    /// Terminal: everything dropped.
    Discarded,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestEvent {
    /// Everything verified and validated; `Prepared` is sent right after the
    /// record of this transition.
    PreparedSent,
    /// `Released` arrived.
    Released,
    /// Every participant restored.
    Restored,
    /// A participant failed to restore.
    RestoreFailed,
    /// Abort, timeout, a broken or garbled channel, a veto, a bad digest.
    Failed,
}

impl DestState {
    /// The next state. After `Released`, only a restore failure discards: a
    /// channel failure no longer matters to the outcome.
    pub fn on(self, e: DestEvent) -> DestState {
        use DestEvent as E;
        use DestState as S;
        match (self, e) {
            (S::Receiving, E::PreparedSent) => S::Prepared,
            (S::Receiving, _) => S::Discarded,
            (S::Prepared, E::Released) => S::Restoring,
            (S::Prepared, _) => S::Discarded,
            (S::Restoring, E::Restored) => S::Committed,
            (S::Restoring, E::RestoreFailed) => S::Discarded,
            (S::Restoring, _) => S::Restoring,
            (S::Committed, _) => S::Committed,
            (S::Discarded, _) => S::Discarded,
        }
    }

    /// What an outcome query about this session is answered.
    pub fn outcome(self) -> SessionOutcome {
        match self {
            Self::Receiving | Self::Discarded => SessionOutcome::Discarded,
            Self::Prepared | Self::Restoring => SessionOutcome::InProgress,
            Self::Committed => SessionOutcome::Committed,
        }
    }
}

/// Answer a source heartbeat with the same sequence number.
pub fn answer_heartbeat(control: &mut FrameReader, seq: u64) -> Result<(), TransportError> {
    control.send_control(&ControlMsg::Heartbeat { seq }, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use DestEvent as E;
    use DestState as S;

    #[test]
    fn nothing_before_released_commits_and_nothing_after_it_but_a_restore_failure_discards() {
        for e in [E::Released, E::Restored, E::RestoreFailed, E::Failed] {
            assert_eq!(S::Receiving.on(e), S::Discarded, "{e:?}");
        }
        for e in [E::PreparedSent, E::Restored, E::RestoreFailed, E::Failed] {
            assert_eq!(S::Prepared.on(e), S::Discarded, "{e:?}");
        }
        assert_eq!(S::Prepared.on(E::Released), S::Restoring);
        assert_eq!(S::Restoring.on(E::Failed), S::Restoring);
        assert_eq!(S::Restoring.on(E::Restored), S::Committed);
        assert_eq!(S::Restoring.on(E::RestoreFailed), S::Discarded);
        assert_eq!(S::Prepared.outcome(), SessionOutcome::InProgress);
        assert_eq!(S::Committed.outcome(), SessionOutcome::Committed);
    }
}
