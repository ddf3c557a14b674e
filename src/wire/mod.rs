//! Wire protocol 2.0: framed, checksummed, every length bounded.
//!
//! See `docs/PROTOCOL.md` for the sequence diagram and the receiver's state machine.
//! In short:
//!
//! ```text
//! frame  = FrameHeader(16 bytes) meta[meta_len] data[data_len]
//! header = magic u16 "LM" | kind u8 | flags u8 | meta_len u32 | data_len u32 | crc32c u32
//! ```
//! - `crc32c` covers the first 12 header bytes and `meta`; for control frames it also
//!   covers `data`. Batch data (page payload) is verified end to end instead: `meta`
//!   carries the xxh3-64 of every page, checked after decoding, and those hashes
//!   feed the brownout digest.
//! - Every enum on the wire starts at 1; 0 is invalid, so zeroed memory never parses.
//! - Lengths are checked against per-kind bounds *before* any allocation.
//!
//! Control sequence (source → destination unless marked ←):
//!
//! ```text
//! Hello(session token) ← Welcome | Refuse(version, host_busy)
//! Setup ← SetupOk | Refuse(memory_layout, cpu_features, switch_name, …) | Veto(participant)
//! StreamHello(session token, index) × N, pages …, Brownout, final pages, DeviceState(envelope), Commit
//! ← Prepared      memory verified, every participant's state validated; nothing restored
//! Released        every source participant released its device (port/NIC teardown)
//! ← Committed     destination restored; the VM runs there   | ← Error → source rolls back
//! ```
//! `Prepared`/`Released` split the commit so the switch-port handoff keeps the
//! spec's order (source teardown between destination validation and restore) and
//! the source tears nothing down before the destination has validated everything;
//! see [`crate::device`].
//!
//! Versioning: `PROTOCOL_MAJOR` must match; a peer accepts the current and the previous
//! minor version. New optional features are negotiated as capability strings in the
//! handshake, so stream failover, resumption (batches carry the round as a per-page
//! generation) and TLS can be added without a new major version.

pub mod batch;
pub mod control;
pub mod frame;
mod peer_text;
pub mod resume;
mod violation;

pub use batch::{BatchMeta, Extent};
pub use control::{ControlMsg, MalformedControl};
pub use frame::{FrameHeader, FrameKind, FRAME_HEADER_LEN};
pub use peer_text::PeerText;
pub use resume::HeldRunsError;
pub use violation::ProtocolViolation;

/// Run every wire decoder over arbitrary bytes, ignoring errors (the fuzz entry
/// point; see [`crate::fuzz::decode_all`]).
pub fn fuzz_decode(bytes: &[u8]) {
    crate::fuzz::decode_all(bytes)
}

/// Protocol major version: peers must agree. 2: the session id became a 128-bit
/// random [`crate::session::SessionToken`] (hex on the wire).
pub const PROTOCOL_MAJOR: u16 = 2;
/// Protocol minor version: a receiver accepts `MINOR` and `MINOR - 1`.
/// 1: resumption (`Resume` / `Resumed`, capability `resume`). Later additions
/// that only a peer offering their capability is sent (`drain`) keep the version.
pub const PROTOCOL_MINOR: u16 = 1;

/// Optional features this build offers in the handshake (`Hello.capabilities` from
/// the source, `Welcome.capabilities` from the destination).
pub const CAPABILITIES: &[&str] = &[
    "digest-xxh3",
    "codec-lz4",
    "codec-zstd",
    "delta-xor",
    "queue-notice",
    "resume",
    "drain",
    SETUP_RESTART,
];

/// The capability of a peer that starts a setup over when its connection is lost
/// before round 0 (docs/PROTOCOL.md, "Setup restart"): in `Hello`, the source will
/// come back with the same token; in `Welcome`, the destination waits for it.
pub const SETUP_RESTART: &str = "setup-restart";

/// Largest number of pages in one batch frame.
pub const MAX_BATCH_PAGES: usize = 256;
/// Largest batch meta section: fixed part + extents + zero bitmap + hashes.
pub const MAX_BATCH_META: usize =
    16 + MAX_BATCH_PAGES * 12 + MAX_BATCH_PAGES / 8 + MAX_BATCH_PAGES * 8;
/// Largest control meta (a JSON control message).
pub const MAX_CONTROL_META: usize = 64 * 1024;
/// Largest batch data: every page raw, plus per-page delta record overhead.
pub const MAX_BATCH_DATA: usize = MAX_BATCH_PAGES * (crate::memory::PAGE_SIZE + 8) + 64;
/// Largest control attachment (VM config, device-state envelope).
pub const MAX_CONTROL_DATA: usize = 64 * 1024 * 1024;

/// Decoding errors. Every malformed input maps to one of these; decoding never panics.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Not a livemig frame.
    #[error("bad frame magic {0:#06x} (not a livemig stream?)")]
    BadMagic(u16),
    /// Unknown or zero frame kind.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// A length exceeds its bound.
    #[error("{what} length {len} exceeds the bound {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Declared length.
        len: usize,
        /// Bound.
        max: usize,
    },
    /// Checksum mismatch.
    #[error("frame checksum mismatch (expected {expected:#010x}, got {actual:#010x})")]
    Checksum {
        /// In the header.
        expected: u32,
        /// Computed.
        actual: u32,
    },
    /// A field that must be non-zero / in range is not.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// Input ended early.
    #[error("{0} is truncated")]
    Truncated(&'static str),
    /// A control message could not be parsed.
    #[error("malformed control message: {0}")]
    Control(#[source] MalformedControl),
    /// Unknown codec id.
    #[error("unknown codec id {0}")]
    BadCodec(u8),
    /// A `Resumed` attachment that breaks its rules (see [`resume::decode_runs`]).
    #[error("invalid held-run list: {0}")]
    HeldRuns(#[source] HeldRunsError),
    /// A `Hello` of another protocol version, whose other fields this version
    /// cannot read (see [`ControlMsg::decode`]).
    #[error("hello of protocol version {major}.{minor} (magic {magic:?}), which this build cannot parse")]
    OtherVersion {
        /// The peer's handshake magic.
        magic: PeerText,
        /// The peer's major version.
        major: u16,
        /// The peer's minor version.
        minor: u16,
    },
}
