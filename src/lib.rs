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
//! [`stats`] the progress events and report. With feature `bench` (on by default),
//! `workload` is the synthetic guest used by `livemig bench` and the tests, and
//! `limits` measures the machine; an embedder builds without them
//! (`default-features = false`).
//!
//! # Embedding
//!
//! A VMM builds a [`engine::Migration`] on the source (memory, dirty tracker,
//! [`engine::VmControl`], device participants, settings) and a
//! [`receiver::Receiver`] on the destination, and connects them through a
//! [`transport`] (TCP with mutual TLS between hosts). docs/EMBEDDING.md walks
//! through it; `asyncapi` (feature `tokio`) wraps both as futures. The library
//! prints nothing: it reports through [`stats::ProgressSink`] events and `tracing`
//! spans and events ([`stats::sink::TracingSink`]).
//!
//! A stopped guest moved between two memories in one process:
//!
//! ```
//! use std::sync::Arc;
//! use livemig::engine::{Migration, MigrationConfig};
//! use livemig::receiver::Receiver;
//! use livemig::transport::mem;
//! use livemig::{GuestMemory, PAGE_SIZE};
//!
//! let memory = Arc::new(GuestMemory::anonymous(4 << 20, false)?);
//! memory.write_pages(7, &[0xAB; PAGE_SIZE])?;
//!
//! let (connector, acceptor) = mem::pair();
//! let destination = std::thread::spawn(move || Receiver::new().run(&acceptor));
//! let mut config = MigrationConfig::default();
//! config.streams = 1;
//! let report = Migration::new(memory.clone()).config(config).run(&connector)?;
//! let received = destination.join().expect("receiver thread")?;
//!
//! assert!(report.verified);
//! assert_eq!(report.session, received.report.session);
//! assert_eq!(memory.full_digest(1)?, received.memory.full_digest(1)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

#[cfg(feature = "tokio")]
pub mod asyncapi;
pub mod chaos;
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
