//! Why receiving failed: [`ReceiveError`] and the typed parts it carries.

use std::time::Duration;

use super::setup_check::RefuseReason;
use super::{apply, outcomes, stray_note};
use crate::device::{ParticipantError, Veto};
use crate::memory::MemoryError;
use crate::proof::MemoryDigest;
use crate::transport::TransportError;
use crate::wire::control::RefuseCode;
use crate::wire::{PeerText, ProtocolViolation};

/// Why receiving failed. The destination discards everything it received.
///
/// Every cause this side finds is typed, and `source()` leads to the underlying
/// error; the source's own words (an abort reason) are [`PeerText`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// We refused the source (the reason was sent to it).
    #[error("refused the incoming migration ({code:?}): {reason}")]
    Refused {
        /// Code.
        code: RefuseCode,
        /// Why (its text is what the source was sent).
        #[source]
        reason: RefuseReason,
    },
    /// A participant vetoed (sent to the source).
    #[error("vetoed: {0}")]
    Vetoed(#[source] Veto),
    /// The memory digest did not match (sent to the source as a `memory` veto).
    #[error("memory verification failed: {0}")]
    VerifyFailed(DigestMismatch),
    /// The source cancelled.
    #[error("the source aborted the migration: {0}")]
    Aborted(PeerText),
    /// Page application failed (a broken, corrupt, truncated or out-of-order
    /// stream; the error says which kind).
    #[error("receiving pages failed: {0}")]
    Pages(#[source] apply::PageError),
    /// Transport failure.
    #[error("transport failed during {phase}: {source}")]
    Transport {
        /// Phase.
        phase: &'static str,
        /// Error.
        source: TransportError,
    },
    /// Waited for the source longer than the configured deadline.
    #[error("timed out during {phase} after {after:?}: {what}{}{}", last_stray_note(last_stray.as_deref()), stray_note(*stray_connections))]
    TimedOut {
        /// Phase.
        phase: &'static str,
        /// What did not arrive in time.
        what: Awaited,
        /// How long the receiver waited.
        after: Duration,
        /// Stray connections dropped while waiting.
        stray_connections: u32,
        /// Why the last stray connection was dropped, if one was.
        last_stray: Option<Box<StrayReason>>,
    },
    /// The source broke the protocol.
    #[error("protocol error during {phase}: {violation}")]
    Protocol {
        /// Phase.
        phase: &'static str,
        /// What was wrong.
        #[source]
        violation: ProtocolViolation,
    },
    /// Allocating the skeleton VM failed.
    #[error("allocating destination memory: {0}")]
    Memory(#[from] MemoryError),
    /// The outcome could not be recorded, so the destination discarded rather
    /// than commit without a record.
    #[error("recording the outcome: {0}")]
    OutcomeLog(#[from] outcomes::OutcomeLogError),
    /// A participant failed to restore.
    #[error("restoring device state: {0}")]
    Participant(#[from] ParticipantError),
    /// The connection broke during the rounds and the source did not resume the
    /// session within the resume window.
    #[error("{cause}; the source did not resume the session within {after:?}")]
    NotResumed {
        /// The resume window.
        after: Duration,
        /// Why the connection broke.
        #[source]
        cause: Box<ReceiveError>,
    },
}

/// The source's digest of what it sent differs from this side's digest of what
/// it applied ([`ReceiveError::VerifyFailed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("memory digest mismatch: source {sent} over {sent_pages} pages, destination {applied} over {pages} pages")]
pub struct DigestMismatch {
    /// The source's digest of every page it sent.
    pub sent: MemoryDigest,
    /// The guest's pages, as the source counts them.
    pub sent_pages: u64,
    /// This side's digest of every page it applied.
    pub applied: MemoryDigest,
    /// The guest's pages here.
    pub pages: u64,
}

/// What a receiver waited for when its deadline ran out
/// ([`ReceiveError::TimedOut`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Awaited {
    /// A connection opening with a valid `Hello`.
    #[error("no connection opened with a valid hello")]
    Hello,
    /// The session's page streams.
    #[error("only {arrived} of {expected} page streams arrived")]
    PageStreams {
        /// Streams that arrived.
        arrived: usize,
        /// Streams the session has.
        expected: u16,
    },
    /// A message from the source, as this fixed description names it.
    #[error("{0}")]
    Source(&'static str),
}

/// Why a connection was dropped as stray while the receiver waited.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StrayReason {
    /// It opened with a valid message that does not start a migration here.
    #[error("it opened with {0}")]
    OpenedWith(&'static str),
    /// Its `StreamHello` names a stream this session does not await.
    #[error("its stream hello (index {index}) is not one this session awaits")]
    UnawaitedStream {
        /// The stream index it named.
        index: u16,
    },
    /// It sent nothing valid in time (closed, silent, garbage).
    #[error("{0}")]
    Transport(#[source] TransportError),
    /// A `Hello` of another session while one waits for its source to start over.
    #[error("it is a hello of another session")]
    OtherSession,
}

fn last_stray_note(last: Option<&StrayReason>) -> String {
    last.map(|why| format!("; the last stray connection was dropped because {why}"))
        .unwrap_or_default()
}
