//! # livemig — pre-copy live migration of virtual-machine memory
//!
//! The path of one page, module by module:
//! 1. [`dirty`] — a tracker reports the page as written (or round 0 takes every page);
//! 2. [`engine`] — the pre-copy round loop batches dirty pages; [`engine::policy`]
//!    decides when to stop and brown out;
//! 3. [`codec`] — a worker copies the batch out of [`memory`], elides zero pages,
//!    hashes each page and compresses (or delta-encodes) the rest;
//! 4. [`wire`] — the batch becomes a checksummed, length-bounded frame;
//! 5. [`transport`] — the frame goes out on one of N streams (TCP, Unix, in-memory);
//! 6. [`receiver`] — the destination decodes the frame, applies the pages into its
//!    pre-allocated guest memory and records each page's hash;
//! 7. at brownout both sides compare the running digests of all page hashes sent and
//!    applied ([`proof`]): the destination's memory is proven equal to what the source
//!    sent, or the migration fails and the source VM resumes; audits of the source's
//!    memory against what was sent catch a tracker that missed a write.
//!
//! Before any page moves, the setup stage lets the destination refuse (protocol
//! version, host busy, memory layout, CPU features — see [`compat`] for processor
//! compatibility mode — virtual switch names) or a participant veto; see
//! [`receiver::setup_check`].
//!
//! With feature `kvm`, `dirty::KvmDirtyLog` harvests KVM's dirty log and `kvm` saves
//! and restores vCPU and VM state as device participants (see docs/KVM.md).
//!
//! [`device`] carries device and vCPU state at brownout (save → validate → release →
//! restore; [`device::switch_port`] models Hyper-V's switch-port handoff),
//! [`stats`] the progress events and report, [`workload`] the synthetic guest used by
//! `livemig bench` and the tests.

#![warn(missing_docs)]

#[cfg(feature = "tokio")]
pub mod asyncapi;
pub mod codec;
pub mod compat;
pub mod device;
pub mod dirty;
pub mod engine;
#[doc(hidden)]
pub mod fuzz;
#[cfg(feature = "kvm")]
pub mod kvm;
#[cfg(feature = "bench")]
pub mod limits;
pub mod memory;
pub mod proof;
pub mod receiver;
mod rng;
pub mod service;
pub mod session;
pub mod stats;
pub mod transport;
pub mod wire;
#[cfg(feature = "bench")]
pub mod workload;

pub use memory::{GuestMemory, GuestRegion, PAGE_SIZE};
