//! What a peer did that the protocol forbids, as a type both sides share.

use super::WireError;

/// How the peer broke the protocol (docs/PROTOCOL.md): a message out of place, a
/// capability missing for what was asked, or a message whose content breaks its
/// rules. Carried by `MigrationError::Protocol` and `ReceiveError::Protocol`
/// with the phase it happened in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// A control message the state machine does not allow here.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the state allowed (e.g. `"welcome or refuse"`).
        expected: &'static str,
        /// The message that came instead (its [`super::ControlMsg::name`]).
        got: &'static str,
    },
    /// The peer lacks a capability the configuration requires.
    #[error("{wanted} was requested but the destination lacks the {capability} capability")]
    MissingCapability {
        /// The capability string (see [`super::CAPABILITIES`]).
        capability: &'static str,
        /// The feature that needs it.
        wanted: &'static str,
    },
    /// A message whose content breaks its rules.
    #[error(transparent)]
    Malformed(#[from] WireError),
    /// The control stream went away without a transport error (the thread that
    /// held it ended): the exchange cannot go on.
    #[error("the control stream was lost ({0})")]
    ControlLost(&'static str),
    /// The exchange ended in a state that names no outcome.
    #[error("the {0} ended without an outcome")]
    NoOutcome(&'static str),
    /// A message that needs a session before one was established.
    #[error("{0} arrived before the session was established")]
    NoSession(&'static str),
}
