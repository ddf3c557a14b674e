//! Setup-stage checks on the destination: everything that can refuse a migration
//! before any page moves.
//!
//! Order: protocol version and host capacity at handshake ([`check_version`], the
//! [`super::HostLimiter`]); then, on the `Setup` message, memory layout → CPU
//! features → virtual switch names → attachment index → the hypervisor's own check →
//! each participant's `validate_setup` (the switch port's validation port and policy
//! check: the veto point). Each refusal has its own [`RefuseCode`] and message; none
//! panics and none costs a page transfer.

use super::{host_memory, Receiver};
use crate::device::Veto;
use crate::memory::{MemoryLayout, PAGE_SIZE};
use crate::wire::control::{CompatVector, RefuseCode};
use crate::wire::frame::AttachmentCaps;
use crate::wire::{PROTOCOL_MAJOR, PROTOCOL_MINOR};

/// Default for `ReceiverConfig::max_rounds`: far more than any converging
/// migration needs (the source's own default limit is in the tens), small enough
/// that a source cannot keep a receiver busy forever.
pub const DEFAULT_MAX_ROUNDS: u32 = 10_000;
/// Default for `ReceiverConfig::max_setup_attachment` (1 MiB): a VM config blob and
/// participants' setup info are small.
pub const DEFAULT_MAX_SETUP_ATTACHMENT: usize = 1 << 20;
/// Default for `ReceiverConfig::max_device_state` (64 MiB, the protocol's bound on
/// a control attachment): vCPU and device state of a large VM fits.
pub const DEFAULT_MAX_DEVICE_STATE: usize = crate::wire::MAX_CONTROL_DATA;

impl super::ReceiverConfig {
    /// Attachment caps while waiting for `Setup`.
    pub fn setup_caps(&self) -> AttachmentCaps {
        AttachmentCaps {
            setup: self.max_setup_attachment,
            device_state: 0,
            resumed: 0,
        }
    }
    /// Attachment caps during rounds, brownout and commit (only `DeviceState`).
    pub fn rounds_caps(&self) -> AttachmentCaps {
        AttachmentCaps {
            setup: 0,
            device_state: self.max_device_state,
            resumed: 0,
        }
    }
}

/// What the destination host offers, checked against the source's setup.
#[derive(Debug, Clone, Default)]
pub struct HostCaps {
    /// CPU features this host has (None: don't check).
    pub cpu_features: Option<Vec<String>>,
    /// Virtual switches that exist here (None: don't check).
    pub switches: Option<Vec<String>>,
    /// Largest guest memory this host accepts (bytes; None: no limit).
    pub max_memory: Option<u64>,
}

/// Why setup was refused.
pub(super) enum Refusal {
    /// A host-level check failed.
    Refuse(RefuseCode, String),
    /// A participant vetoed.
    Veto(Veto),
}

/// Is a source speaking `major.minor` (handshake magic `magic`) supported? The
/// destination accepts its own major with the current or the previous minor.
pub fn check_version(magic: &str, major: u16, minor: u16) -> Result<(), String> {
    if magic != "livemig" {
        return Err(format!(
            "bad handshake magic {magic:?}: the peer is not a livemig source"
        ));
    }
    let previous = PROTOCOL_MINOR.saturating_sub(1);
    if major != PROTOCOL_MAJOR || !(previous..=PROTOCOL_MINOR).contains(&minor) {
        let accepted = if previous == PROTOCOL_MINOR {
            format!("only {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}")
        } else {
            format!("{PROTOCOL_MAJOR}.{previous} to {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}")
        };
        return Err(format!(
            "protocol version {major}.{minor} is not supported: this destination speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR} and accepts {accepted}"
        ));
    }
    Ok(())
}

/// Bytes the receiver keeps per guest page besides the page itself: the applied
/// hash (8), the round stamp (4) and a bit in the touched bitmap.
pub const RECEIVE_TABLE_BYTES_PER_PAGE: u64 = 13;

/// Refuse a skeleton VM this receiver cannot commit: the guest's memory plus the
/// receive tables against `max_memory` or, when unset, what the host can commit
/// ([`host_memory::committable`]). Checked before anything is mapped, so a guest
/// too large is a refusal naming memory rather than an OOM kill mid-transfer.
pub(super) fn check_memory_bound(guest_bytes: u64, max_memory: Option<u64>) -> Result<(), Refusal> {
    let (available, source) = match max_memory {
        Some(m) => (
            m,
            "the configured limit: max_memory, recv --max-memory".to_string(),
        ),
        None => match host_memory::committable() {
            Some(c) => (c.bytes, c.source),
            None => return Ok(()),
        },
    };
    let tables = (guest_bytes / PAGE_SIZE as u64).saturating_mul(RECEIVE_TABLE_BYTES_PER_PAGE);
    let needed = guest_bytes.saturating_add(tables);
    if needed > available {
        return Err(Refusal::Refuse(
            RefuseCode::MemoryLayout,
            format!(
                "not enough memory on the destination: the guest needs {needed} bytes ({guest_bytes} of guest memory plus {tables} of receive tables), {available} bytes available ({source})"
            ),
        ));
    }
    Ok(())
}

impl Receiver {
    pub(super) fn check_setup(
        &mut self,
        layout: &MemoryLayout,
        compat: &CompatVector,
        config_len: u64,
        participants: &[(String, u64)],
        attachment: &[u8],
    ) -> Result<(), Refusal> {
        // Memory layout: every size and address checked before any is used.
        let total_bytes = layout.validate().map_err(|e| {
            Refusal::Refuse(
                RefuseCode::MemoryLayout,
                format!("the source's memory layout is invalid: {e}"),
            )
        })?;
        if let Some(m) = &self.memory {
            if m.layout() != *layout {
                return Err(Refusal::Refuse(
                    RefuseCode::MemoryLayout,
                    format!(
                        "memory size mismatch: source has {} bytes in {} region(s), destination provides {} bytes in {} region(s){}",
                        layout.total_bytes(),
                        layout.regions.len(),
                        m.total_bytes(),
                        m.regions().len(),
                        if self.memory_zero {
                            " (prepared in advance; the layouts must match exactly)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }
        if let Some(max) = self.config.host.max_memory {
            if total_bytes > max {
                return Err(Refusal::Refuse(
                    RefuseCode::MemoryLayout,
                    format!(
                        "guest memory of {total_bytes} bytes exceeds this host's limit of {max} bytes"
                    ),
                ));
            }
        }
        if self.memory.is_none() {
            check_memory_bound(total_bytes, self.config.max_memory)?;
        }
        // CPU features: required ⊆ available.
        if let Some(have) = &self.config.host.cpu_features {
            let missing = crate::compat::missing_features(&compat.cpu_features, have);
            if !missing.is_empty() {
                return Err(Refusal::Refuse(
                    RefuseCode::CpuFeatures,
                    format!(
                        "the VM requires CPU features this host lacks: {} (enable processor compatibility mode on the source)",
                        missing.join(", ")
                    ),
                ));
            }
        }
        // Virtual switches.
        if let Some(have) = &self.config.host.switches {
            let missing: Vec<_> = compat
                .switches
                .iter()
                .filter(|s| !have.contains(s))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(Refusal::Refuse(
                    RefuseCode::SwitchName,
                    format!(
                        "virtual switch(es) not found on this host: {}",
                        missing.join(", ")
                    ),
                ));
            }
        }
        // Attachment layout: config blob then each participant's setup info.
        let total: u64 = config_len.saturating_add(
            participants
                .iter()
                .map(|p| p.1)
                .fold(0u64, |a, b| a.saturating_add(b)),
        );
        if total != attachment.len() as u64 {
            return Err(Refusal::Refuse(
                RefuseCode::Other,
                "setup attachment length does not match its index".into(),
            ));
        }
        let config = &attachment[..config_len as usize];
        if let Some(check) = self.setup_check.as_mut() {
            check(layout, compat, config).map_err(|(c, m)| Refusal::Refuse(c, m))?;
        }
        // Participants: both sides must have the same set; each validates its setup info.
        let mut off = config_len as usize;
        for (id, len) in participants {
            let info = &attachment[off..off + *len as usize];
            off += *len as usize;
            let Some(p) = self.participants.iter_mut().find(|p| p.id() == id) else {
                return Err(Refusal::Refuse(
                    RefuseCode::Other,
                    format!("device {id:?} has no participant on this host"),
                ));
            };
            p.validate_setup(info).map_err(Refusal::Veto)?;
        }
        if let Some(p) = self
            .participants
            .iter()
            .find(|p| !participants.iter().any(|(id, _)| id == p.id()))
        {
            return Err(Refusal::Refuse(
                RefuseCode::Other,
                format!(
                    "this host expects device {:?}, which the source does not send",
                    p.id()
                ),
            ));
        }
        Ok(())
    }
}
