//! The source side: a pre-copy migration of one VM's memory.
//!
//! [`Migration`] wires the pieces: setup handshake (`setup`) → round loop
//! (`precopy`, mechanism only) asking a [`policy::ConvergencePolicy`] after each
//! round → brownout (`brownout`: pause, final pages, device state, digest, commit).
//! Any failure before the source releases the VM resumes it; after `Released` the
//! source learns the outcome or stays paused, in doubt ([`commit`]).

pub(crate) mod auto;
pub(crate) mod brownout;
pub mod cancel;
pub mod codec_policy;
pub mod commit;
pub(crate) mod control;
pub(crate) mod drain;
pub(crate) mod encode;
mod error;
pub(crate) mod gate;
pub(crate) mod pipeline;
pub mod policy;
pub(crate) mod precopy;
pub(crate) mod resume;
pub(crate) mod run;
pub(crate) mod setup;
pub mod slots;
mod vm_control;

use std::sync::Arc;
use std::time::Duration;

use crate::codec::CodecId;
use crate::device::{ParticipantError, SaveState, Veto};
use crate::dirty::{DirtyTracker, TrackError};
use crate::memory::{GuestMemory, MemoryError};
use crate::stats::{MigrationReport, ProgressSink};
use crate::transport::{Connector, TransportError};
use crate::wire::control::{CompatVector, RefuseCode, SessionId};
use crate::wire::{PeerText, ProtocolViolation};

pub use cancel::CancelToken;
pub use commit::SourceState;
#[cfg(feature = "bench")]
#[doc(hidden)]
pub use encode::BatchBench;
pub use encode::ImageRead;
pub use error::{DoubtReason, OutcomeUnknown, PanicMessage, SendError, StreamFailure};
pub use pipeline::batches_of;
pub use policy::{AbortReason, ConvergencePolicy, Decision, DowntimePolicy, OnLimit};
pub use slots::{HostSlots, SlotGuard};
pub use vm_control::VmControlError;

/// Controls the source VM's execution. Implemented by the hypervisor.
pub trait VmControl: Send {
    /// Stop the guest's vCPUs (and device emulation that writes memory). On an
    /// error (even after stopping only some vCPUs) the engine calls
    /// [`VmControl::resume`], so it must resume whatever did stop.
    fn pause(&mut self) -> Result<(), VmControlError>;
    /// Resume after a failed or cancelled migration.
    fn resume(&mut self) -> Result<(), VmControlError>;
    /// Slow the guest down by `percent` (0 = full speed) — auto-converge.
    fn throttle(&mut self, percent: u8) -> Result<(), VmControlError>;
}

/// A VM that is already stopped (e.g. sending a memory image): pause/resume do nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct StoppedVm;

impl VmControl for StoppedVm {
    fn pause(&mut self) -> Result<(), VmControlError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmControlError> {
        Ok(())
    }
    fn throttle(&mut self, _percent: u8) -> Result<(), VmControlError> {
        Ok(())
    }
}

/// How pages travel (Hyper-V's performance options, plus `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One TCP stream, raw pages.
    Standard,
    /// Parallel compression workers (one stream each), lz4 or zstd.
    Compress,
    /// N raw streams (our model of SMB Multichannel).
    Multichannel,
    /// Per-batch choice of raw, lz4 or zstd and a measured stream count
    /// (see `engine::auto`); `streams` is the maximum.
    Auto,
}

impl Mode {
    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Compress => "compress",
            Self::Multichannel => "multichannel",
            Self::Auto => "auto",
        }
    }
}

/// How the destination's memory is proven equal to the source's at brownout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Compare the running digests of the per-page hashes sent and applied (two
    /// 16-byte values, µs at any guest size). Catches lost, reordered, corrupted or
    /// misapplied pages; tracker misses are the audits' job
    /// ([`MigrationConfig::audit`], [`MigrationConfig::post_audit`]).
    Digest,
    /// Also rescan all source memory while paused and re-send any page whose content
    /// differs from what was sent, so a tracker that missed a write cannot cause a
    /// loss (costs a full-memory hash in the downtime; reported as tracker_misses).
    Full,
}

/// Source-side settings.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Transport mode.
    pub mode: Mode,
    /// Page streams.
    pub streams: u16,
    /// Payload codec (raw for standard/multichannel).
    pub codec: CodecId,
    /// zstd level.
    pub zstd_level: i32,
    /// Verification.
    pub verify: Verify,
    /// How long to wait for the destination's answers (setup, commit).
    pub reply_timeout: Duration,
    /// Opaque VM configuration for the destination's hypervisor.
    pub vm_config: Vec<u8>,
    /// Compatibility vector checked by the destination at setup.
    pub compat: CompatVector,
    /// Cap on the page streams' total send rate, shared by all streams (bits/s).
    pub bandwidth: Option<Arc<crate::transport::shaped::TokenBucket>>,
    /// Processor compatibility mode: the CPU features common to every host the VM
    /// may move to (see [`crate::compat::common_cpu_features`]). When set, the VM
    /// only requires its features within this set. `None`: the VM requires all of
    /// `compat.cpu_features`.
    pub processor_compat: Option<Vec<String>>,
    /// Expected device-state save + transfer + restore time, counted in the
    /// predicted downtime.
    pub expected_device_state: Duration,
    /// Send re-sent pages as deltas against their previously sent version (copy
    /// path; with codec raw this turns zero-copy sending off).
    pub delta: bool,
    /// Delta cache budget in bytes (0: 1/16 of guest memory, 1 MiB to 1 GiB).
    pub delta_cache_bytes: u64,
    /// Send raw guest pages with `vmsplice` + `splice` (no copy on the sender) where
    /// the page stream is a plain TCP socket; otherwise, and for compressed or delta
    /// batches, frames are written with `writev`/`write`. See
    /// [`crate::transport::splice`]. Off by default: on loopback the receiver then
    /// reads the source's pages instead of the sender's freshly written copy and
    /// the migration was 10–25 % slower here (docs/BENCHMARKS.md); the saving is
    /// meant for real NICs, where the sender's copy is pure overhead.
    pub splice: bool,
    /// Longest time from the pause to the destination's `Prepared` (the brownout
    /// as a whole). Past it the source aborts and resumes the VM.
    pub brownout_timeout: Duration,
    /// Interval between heartbeats on the control stream while rounds run
    /// (capped at a quarter of `peer_timeout`).
    pub heartbeat_interval: Duration,
    /// Longest silence tolerated from the destination while rounds run (no answer
    /// to heartbeats); page streams that complete no batch for four times this
    /// long are failed as stalled.
    pub peer_timeout: Duration,
    /// How long a source whose connection broke during the rounds keeps trying to
    /// reconnect and resume the session (attempts back off exponentially, each
    /// bounded by `peer_timeout`) before it fails the migration; the VM runs
    /// throughout. `Duration::ZERO`: never resume.
    pub reconnect_timeout: Duration,
    /// How long a source in doubt (it released the VM, then lost the channel
    /// before learning the outcome) keeps asking the destination before it gives
    /// up and reports [`MigrationError::InDoubt`], VM still paused.
    pub outcome_timeout: Duration,
    /// The sampled audit of clean pages after each harvest (sample size, seed);
    /// `sample_pages: 0` turns it off. See [`crate::proof::audit`].
    pub audit: crate::proof::AuditConfig,
    /// After the destination committed, audit all of the paused source's memory
    /// against what was sent (outside the downtime; the report's `post_audit`).
    /// Stale pages go to the [`Migration::on_stale_pages`] hook. Skipped without a
    /// tracker (the VM was stopped throughout).
    pub post_audit: bool,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Multichannel,
            streams: 2,
            codec: CodecId::Raw,
            zstd_level: 1,
            verify: Verify::Digest,
            reply_timeout: Duration::from_secs(60),
            vm_config: Vec::new(),
            compat: CompatVector::default(),
            bandwidth: None,
            processor_compat: None,
            expected_device_state: Duration::ZERO,
            delta: false,
            delta_cache_bytes: 0,
            splice: false,
            brownout_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(30),
            reconnect_timeout: Duration::from_secs(30),
            outcome_timeout: Duration::from_secs(60),
            audit: crate::proof::AuditConfig::default(),
            post_audit: true,
        }
    }
}

/// Why a migration failed. In every case but [`MigrationError::InDoubt`] the source
/// VM keeps (or resumes) running.
///
/// Every cause livemig finds itself is typed, and `source()` leads to the
/// underlying error (a [`MemoryError`], a [`TransportError`], …); a cause held in
/// a `Box` or an `Arc` appears in the chain as that `Box`/`Arc` (downcast to
/// `Box<MigrationError>`, `Arc<StreamFailure>`, …). Text the
/// destination sent (a refusal, its failure, a veto) is its claim, carried as
/// [`PeerText`] (sanitized and bounded) or, for a veto, with its fields sanitized
/// the same way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The destination refused at handshake or setup.
    #[error("destination refused the migration ({code:?}): {message}")]
    Refused {
        /// Reason code.
        code: RefuseCode,
        /// The destination's message (untrusted peer text).
        message: PeerText,
    },
    /// The destination kept the migration queued (its host runs its limit of
    /// incoming migrations) for longer than the source waits.
    #[error("queued at the destination for over {after:?} ({limit} migration(s) at once there, {waiting} waiting)")]
    QueuedTooLong {
        /// How long the source waited.
        after: Duration,
        /// The destination host's limit of concurrent migrations.
        limit: u32,
        /// Migrations waiting there, as last reported.
        waiting: u32,
    },
    /// A participant (or the memory check) vetoed at commit. The veto's fields
    /// come from the destination, sanitized as [`PeerText`].
    #[error("destination vetoed the switchover: {0}")]
    Vetoed(#[source] Veto),
    /// Transport failure.
    #[error("transport failed during {phase}: {source}")]
    Transport {
        /// Phase.
        phase: &'static str,
        /// Error.
        source: TransportError,
    },
    /// Tracker failure.
    #[error("dirty tracking failed: {0}")]
    Tracker(#[from] TrackError),
    /// Memory failure.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// A source participant failed to save.
    #[error("device state: {0}")]
    Participant(#[from] ParticipantError),
    /// VM control failed.
    #[error("VM control: {0}")]
    Vm(#[source] VmControlError),
    /// Cancelled by the operator.
    #[error("migration cancelled; the source VM keeps running")]
    Cancelled,
    /// The policy gave up.
    #[error("migration aborted by policy: {0}")]
    PolicyAbort(#[source] AbortReason),
    /// The peer broke the protocol.
    #[error("protocol error during {phase}: {violation}")]
    Protocol {
        /// Phase.
        phase: &'static str,
        /// What was wrong.
        #[source]
        violation: ProtocolViolation,
    },
    /// A page worker failed.
    #[error("sending pages failed: {0}")]
    Send(#[source] SendError),
    /// The destination reported an error.
    #[error("destination failed: {0}")]
    Remote(PeerText),
    /// The channel broke after the source released the VM, and the destination,
    /// asked, answered that it discarded the migration: the source VM resumes.
    #[error("the destination discarded the migration after the channel broke ({cause})")]
    DiscardedAfterBreak {
        /// What broke the channel.
        #[source]
        cause: Box<MigrationError>,
    },
    /// A page stream's connection was lost (closed, reset, or the peer took
    /// nothing within the peer timeout). During the rounds the session resumes
    /// on new connections when it can.
    #[error("page stream {stream} lost its connection: {source}")]
    PageStreamLost {
        /// Page stream index.
        stream: usize,
        /// The transport error (shared with the worker that met it).
        #[source]
        source: Arc<TransportError>,
    },
    /// The connection broke during the rounds and could not be resumed within
    /// `reconnect_timeout`; the VM keeps running.
    #[error("the connection broke ({cause}) and reconnecting to resume the migration failed after {attempts} attempt(s) within {after:?}: {last}")]
    ReconnectFailed {
        /// Reconnection attempts made.
        attempts: u32,
        /// The reconnection budget.
        after: Duration,
        /// What broke the connection.
        #[source]
        cause: Box<MigrationError>,
        /// The last attempt's error (a refusal ends the attempts at once).
        last: Box<MigrationError>,
    },
    /// A page worker panicked.
    #[error("page stream {stream}'s worker panicked: {message}")]
    WorkerPanicked {
        /// Page stream index.
        stream: usize,
        /// Panic message.
        message: PanicMessage,
    },
    /// A peer or a stream made no progress within its deadline.
    #[error("timed out waiting for {what} after {after:?}")]
    TimedOut {
        /// What was waited for.
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The brownout (pause to `Prepared`) outlasted `brownout_timeout`.
    #[error("the brownout exceeded its {after:?} deadline before the destination was prepared")]
    BrownoutTimeout {
        /// The deadline.
        after: Duration,
    },
    /// `VmControl::pause` failed; `resume` was called on whatever had paused.
    #[error("pausing the VM failed: {error}{}", resume_error.as_ref().map(|r| format!("; resuming it failed too: {r}")).unwrap_or_default())]
    PauseFailed {
        /// The pause error.
        #[source]
        error: VmControlError,
        /// The error of the resume that followed, if it failed.
        resume_error: Option<VmControlError>,
    },
    /// The switchover failed (`cause`) and resuming the source VM failed too: the
    /// VM is not running on either side.
    #[error("resuming the VM failed: {error} (after a failed switchover: {cause})")]
    ResumeFailed {
        /// The resume error.
        #[source]
        error: VmControlError,
        /// Why the switchover failed.
        cause: Box<MigrationError>,
    },
    /// The source released the VM and could not learn whether the destination
    /// committed. The source VM stays **paused**: resuming it could run the VM
    /// twice. Ask the destination (`livemig resolve`), then resume or discard.
    #[error("outcome in doubt for session {}: {reason}; the source VM stays paused (resolve with `livemig resolve --session {}`)", crate::receiver::outcomes::session_to_string(*session), crate::receiver::outcomes::session_to_string(*session))]
    InDoubt {
        /// The session to ask about.
        session: SessionId,
        /// Why the outcome is unknown.
        #[source]
        reason: DoubtReason,
    },
    /// No session token could be drawn (the system random source failed).
    #[error("{0}")]
    SessionToken(#[from] crate::session::TokenError),
}

impl MigrationError {
    /// Whether the source VM runs (or was resumed) after this error: false only
    /// in doubt, and when the VM could not be resumed.
    pub fn source_running(&self) -> bool {
        !matches!(
            self,
            Self::InDoubt { .. }
                | Self::ResumeFailed { .. }
                | Self::PauseFailed {
                    resume_error: Some(_),
                    ..
                }
        )
    }
}

/// A migration being configured.
pub struct Migration {
    pub(crate) memory: Arc<GuestMemory>,
    pub(crate) tracker: Option<Box<dyn DirtyTracker>>,
    pub(crate) vm: Box<dyn VmControl>,
    pub(crate) policy: Box<dyn ConvergencePolicy>,
    pub(crate) participants: Vec<Box<dyn SaveState>>,
    pub(crate) progress: Option<Arc<dyn ProgressSink>>,
    pub(crate) cancel: CancelToken,
    pub(crate) config: MigrationConfig,
    pub(crate) slots: Option<Arc<HostSlots>>,
    pub(crate) stale_pages_hook: Option<StalePagesHook>,
}

/// Called when the audit after switchover finds pages of the paused source that
/// differ from what the destination holds, with their guest frame numbers
/// (ascending). See [`Migration::on_stale_pages`].
pub type StalePagesHook = Box<dyn FnMut(&[u64]) + Send>;

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("pages", &self.memory.total_pages())
            .field("tracker", &self.tracker.as_ref().map(|t| t.name()))
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

impl Migration {
    /// Migrate `memory`. Defaults: no tracker (the VM must be stopped: one round),
    /// a stopped VM, the default downtime policy, multichannel with 2 streams.
    pub fn new(memory: Arc<GuestMemory>) -> Self {
        Self {
            memory,
            tracker: None,
            vm: Box::new(StoppedVm),
            policy: Box::new(DowntimePolicy::default()),
            participants: Vec::new(),
            progress: None,
            cancel: CancelToken::new(),
            config: MigrationConfig::default(),
            slots: None,
            stale_pages_hook: None,
        }
    }
    /// Dirty tracker (required for a running VM).
    pub fn tracker(mut self, t: Box<dyn DirtyTracker>) -> Self {
        self.tracker = Some(t);
        self
    }
    /// VM control callbacks.
    pub fn vm_control(mut self, vm: Box<dyn VmControl>) -> Self {
        self.vm = vm;
        self
    }
    /// Convergence policy.
    pub fn policy(mut self, p: Box<dyn ConvergencePolicy>) -> Self {
        self.policy = p;
        self
    }
    /// Add a device-state participant (saved in the order added).
    pub fn participant(mut self, p: Box<dyn SaveState>) -> Self {
        self.participants.push(p);
        self
    }
    /// Progress sink.
    pub fn progress(mut self, s: Arc<dyn ProgressSink>) -> Self {
        self.progress = Some(s);
        self
    }
    /// Cancellation token.
    pub fn cancel_token(mut self, c: CancelToken) -> Self {
        self.cancel = c;
        self
    }
    /// Settings.
    pub fn config(mut self, c: MigrationConfig) -> Self {
        self.config = c;
        self
    }
    /// Take one of the host's migration slots before starting (FIFO wait).
    pub fn slots(mut self, s: Arc<HostSlots>) -> Self {
        self.slots = Some(s);
        self
    }
    /// What to do when the audit after switchover fails.
    ///
    /// After the destination answered `Committed`, the engine hashes every page of
    /// the paused source (`MigrationConfig::post_audit`) and compares it with what it
    /// sent. A page that differs is one the tracker missed and the sampled audit did
    /// not catch: the destination, already running, holds an older version of it.
    /// The engine cannot repair that itself (its page streams are closed and the
    /// guest now runs on the destination), so it calls `hook` with the stale pages'
    /// guest frame numbers, before `run` returns. The source VM is still paused and
    /// its memory intact, so the hook can have the destination VMM re-apply those
    /// pages (safe only if the destination guest is stopped first), or escalate
    /// (stop the destination guest and report the VM as damaged). Without a hook,
    /// the failure shows only in the report (`post_audit.mismatches`, `verified:
    /// false`) and the [`crate::stats::Event::PostAudit`] event. The source must not
    /// discard the paused VM before `run` has returned.
    pub fn on_stale_pages(mut self, hook: StalePagesHook) -> Self {
        self.stale_pages_hook = Some(hook);
        self
    }
    /// Number of page streams.
    pub fn streams(mut self, n: u16) -> Self {
        self.config.streams = n.max(1);
        self
    }
    /// Run over `connector`.
    pub fn run(self, connector: &dyn Connector) -> Result<MigrationReport, MigrationError> {
        precopy::run(self, connector)
    }
    /// Run over TCP to `addr`.
    pub fn run_tcp(self, addr: &str) -> Result<MigrationReport, MigrationError> {
        self.run(&crate::transport::tcp::TcpConnector::new(addr))
    }
}
