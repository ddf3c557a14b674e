//! Control messages (JSON in the meta section of a control frame; binary
//! attachments, such as the VM configuration or the device-state envelope, travel
//! in the data section).

use serde::{Deserialize, Serialize};

use super::{WireError, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use crate::memory::MemoryLayout;
use crate::session::SessionToken;

/// Why a destination refuses a migration at handshake or setup. Each has its own
/// message; the source reports it verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseCode {
    /// Protocol major/minor not supported.
    Version,
    /// The memory layout does not fit what the destination provides.
    MemoryLayout,
    /// Required CPU features are not a subset of the destination's.
    CpuFeatures,
    /// A virtual switch the VM's NICs attach to does not exist here.
    SwitchName,
    /// The host already runs its maximum number of incoming migrations.
    HostBusy,
    /// A device participant vetoed.
    Veto,
    /// Anything else (the message says what).
    Other,
}

/// How a session is named on the wire (`Hello.session`, `StreamHello.session`,
/// outcome queries).
pub type SessionId = SessionToken;

/// What became of a session, as the destination records it (see
/// [`ControlMsg::Outcome`] and docs/PROTOCOL.md, "Commit and ownership").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionOutcome {
    /// The destination restored the VM and runs it: the source must never resume.
    Committed,
    /// The destination dropped everything: the source may resume.
    Discarded,
    /// The destination has no record of this session.
    Unknown,
    /// The destination received `Released` and is still restoring.
    InProgress,
}

impl SessionOutcome {
    /// Name as on the wire and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Committed => "committed",
            Self::Discarded => "discarded",
            Self::Unknown => "unknown",
            Self::InProgress => "in_progress",
        }
    }
    /// Committed or discarded: nothing will change it any more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Committed | Self::Discarded)
    }
}

/// Compatibility vector sent at setup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompatVector {
    /// CPU features the VM requires.
    pub cpu_features: Vec<String>,
    /// Virtual switch names the VM's NICs attach to.
    pub switches: Vec<String>,
}

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMsg {
    /// Source → destination, first message on the control stream.
    Hello {
        /// Always "livemig".
        magic: String,
        /// Protocol major.
        major: u16,
        /// Protocol minor.
        minor: u16,
        /// The session's token, repeated on every page stream.
        session: SessionToken,
        /// Number of page streams the source will open.
        streams: u16,
        /// Optional features the source supports.
        capabilities: Vec<String>,
    },
    /// Destination → source: handshake accepted.
    Welcome {
        /// Protocol major.
        major: u16,
        /// Protocol minor.
        minor: u16,
        /// Capabilities both sides support.
        capabilities: Vec<String>,
    },
    /// Source → destination: VM configuration and memory layout. The attachment holds
    /// the opaque VM config blob followed by each participant's setup info, with the
    /// lengths given here.
    Setup {
        /// Guest memory layout.
        layout: MemoryLayout,
        /// Compatibility vector.
        compat: CompatVector,
        /// Length of the VM config blob at the start of the attachment.
        config_len: u64,
        /// (participant id, setup-info length) in attachment order after the config.
        participants: Vec<(String, u64)>,
    },
    /// Destination → source: skeleton VM ready, memory allocated.
    SetupOk,
    /// Destination → source: refused (handshake or setup).
    Refuse {
        /// Machine-readable reason.
        code: RefuseCode,
        /// Human-readable reason.
        message: String,
    },
    /// First frame of each page stream.
    StreamHello {
        /// The session's token from `Hello`.
        session: SessionToken,
        /// Stream index, 0-based.
        index: u16,
    },
    /// Source → destination: the VM is paused; the final round follows.
    Brownout {
        /// Number of the final round.
        final_round: u32,
    },
    /// Source → destination: device state; the attachment is a device-state envelope.
    DeviceState,
    /// Source → destination: all pages and state sent; commit if the digest matches.
    Commit {
        /// Incremental multiset digest of the per-page hashes of what was sent
        /// (32 hex digits; see `proof::digest` and docs/PROTOCOL.md).
        digest: crate::proof::MemoryDigest,
        /// Total pages in memory.
        pages: u64,
        /// Number of rounds, including the final one.
        rounds: u32,
    },
    /// Destination → source: memory verified and every participant's state
    /// validated; nothing is restored yet. The source may now release its devices
    /// (switch-port handoff step 5) and answer [`ControlMsg::Released`].
    ///
    /// Why this step exists: the switch-port order puts the source's NIC disconnect /
    /// delete / port teardown / delete *between* the destination's validation and its
    /// NIC create / connect / restore, so one commit round trip is not enough.
    Prepared {
        /// Time the destination spent verifying the digest (µs).
        verify_us: u64,
        /// Time the destination spent decoding and validating device state (µs).
        validate_us: u64,
    },
    /// Source → destination: every source participant released its device; the
    /// destination restores and answers `Committed` (or `Error`, after which the
    /// source rolls its devices back and resumes).
    Released,
    /// Destination → source: memory verified, devices restored; the VM runs here now.
    Committed {
        /// Time the destination spent verifying the digest (µs).
        verify_us: u64,
        /// Time the destination spent validating and restoring device state (µs).
        restore_us: u64,
        /// Per participant, in restore order: (id, restore time in µs).
        #[serde(default)]
        participants_us: Vec<(String, u64)>,
    },
    /// Destination → source: refused at commit (veto, digest mismatch, …).
    Veto {
        /// Participant or "memory".
        participant: String,
        /// Why.
        reason: String,
    },
    /// Source → destination: migration cancelled; discard everything.
    Abort {
        /// Why.
        reason: String,
    },
    /// Either side: fatal error.
    Error {
        /// What happened.
        message: String,
    },
    /// Either side, on the control stream while rounds run: "still here". The
    /// destination answers each with the same `seq`. Silence longer than the
    /// peer's timeout ends the migration.
    Heartbeat {
        /// Sender's counter.
        seq: u64,
    },
    /// Source → destination, when its policy would brown out (capability
    /// `drain`): answer once every page of rounds `..=round` is applied, or
    /// after a bounded wait. The source's VM still runs meanwhile; what the
    /// destination has yet to apply would otherwise land inside the downtime.
    Drain {
        /// The last round the source sent.
        round: u32,
    },
    /// Destination → source: answer to [`ControlMsg::Drain`].
    Drained {
        /// The round asked about.
        round: u32,
        /// Whether every page of rounds `..=round` is applied (false: the wait
        /// ended first, and the destination is still behind).
        applied: bool,
        /// How long the destination waited, in microseconds (looking at its host's
        /// load included).
        waited_us: u64,
        /// Whether other processes keep the destination host's CPUs busy, looked
        /// at once the round is applied ([`crate::stats::host_load`]). Absent
        /// (false) from a destination that does not look.
        #[serde(default)]
        host_busy: bool,
    },
    /// Source → destination, first (and only) message of a new control connection:
    /// what became of `session`? Sent by a source that released its VM and lost the
    /// channel before learning the outcome (in doubt), or by `livemig resolve`.
    QueryOutcome {
        /// Session asked about.
        session: SessionId,
    },
    /// Destination → source: answer to [`ControlMsg::QueryOutcome`].
    Outcome {
        /// Session asked about.
        session: SessionId,
        /// What the destination recorded.
        outcome: SessionOutcome,
    },
    /// Source → destination, after `Committed` (or after a final answer to a
    /// query): the source knows the outcome, so the destination need not keep
    /// answering queries about `session`.
    OutcomeKnown {
        /// Session.
        session: SessionId,
    },
    /// Destination → source, in answer to `Hello` while every migration slot of a
    /// serving destination is taken, to sources that offer the `queue-notice`
    /// capability: the hello waits in the destination's queue and `Welcome` (or
    /// `Refuse`) follows when a slot frees. Sent at once, then repeated well within
    /// the source's reply timeout, so a long queue is not taken for a dead peer.
    Queued {
        /// Migrations this host receives at once (all slots taken).
        limit: u32,
        /// Migrations waiting for a slot, this one included.
        waiting: u32,
    },
    /// Source → destination, first message of a new control connection that
    /// resumes a session whose connection broke during the rounds (capability
    /// `resume`; see docs/PROTOCOL.md, "Resumption"). Page streams follow with
    /// `StreamHello` once the destination answers `Resumed`.
    Resume {
        /// Always "livemig".
        magic: String,
        /// Protocol major.
        major: u16,
        /// Protocol minor.
        minor: u16,
        /// The session to resume.
        session: SessionToken,
        /// Page streams the source opens now.
        streams: u16,
        /// The round the source goes on with: greater than every round it sent
        /// before, so no page is claimed twice in one round.
        round: u32,
    },
    /// Destination → source: the session is resumed. The attachment lists the
    /// pages the destination holds from the rounds in flight
    /// ([`crate::wire::resume::HeldRun`]s, 16 bytes each).
    Resumed {
        /// Rounds every page stream completed (rounds `0..complete_rounds`): every
        /// page the source last sent in one of them is held.
        complete_rounds: u32,
        /// Number of held runs in the attachment.
        held_runs: u64,
    },
}

impl ControlMsg {
    /// Serialize to JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("control messages always serialize")
    }

    /// Parse JSON bytes (bounded by the frame's meta limit).
    ///
    /// A `Hello` of another protocol version that does not parse as this version's
    /// `Hello` (its other fields changed) is reported as
    /// [`WireError::OtherVersion`], so the destination can still answer with a
    /// version refusal: `magic`, `major` and `minor` keep their place and type in
    /// every version.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        serde_json::from_slice(b).map_err(|e| {
            #[derive(Deserialize)]
            #[serde(tag = "type", rename_all = "snake_case")]
            enum VersionProbe {
                Hello {
                    magic: String,
                    major: u16,
                    minor: u16,
                },
            }
            match serde_json::from_slice::<VersionProbe>(b) {
                Ok(VersionProbe::Hello {
                    magic,
                    major,
                    minor,
                }) if (major, minor) != (PROTOCOL_MAJOR, PROTOCOL_MINOR) => {
                    WireError::OtherVersion {
                        magic: magic.into(),
                        major,
                        minor,
                    }
                }
                _ => WireError::Control(MalformedControl(std::sync::Arc::new(e))),
            }
        })
    }

    /// Short name for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Welcome { .. } => "welcome",
            Self::Setup { .. } => "setup",
            Self::SetupOk => "setup_ok",
            Self::Refuse { .. } => "refuse",
            Self::StreamHello { .. } => "stream_hello",
            Self::Brownout { .. } => "brownout",
            Self::DeviceState => "device_state",
            Self::Commit { .. } => "commit",
            Self::Prepared { .. } => "prepared",
            Self::Released => "released",
            Self::Committed { .. } => "committed",
            Self::Veto { .. } => "veto",
            Self::Abort { .. } => "abort",
            Self::Error { .. } => "error",
            Self::Heartbeat { .. } => "heartbeat",
            Self::Drain { .. } => "drain",
            Self::Drained { .. } => "drained",
            Self::QueryOutcome { .. } => "query_outcome",
            Self::Outcome { .. } => "outcome",
            Self::OutcomeKnown { .. } => "outcome_known",
            Self::Queued { .. } => "queued",
            Self::Resume { .. } => "resume",
            Self::Resumed { .. } => "resumed",
        }
    }
}

/// A control message that does not parse (its JSON is invalid or does not match
/// any message). Its `source()` is the JSON parser's error; its display names the
/// position and sanitizes the parser's text, which quotes the peer's input.
#[derive(Debug, Clone)]
pub struct MalformedControl(std::sync::Arc<serde_json::Error>);

impl MalformedControl {
    /// The JSON parser's error.
    pub fn json(&self) -> &serde_json::Error {
        &self.0
    }
}

impl PartialEq for MalformedControl {
    fn eq(&self, other: &Self) -> bool {
        let key = |e: &serde_json::Error| (e.classify(), e.line(), e.column());
        key(&self.0) == key(&other.0)
    }
}

impl Eq for MalformedControl {}

impl std::fmt::Display for MalformedControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&super::PeerText::new(self.0.to_string()), f)
    }
}

impl std::error::Error for MalformedControl {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}
