//! Proof that the destination's memory is the source's.
//!
//! - [`digest`]: the incremental multiset digest both sides update per page sent or
//!   applied; brownout compares two 16-byte values ([`MemoryDigest`]).
//! - [`audit`]: the source's memory against what was sent, tracker included: a
//!   sampled audit after each harvest ([`SampledAudit`]), and a full audit of the
//!   paused source after switchover ([`stale_pages`]).
//!
//! docs/PROTOCOL.md ("Memory digest") states the construction and its bounds;
//! docs/ARCHITECTURE.md ("Why no page is lost") how the pieces fit.

pub mod audit;
pub mod digest;

pub use audit::{safe_tracker, stale_pages, AuditConfig, SampledAudit};
pub use digest::{entry, BadDigest, DigestDelta, MemoryDigest, PageLedger};
