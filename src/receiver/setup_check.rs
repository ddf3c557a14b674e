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
use crate::memory::{MemoryError, MemoryLayout, PAGE_SIZE};
use crate::session::SessionToken;
use crate::wire::control::{CompatVector, RefuseCode};
use crate::wire::frame::AttachmentCaps;
use crate::wire::{PeerText, PROTOCOL_MAJOR, PROTOCOL_MINOR};

/// Why this destination refused a source (`ReceiveError::Refused`; its text is
/// what the source receives in `Refuse.message`). Names from the source's
/// messages (CPU features, switches, device ids, its magic) are [`PeerText`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The source speaks another protocol (or is no livemig source).
    #[error(transparent)]
    Version(#[from] VersionRefusal),
    /// This host runs its limit of incoming migrations.
    #[error(
        "this host already runs {limit} incoming migration(s), its limit; retry when one finishes"
    )]
    HostBusy {
        /// The limit.
        limit: usize,
    },
    /// This destination holds another session whose source may start its setup
    /// over (a serving destination routes such hellos to that session instead).
    #[error("this destination holds another session for its source to start over")]
    HeldForRestart,
    /// The source asked for a number of page streams out of range.
    #[error("{requested} page streams requested; this destination accepts 1 to {max}")]
    Streams {
        /// Streams asked for.
        requested: u16,
        /// Most streams accepted.
        max: u16,
    },
    /// The source's memory layout is invalid.
    #[error("the source's memory layout is invalid: {0}")]
    InvalidLayout(#[source] MemoryError),
    /// The source's layout differs from the memory given to this receiver.
    #[error("memory size mismatch: source has {source_bytes} bytes in {source_regions} region(s), destination provides {dest_bytes} bytes in {dest_regions} region(s){}", if *prepared { " (prepared in advance; the layouts must match exactly)" } else { "" })]
    LayoutMismatch {
        /// Source guest bytes.
        source_bytes: u64,
        /// Source regions.
        source_regions: usize,
        /// Bytes of the memory given here.
        dest_bytes: u64,
        /// Regions of the memory given here.
        dest_regions: usize,
        /// That memory was prepared in advance.
        prepared: bool,
    },
    /// The guest is larger than this host accepts (`HostCaps::max_memory`).
    #[error("guest memory of {bytes} bytes exceeds this host's limit of {max} bytes")]
    OverHostLimit {
        /// Guest bytes.
        bytes: u64,
        /// The host's limit.
        max: u64,
    },
    /// This host cannot commit the guest's memory and receive tables.
    #[error("not enough memory on the destination: the guest needs {needed} bytes ({guest_bytes} of guest memory plus {tables} of receive tables), {available} bytes available ({})", from.as_ref().map_or("the configured limit: max_memory, recv --max-memory".to_string(), ToString::to_string))]
    NotEnoughMemory {
        /// Bytes needed.
        needed: u64,
        /// Guest memory bytes.
        guest_bytes: u64,
        /// Receive-table bytes.
        tables: u64,
        /// Bytes available.
        available: u64,
        /// Where the host figure comes from ([`host_memory::Committable::source`]);
        /// `None`: the configured `max_memory`.
        from: Option<Box<host_memory::CommitSource>>,
    },
    /// The VM requires CPU features this host lacks.
    #[error("the VM requires CPU features this host lacks: {} (enable processor compatibility mode on the source)", join(.0))]
    CpuFeatures(Vec<PeerText>),
    /// Virtual switches the VM uses do not exist here.
    #[error("virtual switch(es) not found on this host: {}", join(.0))]
    Switches(Vec<PeerText>),
    /// The setup attachment's length does not match its index.
    #[error("setup attachment length does not match its index")]
    AttachmentIndex,
    /// The hypervisor's own check ([`super::SetupCheck`]) refused.
    #[error("{0}")]
    Hypervisor(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The source sends state for a device this host has no participant for.
    #[error("device {0:?} has no participant on this host")]
    NoParticipant(PeerText),
    /// This host expects state for a device the source does not send.
    #[error("this host expects device {0:?}, which the source does not send")]
    MissingDevice(String),
    /// A resume with another number of page streams than the session's.
    #[error("resume with {requested} page streams; this session has {session}")]
    ResumeStreams {
        /// Streams in the `Resume`.
        requested: u16,
        /// The session's streams.
        session: u16,
    },
    /// A resume at a round not after every round already sent.
    #[error("resume at round {round}, which is not after every round already sent (complete: {complete}, highest seen: {})", highest.map_or("none".into(), |h| h.to_string()))]
    ResumeRound {
        /// The round asked for.
        round: u32,
        /// Rounds complete here.
        complete: u32,
        /// Highest round a page arrived in.
        highest: Option<u32>,
    },
    /// A resume at a round beyond `ReceiverConfig::max_rounds`.
    #[error("resume at round {round}, beyond this receiver's limit of {max} rounds")]
    ResumeBeyondLimit {
        /// The round asked for.
        round: u32,
        /// The limit.
        max: u32,
    },
    /// A new migration arrived while this destination holds a session for its
    /// source to resume.
    #[error("this destination holds session {0} for its source to resume")]
    SessionHeld(SessionToken),
    /// A resume of a session this destination does not hold.
    #[error("no such session to resume here")]
    NoSuchSession,
    /// The session resumed (or restarted its setup) as often as this receiver
    /// allows (`ReceiverConfig::max_resumes`).
    #[error("session {session} already resumed {max} times, this receiver's limit")]
    ResumeLimit {
        /// The session.
        session: SessionToken,
        /// The limit.
        max: u32,
    },
    /// The session started its setup over as often as this receiver allows
    /// (`ReceiverConfig::max_resumes`).
    #[error("session {session} already started its setup over {max} times, this receiver's limit")]
    RestartLimit {
        /// The session.
        session: SessionToken,
        /// The limit.
        max: u32,
    },
    /// A second `Hello` of a session being set up, from a source that did not
    /// offer `setup-restart`.
    #[error("session {0} is already set up here")]
    AlreadySetUp(SessionToken),
    /// A `Hello` of a session past its setup: it can only resume.
    #[error("session {0} is past its setup: it can only resume")]
    PastSetup(SessionToken),
}

fn join(names: &[PeerText]) -> String {
    names
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a source's protocol version is refused ([`check_version`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VersionRefusal {
    /// The handshake magic is not livemig's.
    #[error("bad handshake magic {0:?}: the peer is not a livemig source")]
    BadMagic(PeerText),
    /// A version this destination does not accept.
    #[error("protocol version {major}.{minor} is not supported: this destination speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR} and accepts {}", accepted())]
    Unsupported {
        /// The source's major version.
        major: u16,
        /// The source's minor version.
        minor: u16,
    },
    /// A `Hello` of an accepted version that does not parse.
    #[error("unreadable hello of version {major}.{minor}")]
    Unreadable {
        /// The source's major version.
        major: u16,
        /// The source's minor version.
        minor: u16,
    },
}

/// The versions accepted, in words.
fn accepted() -> String {
    let previous = PROTOCOL_MINOR.saturating_sub(1);
    if previous == PROTOCOL_MINOR {
        format!("only {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}")
    } else {
        format!("{PROTOCOL_MAJOR}.{previous} to {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}")
    }
}

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
    Refuse(RefuseCode, RefuseReason),
    /// A participant vetoed.
    Veto(Veto),
}

/// Is a source speaking `major.minor` (handshake magic `magic`) supported? The
/// destination accepts its own major with the current or the previous minor.
pub fn check_version(magic: &str, major: u16, minor: u16) -> Result<(), VersionRefusal> {
    if magic != "livemig" {
        return Err(VersionRefusal::BadMagic(PeerText::new(magic)));
    }
    let previous = PROTOCOL_MINOR.saturating_sub(1);
    if major != PROTOCOL_MAJOR || !(previous..=PROTOCOL_MINOR).contains(&minor) {
        return Err(VersionRefusal::Unsupported { major, minor });
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
    let (available, from) = match max_memory {
        Some(m) => (m, None),
        None => match host_memory::committable() {
            Some(c) => (c.bytes, Some(Box::new(c.source))),
            None => return Ok(()),
        },
    };
    let tables = (guest_bytes / PAGE_SIZE as u64).saturating_mul(RECEIVE_TABLE_BYTES_PER_PAGE);
    let needed = guest_bytes.saturating_add(tables);
    if needed > available {
        return Err(Refusal::Refuse(
            RefuseCode::MemoryLayout,
            RefuseReason::NotEnoughMemory {
                needed,
                guest_bytes,
                tables,
                available,
                from,
            },
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
            Refusal::Refuse(RefuseCode::MemoryLayout, RefuseReason::InvalidLayout(e))
        })?;
        if let Some(m) = &self.memory {
            if m.layout() != *layout {
                return Err(Refusal::Refuse(
                    RefuseCode::MemoryLayout,
                    RefuseReason::LayoutMismatch {
                        source_bytes: layout.total_bytes(),
                        source_regions: layout.regions.len(),
                        dest_bytes: m.total_bytes(),
                        dest_regions: m.regions().len(),
                        prepared: self.memory_zero,
                    },
                ));
            }
        }
        if let Some(max) = self.config.host.max_memory {
            if total_bytes > max {
                return Err(Refusal::Refuse(
                    RefuseCode::MemoryLayout,
                    RefuseReason::OverHostLimit {
                        bytes: total_bytes,
                        max,
                    },
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
                    RefuseReason::CpuFeatures(missing.iter().map(PeerText::new).collect()),
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
                    RefuseReason::Switches(missing.iter().map(PeerText::new).collect()),
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
                RefuseReason::AttachmentIndex,
            ));
        }
        let config = &attachment[..config_len as usize];
        if let Some(check) = self.setup_check.as_mut() {
            check(layout, compat, config)
                .map_err(|(c, e)| Refusal::Refuse(c, RefuseReason::Hypervisor(e)))?;
        }
        // Participants: both sides must have the same set; each validates its setup info.
        let mut off = config_len as usize;
        for (id, len) in participants {
            let info = &attachment[off..off + *len as usize];
            off += *len as usize;
            let Some(p) = self.participants.iter_mut().find(|p| p.id() == id) else {
                return Err(Refusal::Refuse(
                    RefuseCode::Other,
                    RefuseReason::NoParticipant(PeerText::new(id)),
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
                RefuseReason::MissingDevice(p.id().to_string()),
            ));
        }
        Ok(())
    }
}
