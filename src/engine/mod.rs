//! The source side: a pre-copy migration of one VM's memory.
//!
//! [`Migration`] wires the pieces: setup handshake ([`setup`]) → round loop
//! ([`precopy`], mechanism only) asking a [`policy::ConvergencePolicy`] after each
//! round → brownout ([`brownout`]: pause, final pages, device state, digest, commit).
//! Any failure before the destination commits resumes the source VM.

pub mod auto;
pub mod brownout;
pub mod pipeline;
pub mod policy;
pub mod precopy;
pub mod setup;
pub mod slots;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::codec::CodecId;
use crate::device::{ParticipantError, SaveState, Veto};
use crate::dirty::{DirtyTracker, TrackError};
use crate::memory::{GuestMemory, MemoryError};
use crate::stats::{MigrationReport, ProgressSink};
use crate::transport::{Connector, TransportError};
use crate::wire::control::{CompatVector, RefuseCode};

pub use policy::{ConvergencePolicy, Decision, DowntimePolicy, OnLimit};
pub use slots::{HostSlots, SlotGuard};

/// Controls the source VM's execution. Implemented by the hypervisor.
pub trait VmControl: Send {
    /// Stop the guest's vCPUs (and device emulation that writes memory).
    fn pause(&mut self) -> Result<(), String>;
    /// Resume after a failed or cancelled migration.
    fn resume(&mut self) -> Result<(), String>;
    /// Slow the guest down by `percent` (0 = full speed) — auto-converge.
    fn throttle(&mut self, percent: u8) -> Result<(), String>;
}

/// A VM that is already stopped (e.g. sending a memory image): pause/resume do nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct StoppedVm;

impl VmControl for StoppedVm {
    fn pause(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn throttle(&mut self, _percent: u8) -> Result<(), String> {
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
    /// (see [`auto`]); `streams` is the maximum.
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
    /// Compare one digest of the per-page hashes sent and applied (≈0.2 ms per GiB).
    /// Catches lost, reordered, corrupted or misapplied pages.
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
        }
    }
}

/// Cancels a running migration from another thread (API and Ctrl-C).
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Request cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    /// Was cancellation requested?
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Why a migration failed. In every case the source VM keeps (or resumes) running.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The destination refused at handshake or setup.
    #[error("destination refused the migration ({code:?}): {message}")]
    Refused {
        /// Reason code.
        code: RefuseCode,
        /// Destination's message.
        message: String,
    },
    /// A participant (or the memory check) vetoed at commit.
    #[error("destination vetoed the switchover: {0}")]
    Vetoed(Veto),
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
    Vm(String),
    /// Cancelled by the operator.
    #[error("migration cancelled; the source VM keeps running")]
    Cancelled,
    /// The policy gave up.
    #[error("migration aborted by policy: {0}")]
    PolicyAbort(String),
    /// The peer broke the protocol.
    #[error("protocol error during {phase}: {message}")]
    Protocol {
        /// Phase.
        phase: &'static str,
        /// What.
        message: String,
    },
    /// A page worker failed.
    #[error("sending pages failed: {0}")]
    Send(String),
    /// The destination reported an error.
    #[error("destination failed: {0}")]
    Remote(String),
    /// No session token could be drawn (the system random source failed).
    #[error("{0}")]
    SessionToken(#[from] crate::session::TokenError),
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
}

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
