//! The typed causes inside [`super::MigrationError`]: why pages could not be
//! sent, why an outcome stayed unknown, and a worker's panic.

use std::fmt;
use std::sync::Arc;

use super::commit::SourceState;
use super::MigrationError;
use crate::codec::CodecError;
use crate::memory::MemoryError;
use crate::transport::TransportError;
use crate::wire::control::SessionOutcome;

/// Why sending pages failed (inside [`MigrationError::Send`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// Pages were queued after the page workers had been stopped.
    #[error("the page workers were stopped")]
    WorkersStopped,
    /// The round gate was aborted without a worker recording why.
    #[error("the round gate was aborted")]
    GateAborted,
    /// One page stream could not send a batch.
    #[error("page stream {stream}: {source}")]
    Stream {
        /// Page stream index.
        stream: usize,
        /// What failed (shared: every check of the failed worker sees it).
        #[source]
        source: Arc<StreamFailure>,
    },
}

/// Why a page stream's worker could not send a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamFailure {
    /// Writing the frame failed (not a lost connection: those are
    /// [`MigrationError::PageStreamLost`]).
    #[error("{0}")]
    Write(#[source] TransportError),
    /// Reading the batch's pages out of guest memory failed.
    #[error("reading guest memory: {0}")]
    Memory(#[source] MemoryError),
    /// Compressing the batch failed.
    #[error("encoding the batch: {0}")]
    Codec(#[source] CodecError),
}

/// The message of a page worker's panic (inside
/// [`MigrationError::WorkerPanicked`]).
///
/// A panic's payload is whatever `panic!` was given: in practice a `&str` or a
/// `String` formatted by the code that panicked (ours, or a `Stream`
/// implementation's), with no type to keep. Its text is all there is, so it stays
/// text here, in a type of its own that says where it came from; a payload of
/// another type shows as "a non-text payload".
#[derive(Clone, PartialEq, Eq)]
pub struct PanicMessage(String);

impl PanicMessage {
    /// The message of the panic payload `p`.
    pub fn of(p: &(dyn std::any::Any + Send)) -> Self {
        Self(
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic with a non-text payload".into()),
        )
    }

    /// The panic's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PanicMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PanicMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Why the source is in doubt (inside [`MigrationError::InDoubt`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DoubtReason {
    /// The channel broke after the source released the VM, and asking the
    /// destination for the outcome did not give a final answer in time.
    #[error("{broke}; then asking the destination: {asked}")]
    Unanswered {
        /// What broke the channel.
        #[source]
        broke: Box<MigrationError>,
        /// Why asking did not settle it.
        asked: OutcomeUnknown,
    },
    /// The switchover stopped in a state that is not an outcome.
    #[error("switchover stopped in state {0:?}")]
    Stopped(SourceState),
}

/// Why asking the destination for a session's outcome
/// ([`super::commit::resolve`]) gave no final answer before its deadline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutcomeUnknown {
    /// The deadline passed before any attempt was answered.
    #[error("no answer")]
    NoAnswer,
    /// The destination's last answer was not final (the session is still in
    /// progress there).
    #[error("the destination answered {}", .0.name())]
    NotFinal(SessionOutcome),
    /// The last attempt failed (connection, transport, or the destination's error).
    #[error("{0}")]
    Query(#[source] Box<MigrationError>),
}

/// A veto received from the destination, its fields sanitized as
/// [`crate::wire::PeerText`] before anything displays them.
pub(crate) fn peer_veto(participant: String, reason: String) -> crate::device::Veto {
    crate::device::Veto {
        participant: crate::wire::PeerText::new(participant).to_string(),
        reason: crate::wire::PeerText::new(reason).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;
    use crate::wire::PeerText;

    /// Every error in `e`'s `source()` chain, outermost first.
    fn chain<'a>(e: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
        std::iter::successors(Some(e), |&e| e.source()).collect()
    }

    #[test]
    fn a_memory_error_inside_a_send_failure_is_reachable_through_source() {
        let e = MigrationError::Send(SendError::Stream {
            stream: 1,
            source: Arc::new(StreamFailure::Memory(MemoryError::ReadOnly)),
        });
        let links = chain(&e);
        let memory = links
            .iter()
            .find_map(|l| l.downcast_ref::<MemoryError>())
            .expect("the chain reaches the memory error");
        assert!(matches!(memory, MemoryError::ReadOnly));
        assert!(links
            .iter()
            .any(|l| l.downcast_ref::<Arc<StreamFailure>>().is_some()));
        // The outermost message still says all of it.
        let shown = e.to_string();
        assert!(shown.contains("page stream 1"), "{shown}");
        assert!(shown.contains("region is read-only"), "{shown}");
    }

    #[test]
    fn in_doubt_keeps_what_broke_the_channel_as_its_source() {
        let broke = MigrationError::Remote(PeerText::new("gone"));
        let e = MigrationError::InDoubt {
            session: crate::session::SessionToken::from_bytes([7; 16]),
            reason: DoubtReason::Unanswered {
                broke: Box::new(broke),
                asked: OutcomeUnknown::NoAnswer,
            },
        };
        let links = chain(&e);
        assert!(
            links.iter().any(|l| matches!(
                l.downcast_ref::<Box<MigrationError>>().map(|b| &**b),
                Some(MigrationError::Remote(t)) if t.as_str() == "gone"
            )),
            "{links:?}"
        );
        let shown = e.to_string();
        assert!(
            shown.contains("gone; then asking the destination: no answer"),
            "{shown}"
        );
        assert!(!e.source_running());
    }

    #[test]
    fn a_hostile_remote_message_is_displayed_sanitized() {
        let e = MigrationError::Remote(PeerText::new("boom\x1b[2J\r\nFAKE LOG LINE"));
        let shown = e.to_string();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(
            shown.contains("boom\\u{1b}[2J\\r\\nFAKE LOG LINE"),
            "{shown}"
        );
    }
}
