//! Device-state participants: the runtime state that moves at brownout.
//!
//! The order mirrors Hyper-V's switch-port handoff: on the destination every
//! participant first **validates** (and may veto) during setup and again when its
//! state arrives; on the source each participant **saves** its state while the VM is
//! paused; the destination **restores** only after *every* participant validated.
//! State travels inside a versioned, checksummed [`envelope`].

pub mod envelope;

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
pub enum ParticipantError {
    /// The participant's own failure.
    #[error("participant {participant}: {message}")]
    Failed {
        /// Which participant.
        participant: String,
        /// What went wrong.
        message: String,
    },
    /// No participant on this side has that id.
    #[error("no participant with id {0:?} on the destination")]
    Unknown(String),
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
    /// The destination committed: release source-side resources.
    fn committed(&mut self);
    /// The migration failed after `save`: the source VM resumes, put the device back
    /// into service.
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
