//! The destination side: skeleton VM, page application, verification, commit.
//!
//! State machine (enforced here; see docs/PROTOCOL.md):
//! `AwaitHello → AwaitSetup → AcceptStreams → Rounds (pages on N streams, gated)
//!  → [Brownout] → DeviceState → Commit → Prepared → Released → Committed | Veto`,
//! with `Abort` or any error leading to `Discarded` from every state. Setup-stage
//! refusals live in [`setup_check`], the per-host concurrency limit in [`limiter`].
//!
//! [`Receiver::run`] walks the states as five phases, one file each, every phase
//! handing the next a small struct:
//!
//! | phase       | file           | states                               | hands on            |
//! |-------------|----------------|--------------------------------------|---------------------|
//! | handshake   | `handshake.rs` | `AwaitHello`                         | `Handshake`         |
//! | setup       | `setup.rs`     | `AwaitSetup`                         | `Skeleton`          |
//! | accept      | `accept.rs`    | `AcceptStreams`                      | `PageStreams`       |
//! | rounds      | `rounds.rs`    | `Rounds`, `Brownout`, `DeviceState`  | `RoundsDone`        |
//! | commit      | `commit.rs`    | `Commit` … `Committed` / `Veto`      | `Committed`         |
//!
//! Pages are applied by `apply` (one thread per page stream, rounds kept in step
//! by `gate`).
//!
//! Stray connections (closed, silent, garbage, or a page stream of another
//! session) are dropped and counted in `AwaitHello` and `AcceptStreams`, never
//! failing the migration; every wait has a deadline ([`ReceiverConfig`]) and ends
//! in [`ReceiveError::TimedOut`] saying what did not arrive.

pub(crate) mod apply;
pub(crate) mod gate;
pub mod host_memory;
pub mod limiter;
pub mod setup_check;

mod accept;
mod commit;
mod error;
pub mod handoff;
mod handshake;
pub mod outcomes;
mod restart;
mod resume;
mod rounds;
mod setup;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::device::{RestoreState, Veto};
use crate::memory::{GuestMemory, MemoryError, MemoryLayout};
use crate::transport::framed::FrameReader;
use crate::transport::{Acceptor, Stream, TransportError};
use crate::wire::control::{CompatVector, RefuseCode};
use crate::wire::{ControlMsg, ProtocolViolation};
pub use apply::{PageError, PageErrorKind};
pub use error::{Awaited, DigestMismatch, ReceiveError, StrayReason};
use handoff::{DestEvent, DestState};
pub use limiter::{HostLimiter, Permit};
pub use outcomes::OutcomeLog;
use rounds::RoundsFailed;
use setup::Skeleton;
pub use setup_check::{
    HostCaps, RefuseReason, VersionRefusal, DEFAULT_MAX_DEVICE_STATE, DEFAULT_MAX_ROUNDS,
    DEFAULT_MAX_SETUP_ATTACHMENT,
};

/// Destination settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Ask for transparent huge pages when allocating the skeleton VM's memory.
    pub huge_pages: bool,
    /// Pre-fault destination memory in the background during round 0, on a host
    /// with a CPU to spare for it: more CPUs than page streams plus one (see
    /// [`prefault_pays`]). Without one, the appliers fault pages in as they write
    /// them, which measured faster on two shared cores.
    pub prefault: bool,
    /// Commit (fault in) all of the skeleton VM's memory during setup, before
    /// answering the source: no page is sent until the destination holds the whole
    /// guest. A host that cannot commit it fails in setup, before any page moves:
    /// with a refusal (`RefuseCode::MemoryLayout`) when populating returns an error,
    /// or, where the kernel's OOM killer acts first, with the destination gone. The
    /// source keeps running either way, having sent nothing.
    /// This is the spec's "allocates its memory before any page arrives" taken
    /// literally (QEMU: `-mem-prealloc`). Costs setup time; the transfer then runs
    /// into resident memory.
    pub prealloc: bool,
    /// How long to wait for the migration: for a connection that opens with a
    /// valid `Hello` (stray connections are dropped meanwhile), and again, from
    /// `SetupOk`, for all of its page streams.
    pub accept_timeout: Duration,
    /// How long a new connection may take to deliver its first frame (`Hello` or
    /// `StreamHello`) before it is dropped as stray.
    pub hello_timeout: Duration,
    /// Longest the source may take from the first byte of its `Hello` to the last
    /// byte of its `Setup`, however it spreads them (a trickling peer is cut here).
    pub setup_timeout: Duration,
    /// Longest silence on a page stream before giving up on it.
    pub idle_timeout: Duration,
    /// Longest silence on the control stream while the rounds run (the source
    /// sends heartbeats, every second by default and at least four times per its
    /// peer timeout), before the session is taken as broken: it then waits for
    /// the source to resume it ([`ReceiverConfig::resume_window`]) or fails.
    pub control_timeout: Duration,
    /// Most page streams accepted.
    pub max_streams: u16,
    /// Host capabilities.
    pub host: HostCaps,
    /// Most memory this receiver may commit for a skeleton VM (guest memory plus
    /// receive tables), checked at setup before anything is mapped. `None`: what
    /// the host can commit now (`MemAvailable` and the cgroup limit, see
    /// [`host_memory`]).
    pub max_memory: Option<u64>,
    /// Most pre-copy rounds (final round included) a source may send.
    pub max_rounds: u32,
    /// Largest `Setup` attachment (VM config blob plus participants' setup info).
    pub max_setup_attachment: usize,
    /// Largest `DeviceState` attachment (the device-state envelope).
    pub max_device_state: usize,
    /// How long the destination keeps a session whose connection broke during the
    /// rounds (its memory and what it applied), waiting for the source to resume
    /// it. `Duration::ZERO`: fail at once.
    pub resume_window: Duration,
    /// Most resumptions of one session.
    pub max_resumes: u32,
    /// How long `livemig recv` keeps answering outcome queries after a migration
    /// whose source may not know the outcome (see [`OutcomeLog::serve`]).
    pub outcome_linger: Duration,
}

/// Whether a background pre-fault thread can run beside `streams` appliers
/// without taking a CPU from them (or from the control thread): only a CPU no one
/// else needs makes zeroing memory ahead of the appliers a gain. On two shared
/// cores (`bench --memory 2G --dirty-rate 0 --baseline`, 6 interleaved pairs, host
/// memory kept backed) the thread made migrations slower: 5.16 against 5.58 GiB/s
/// without it, `wire_vs_mem_limit` 0.72 against 0.79; at lowest priority
/// (`SCHED_IDLE`) it still gave 5.19. Zeroing a huge page ahead writes it to memory
/// twice (zeros, then the pages), a fault right before the copy writes it once,
/// in cache (docs/BENCHMARKS.md, 2026-12-06).
pub fn prefault_pays(streams: usize, cpus: usize) -> bool {
    cpus > streams + 1
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            huge_pages: true,
            prefault: true,
            prealloc: false,
            accept_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(5),
            setup_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(600),
            control_timeout: Duration::from_secs(30),
            max_streams: 64,
            host: HostCaps::default(),
            max_memory: None,
            max_rounds: DEFAULT_MAX_ROUNDS,
            max_setup_attachment: DEFAULT_MAX_SETUP_ATTACHMENT,
            max_device_state: DEFAULT_MAX_DEVICE_STATE,
            resume_window: Duration::from_secs(60),
            max_resumes: 16,
            outcome_linger: Duration::from_secs(60),
        }
    }
}

/// What the destination reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReceiveReport {
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Page streams.
    pub streams: u16,
    /// Rounds received (final included).
    pub rounds: u32,
    /// Pages applied.
    pub pages_applied: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Torn pages (racy zero-copy sends; re-sent by design).
    pub torn_pages: u64,
    /// Bytes received on all streams.
    pub bytes_received: u64,
    /// From first connection to commit (ms).
    pub total_ms: f64,
    /// Allocating the skeleton VM's memory (ms).
    pub setup_ms: f64,
    /// The destination memory was given before the migration (prepared in
    /// advance or the caller's): setup allocated nothing.
    pub memory_prepared: bool,
    /// Digest verification at commit (ms).
    pub verify_ms: f64,
    /// Device validation + restore (ms).
    pub restore_ms: f64,
    /// Verified digest.
    pub digest: String,
    /// True when the digest matched.
    pub verified: bool,
    /// Participants restored.
    pub participants: Vec<String>,
    /// Per participant restore time (ms), in restore order.
    pub participant_restore_ms: Vec<(String, f64)>,
    /// This migration's session token (32 lowercase hex characters).
    pub session: String,
    /// Connections dropped as stray: closed, silent or garbage before the `Hello`,
    /// or not a valid `StreamHello` of this session while accepting page streams.
    pub stray_connections: u32,
    /// The source confirmed it learned the outcome (`OutcomeKnown`); when false
    /// it may be in doubt and ask (see [`OutcomeLog::serve`]).
    pub outcome_known: bool,
    /// Times the session resumed after its connection broke during the rounds.
    pub resumes: u32,
    /// Times the setup started over after its connection broke before the
    /// rounds (see docs/PROTOCOL.md, "Setup restart").
    pub setup_restarts: u32,
}

/// A successful receive: the report and the destination memory (now the VM's).
#[derive(Debug)]
pub struct Received {
    /// Report.
    pub report: ReceiveReport,
    /// Memory holding the migrated guest.
    pub memory: Arc<GuestMemory>,
}

/// Checks a setup request beyond layout and caps (a hypervisor's own policy): a
/// refusal is a code and the hypervisor's error (a message converts with
/// `.into()`), kept as [`RefuseReason::Hypervisor`].
pub type SetupCheck = Box<
    dyn FnMut(
            &MemoryLayout,
            &CompatVector,
            &[u8],
        ) -> Result<(), (RefuseCode, Box<dyn std::error::Error + Send + Sync>)>
        + Send,
>;

/// The destination of one migration.
pub struct Receiver {
    memory: Option<Arc<GuestMemory>>,
    /// `memory` was prepared in advance and reads as zero (see
    /// [`Receiver::prepared_memory`]): zero pages need no check.
    memory_zero: bool,
    participants: Vec<Box<dyn RestoreState>>,
    config: ReceiverConfig,
    setup_check: Option<SetupCheck>,
    limiter: Option<Arc<HostLimiter>>,
    outcomes: Arc<OutcomeLog>,
    session: Option<crate::session::SessionToken>,
    handoff: DestState,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("memory", &self.memory.as_ref().map(|m| m.total_bytes()))
            .field(
                "participants",
                &self
                    .participants
                    .iter()
                    .map(|p| p.id().to_string())
                    .collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .finish()
    }
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    /// A receiver that allocates the skeleton VM's memory from the source's layout.
    pub fn new() -> Self {
        Self {
            memory: None,
            memory_zero: false,
            participants: Vec::new(),
            config: ReceiverConfig::default(),
            setup_check: None,
            limiter: None,
            outcomes: Arc::new(OutcomeLog::default()),
            session: None,
            handoff: DestState::Receiving,
        }
    }
    /// Record outcomes in `log` (shared with whatever answers outcome queries,
    /// e.g. a file-backed log, or one shared by a host's receivers).
    pub fn outcome_log(mut self, log: Arc<OutcomeLog>) -> Self {
        self.outcomes = log;
        self
    }
    /// The outcome record this receiver writes.
    pub fn outcomes(&self) -> Arc<OutcomeLog> {
        self.outcomes.clone()
    }
    /// Use caller-provided destination memory (e.g. a VMM's, registered with KVM);
    /// the source's layout must match it exactly.
    ///
    /// Contract: the memory may hold anything when the migration starts (it need not
    /// be zeroed). When the receiver returns `Ok`, every page equals the source's:
    /// pages the source sends with content are written, and pages it sends as zero
    /// pages are read and written with zeros unless they already read as zero (a
    /// read commits no memory). On error the contents are unspecified. The receiver
    /// writes the memory only from its apply threads, before it answers `Committed`.
    pub fn memory(mut self, m: Arc<GuestMemory>) -> Self {
        self.memory = Some(m);
        self.memory_zero = false;
        self
    }
    /// Use destination memory prepared in advance and known to read as zero: fresh
    /// anonymous memory nobody has written, as [`prepare_memory`] makes when a VMM
    /// started for an incoming migration knows its memory size from its
    /// configuration. Nothing is allocated at setup; zero pages are skipped
    /// unchecked, as for memory the receiver allocates itself.
    ///
    /// Fit rule (as for [`Receiver::memory`]): the source's layout must equal this
    /// memory's exactly, region for region (for memory from [`prepare_memory`]:
    /// one region at guest address 0 of the same total size). Otherwise setup
    /// refuses with `RefuseCode::MemoryLayout`, naming both sizes.
    ///
    /// Contract: the memory must read as zero when the migration starts; memory
    /// that may hold anything goes through [`Receiver::memory`] instead.
    pub fn prepared_memory(mut self, m: Arc<GuestMemory>) -> Self {
        self.memory = Some(m);
        self.memory_zero = true;
        self
    }
    /// Add a device-state participant.
    pub fn participant(mut self, p: Box<dyn RestoreState>) -> Self {
        self.participants.push(p);
        self
    }
    /// Settings.
    pub fn config(mut self, c: ReceiverConfig) -> Self {
        self.config = c;
        self
    }
    /// Share this host's limit on simultaneous incoming migrations (see
    /// [`HostLimiter`]). Without one, the receiver does not count itself.
    pub fn host_limiter(mut self, l: Arc<HostLimiter>) -> Self {
        self.limiter = Some(l);
        self
    }
    /// Extra setup check (the hypervisor's own policy).
    pub fn setup_check(mut self, c: SetupCheck) -> Self {
        self.setup_check = Some(c);
        self
    }

    /// Receive one migration from `acceptor`.
    pub fn run(mut self, acceptor: &dyn Acceptor) -> Result<Received, ReceiveError> {
        let r = self.run_inner(acceptor);
        if r.is_err() {
            for p in self.participants.iter_mut() {
                p.discard();
            }
            // Only a session that reached `Prepared` can have a source in doubt.
            let recorded = self.handoff != DestState::Receiving;
            self.handoff = self.handoff.on(DestEvent::Failed);
            if let (Some(s), true) = (self.session, recorded) {
                let _ = self.outcomes.record(s, self.handoff.outcome());
            }
        }
        r
    }

    /// Move the handoff state and record the outcome it implies.
    fn handoff(&mut self, e: DestEvent) -> Result<(), outcomes::OutcomeLogError> {
        self.handoff = self.handoff.on(e);
        match self.session {
            Some(s) => self.outcomes.record(s, self.handoff.outcome()),
            None => Ok(()),
        }
    }

    /// The phases in order; each hands the next what it needs.
    fn run_inner(&mut self, acceptor: &dyn Acceptor) -> Result<Received, ReceiveError> {
        let restart::Established {
            mut control,
            session,
            streams,
            permit: _permit,
            started,
            skeleton:
                Skeleton {
                    memory,
                    setup_ms,
                    prepared,
                },
            shared,
            page_streams,
            first_round,
            mut stray_connections,
            restarts: setup_restarts,
            mut resumes,
        } = self.establish(acceptor)?;
        // What was applied outlives a broken connection: a resumed session goes on
        // with it.
        let (mut page_streams, mut first_round) = (page_streams, first_round);
        let rounds = loop {
            match self.receive_rounds(
                &mut control,
                &shared,
                page_streams,
                first_round,
                resumes == 0,
            ) {
                Ok(done) => break done,
                Err(RoundsFailed { error, resumable }) => {
                    if !resumable
                        || resumes >= self.config.max_resumes
                        || self.config.resume_window.is_zero()
                    {
                        return Err(error);
                    }
                    let r = self.await_resume(
                        acceptor,
                        &session,
                        streams,
                        &shared,
                        error,
                        &mut resumes,
                    )?;
                    control = r.control;
                    page_streams = r.streams;
                    first_round = r.round;
                    stray_connections += r.stray_connections;
                }
            }
        };
        let committed = self.commit(&mut control, &memory, &rounds)?;

        let shared = &rounds.shared;
        let report = ReceiveReport {
            memory_bytes: memory.total_bytes(),
            streams,
            rounds: rounds.commit.rounds,
            pages_applied: shared.pages.load(Ordering::Relaxed),
            zero_pages: shared.zero_pages.load(Ordering::Relaxed),
            torn_pages: shared.torn_pages.load(Ordering::Relaxed),
            bytes_received: shared.bytes.load(Ordering::Relaxed) + control.bytes(),
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            setup_ms,
            memory_prepared: prepared,
            verify_ms: committed.verify_us as f64 / 1e3,
            restore_ms: committed.restore_us as f64 / 1e3,
            digest: committed.digest.to_string(),
            verified: true,
            participants: committed
                .participants_us
                .iter()
                .map(|(id, _)| id.clone())
                .collect(),
            participant_restore_ms: committed
                .participants_us
                .into_iter()
                .map(|(id, us)| (id, us as f64 / 1e3))
                .collect(),
            session: session.to_string(),
            stray_connections,
            outcome_known: committed.outcome_known,
            resumes,
            setup_restarts,
        };
        Ok(Received { report, memory })
    }
}

/// Destination memory prepared in advance for [`Receiver::prepared_memory`]: one
/// anonymous region of `bytes` at guest address 0, with transparent huge pages when
/// `config.huge_pages`, committed now (every page faulted in) when
/// `config.prealloc`, otherwise left to fault in as pages arrive. A VMM calls this
/// when it starts, before it listens for the migration.
pub fn prepare_memory(
    bytes: u64,
    config: &ReceiverConfig,
) -> Result<Arc<GuestMemory>, MemoryError> {
    let len =
        usize::try_from(bytes).map_err(|_| MemoryError::Overflow("the prepared memory size"))?;
    let m = GuestMemory::anonymous(len, config.huge_pages)?;
    if config.prealloc {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        m.prefault(threads)?;
    }
    Ok(Arc::new(m))
}

/// Maps a transport failure in `phase` to the receiver's error.
fn transport_error(phase: &'static str) -> impl Fn(TransportError) -> ReceiveError {
    move |source| ReceiveError::Transport { phase, source }
}

/// Whether a transport failure is a deadline or read timeout running out.
fn is_timeout(e: &TransportError) -> bool {
    match e {
        TransportError::TimedOut { .. } => true,
        TransportError::Io { source, .. } | TransportError::Accept(source) => matches!(
            source.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ),
        _ => false,
    }
}

/// Maps a failed read in `phase` that waited up to `after`: a timeout becomes
/// [`ReceiveError::TimedOut`] saying what did not arrive.
fn read_error(
    phase: &'static str,
    what: &'static str,
    after: Duration,
) -> impl Fn(TransportError) -> ReceiveError {
    move |source| {
        if is_timeout(&source) {
            ReceiveError::TimedOut {
                phase,
                what: Awaited::Source(what),
                after,
                stray_connections: 0,
                last_stray: None,
            }
        } else {
            ReceiveError::Transport { phase, source }
        }
    }
}

/// The next incoming connection in `phase`, or `None` once `give_up` has passed. A
/// connection the peer aborted before it was accepted is skipped.
fn next_connection(
    phase: &'static str,
    acceptor: &dyn Acceptor,
    give_up: Instant,
) -> Result<Option<Box<dyn Stream>>, ReceiveError> {
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match acceptor.accept(left) {
            Ok(s) => return Ok(Some(s)),
            Err(e) if is_timeout(&e) => return Ok(None),
            Err(TransportError::Accept(e)) if e.kind() == std::io::ErrorKind::ConnectionAborted => {
            }
            Err(e) => return Err(transport_error(phase)(e)),
        }
    }
}

fn stray_note(n: u32) -> String {
    match n {
        0 => String::new(),
        1 => " (1 stray connection dropped)".into(),
        n => format!(" ({n} stray connections dropped)"),
    }
}

/// The source broke the protocol in `phase`.
fn protocol_error(phase: &'static str, violation: ProtocolViolation) -> ReceiveError {
    ReceiveError::Protocol { phase, violation }
}

/// Tell the source why it is refused (best effort: it may be gone) and return
/// the same refusal.
fn refuse(control: &mut FrameReader, code: RefuseCode, reason: RefuseReason) -> ReceiveError {
    let _ = control.send_control(
        &ControlMsg::Refuse {
            code,
            message: reason.to_string(),
        },
        &[],
    );
    ReceiveError::Refused { code, reason }
}

/// Tell the source about a veto (best effort).
fn send_veto(control: &mut FrameReader, v: &Veto) {
    let _ = control.send_control(
        &ControlMsg::Veto {
            participant: v.participant.clone(),
            reason: v.reason.clone(),
        },
        &[],
    );
}

#[cfg(test)]
mod prefault_rule_tests {
    use super::prefault_pays;

    #[test]
    fn the_background_prefault_needs_a_cpu_beyond_the_appliers_and_control() {
        assert!(!prefault_pays(2, 2));
        assert!(!prefault_pays(2, 3));
        assert!(prefault_pays(2, 4));
        assert!(prefault_pays(1, 3));
        assert!(!prefault_pays(8, 8));
    }
}
