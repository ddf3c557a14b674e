//! Device-state participants: the runtime state that moves at brownout.
//!
//! The order mirrors Hyper-V's switch-port handoff (see [`switch_port`]):
//!
//! 1. setup, before any page moves: the destination's [`RestoreState::validate_setup`]
//!    checks the source's [`SaveState::setup_info`] and may veto (the validation
//!    port and its policy check), then prepares (the operational port);
//! 2. brownout, VM paused: the source's [`SaveState::save`];
//! 3. the destination verifies memory and runs [`RestoreState::validate_state`] for
//!    *every* participant (a last veto point) and answers `Prepared`;
//! 4. the source's [`SaveState::release`] (NIC disconnect, NIC delete, port
//!    teardown, port delete) and `Released`;
//! 5. the destination's [`RestoreState::restore`] (NIC create, NIC connect, runtime
//!    data) and `Committed`; then the source's [`SaveState::committed`].
//!
//! Failure rule: until the destination answers `Committed` the source VM keeps (or
//! resumes) running. A failure before step 4 needs no device work on the source
//! (nothing was torn down). A failure after step 4 (a destination restore error, a
//! lost connection) calls [`SaveState::rolled_back`], which must re-create whatever
//! `release` tore down. Releasing only after the destination validated everything
//! keeps that window as small as the spec's order allows. The destination calls
//! [`RestoreState::discard`] on every failure.
//!
//! State travels inside a versioned, checksummed [`envelope`].

pub mod envelope;
pub mod slow_disk;
pub mod switch_port;

/// A participant refused the migration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("participant {participant} vetoed: {reason}")]
pub struct Veto {
    /// Which participant.
    pub participant: String,
    /// Why, for the operator.
    pub reason: String,
}

/// A participant failed while saving or restoring.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParticipantError {
    /// The participant's own failure.
    #[error("participant {participant}: {message}")]
    Failed {
        /// Which participant.
        participant: String,
        /// What went wrong.
        message: String,
    },
    /// The participant's own failure, as its error type (match it with
    /// `source()` and `downcast_ref`). Build it with [`ParticipantError::device`].
    #[error("participant {participant}: {source}")]
    Device {
        /// Which participant.
        participant: String,
        /// The device's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No participant on this side has that id (as the peer named it).
    #[error("no participant with id {0:?} on the destination")]
    Unknown(crate::wire::PeerText),
}

impl ParticipantError {
    /// Participant `participant` failed with its own error `source` (kept as the
    /// error's `source()`).
    pub fn device(
        participant: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Device {
            participant: participant.into(),
            source: source.into(),
        }
    }
}

/// Source side of a device: saves its runtime state at brownout.
pub trait SaveState: Send {
    /// Stable id shared with the destination's [`RestoreState`] (e.g. "vcpu0", "port:eth0").
    fn id(&self) -> &str;
    /// Format version of the saved blob.
    fn version(&self) -> u32;
    /// Opaque configuration the destination's participant validates at setup, before
    /// any page moves (e.g. a port's policy parameters). Empty when there is none.
    fn setup_info(&self) -> Vec<u8>;
    /// Save the runtime state (VM paused). Appends to `out`.
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError>;
    /// The destination validated every participant's state: give up the device so
    /// the destination can take it over (a switch port's NIC disconnect, NIC delete,
    /// port teardown and port delete; a pass-through disk's ownership). The VM is
    /// paused. An error aborts the migration and rolls every participant back.
    fn release(&mut self) -> Result<(), ParticipantError>;
    /// The destination committed: drop what is left of the source-side device.
    fn committed(&mut self);
    /// The migration failed after `save` (and possibly after `release`): the source
    /// VM resumes, so put the device back into service, re-creating whatever
    /// `release` tore down.
    fn rolled_back(&mut self);
}

/// Destination side of a device: validates, then restores.
pub trait RestoreState: Send {
    /// Id matching the source's [`SaveState::id`].
    fn id(&self) -> &str;
    /// Check the source's setup info before any page moves (may veto).
    fn validate_setup(&mut self, info: &[u8]) -> Result<(), Veto>;
    /// Check the incoming state blob (may veto). Runs for every participant before any
    /// participant restores.
    fn validate_state(&mut self, version: u32, blob: &[u8]) -> Result<(), Veto>;
    /// Restore the state (only after every participant validated).
    fn restore(&mut self, version: u32, blob: &[u8]) -> Result<(), ParticipantError>;
    /// The migration was abandoned: discard anything prepared.
    fn discard(&mut self);
}
