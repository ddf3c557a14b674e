//! The destination side: skeleton VM, page application, verification, commit.
//!
//! State machine (enforced here; see docs/PROTOCOL.md):
//! `AwaitHello → AwaitSetup → AcceptStreams → Rounds (pages on N streams, gated)
//!  → [Brownout] → DeviceState → Commit → Prepared → Released → Committed | Veto`,
//! with `Abort` or any error leading to `Discarded` from every state. Setup-stage
//! refusals live in [`setup_check`], the per-host concurrency limit in [`limiter`].

pub mod apply;
pub mod gate;
pub mod limiter;
pub mod setup_check;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::device::{envelope, ParticipantError, RestoreState, Veto};
use crate::memory::{GuestMemory, MemoryError, MemoryLayout};
use crate::transport::framed::FrameReader;
use crate::transport::{Acceptor, TransportError};
use crate::wire::control::{CompatVector, RefuseCode};
use crate::wire::{ControlMsg, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use apply::{apply_stream, ApplyShared};
pub use limiter::{HostLimiter, Permit};
pub use setup_check::HostCaps;
use setup_check::Refusal;

/// Destination settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Ask for transparent huge pages when allocating the skeleton VM's memory.
    pub huge_pages: bool,
    /// Pre-fault destination memory in the background during round 0.
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
    /// How long to wait for each connection.
    pub accept_timeout: Duration,
    /// Longest silence on the control stream before giving up (source vanished).
    pub idle_timeout: Duration,
    /// Most page streams accepted.
    pub max_streams: u16,
    /// Host capabilities.
    pub host: HostCaps,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            huge_pages: true,
            prefault: true,
            prealloc: false,
            accept_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            max_streams: 64,
            host: HostCaps::default(),
        }
    }
}

/// Why receiving failed. The destination discards everything it received.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// We refused the source (the reason was sent to it).
    #[error("refused the incoming migration ({code:?}): {message}")]
    Refused {
        /// Code.
        code: RefuseCode,
        /// Message.
        message: String,
    },
    /// A participant vetoed (sent to the source).
    #[error("vetoed: {0}")]
    Vetoed(Veto),
    /// The memory digest did not match.
    #[error("memory verification failed: {0}")]
    VerifyFailed(String),
    /// The source cancelled.
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    /// Page application failed (corrupt, truncated or out-of-order stream).
    #[error("receiving pages failed: {0}")]
    Pages(String),
    /// Transport failure.
    #[error("transport failed during {phase}: {source}")]
    Transport {
        /// Phase.
        phase: &'static str,
        /// Error.
        source: TransportError,
    },
    /// The source broke the protocol.
    #[error("protocol error during {phase}: {message}")]
    Protocol {
        /// Phase.
        phase: &'static str,
        /// What.
        message: String,
    },
    /// Allocating the skeleton VM failed.
    #[error("allocating destination memory: {0}")]
    Memory(#[from] MemoryError),
    /// A participant failed to restore.
    #[error("restoring device state: {0}")]
    Participant(#[from] ParticipantError),
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
}

/// A successful receive: the report and the destination memory (now the VM's).
#[derive(Debug)]
pub struct Received {
    /// Report.
    pub report: ReceiveReport,
    /// Memory holding the migrated guest.
    pub memory: Arc<GuestMemory>,
}

/// Checks a setup request beyond layout and caps (a hypervisor's own policy).
pub type SetupCheck =
    Box<dyn FnMut(&MemoryLayout, &CompatVector, &[u8]) -> Result<(), (RefuseCode, String)> + Send>;

/// The destination of one migration.
pub struct Receiver {
    memory: Option<Arc<GuestMemory>>,
    participants: Vec<Box<dyn RestoreState>>,
    config: ReceiverConfig,
    setup_check: Option<SetupCheck>,
    limiter: Option<Arc<HostLimiter>>,
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

fn t(phase: &'static str) -> impl Fn(TransportError) -> ReceiveError {
    move |source| ReceiveError::Transport { phase, source }
}

impl Receiver {
    /// A receiver that allocates the skeleton VM's memory from the source's layout.
    pub fn new() -> Self {
        Self {
            memory: None,
            participants: Vec::new(),
            config: ReceiverConfig::default(),
            setup_check: None,
            limiter: None,
        }
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
        }
        r
    }

    fn refuse(control: &mut FrameReader, code: RefuseCode, message: String) -> ReceiveError {
        let _ = control.send_control(
            &ControlMsg::Refuse {
                code,
                message: message.clone(),
            },
            &[],
        );
        ReceiveError::Refused { code, message }
    }

    fn run_inner(&mut self, acceptor: &dyn Acceptor) -> Result<Received, ReceiveError> {
        let stream = acceptor
            .accept(self.config.accept_timeout)
            .map_err(t("accept"))?;
        let started = Instant::now();
        let _ = stream.set_read_timeout(Some(self.config.accept_timeout));
        let mut control = FrameReader::new(stream, "control");

        // Handshake: version, then this host's capacity (the permit is held until
        // `run` returns).
        let _permit: Option<Permit>;
        let (session, streams) = match control.control().map_err(t("handshake"))?.0 {
            ControlMsg::Hello {
                magic,
                major,
                minor,
                session,
                streams,
                ..
            } => {
                if let Err(message) = setup_check::check_version(&magic, major, minor) {
                    return Err(Self::refuse(&mut control, RefuseCode::Version, message));
                }
                _permit = match &self.limiter {
                    None => None,
                    Some(l) => match l.try_acquire() {
                        Some(p) => Some(p),
                        None => {
                            return Err(Self::refuse(
                                &mut control,
                                RefuseCode::HostBusy,
                                format!(
                                    "this host already runs {} incoming migration(s), its limit; retry when one finishes",
                                    l.limit()
                                ),
                            ))
                        }
                    },
                };
                if streams == 0 || streams > self.config.max_streams {
                    return Err(Self::refuse(
                        &mut control,
                        RefuseCode::Other,
                        format!(
                            "{streams} page streams requested; this destination accepts 1 to {}",
                            self.config.max_streams
                        ),
                    ));
                }
                (session, streams)
            }
            other => {
                return Err(ReceiveError::Protocol {
                    phase: "handshake",
                    message: format!("expected hello, got {}", other.name()),
                })
            }
        };
        let welcome = ControlMsg::Welcome {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            capabilities: crate::engine::setup::CAPABILITIES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        control
            .send_control(&welcome, &[])
            .map_err(t("handshake"))?;

        // Setup: check, then build the skeleton VM (memory) before any page arrives.
        let (msg, attachment) = control.control().map_err(t("setup"))?;
        let ControlMsg::Setup {
            layout,
            compat,
            config_len,
            participants,
        } = msg
        else {
            return Err(ReceiveError::Protocol {
                phase: "setup",
                message: format!("expected setup, got {}", msg.name()),
            });
        };
        let t_setup = Instant::now();
        let memory =
            match self.check_setup(&layout, &compat, config_len, &participants, &attachment) {
                Ok(()) => match self.memory.clone() {
                    Some(m) => m,
                    None => {
                        let refuse = |control: &mut crate::transport::framed::FrameReader,
                                      message: String| {
                            let _ = control.send_control(
                                &ControlMsg::Refuse {
                                    code: RefuseCode::MemoryLayout,
                                    message,
                                },
                                &[],
                            );
                        };
                        let m = GuestMemory::from_layout(&layout, self.config.huge_pages).map_err(
                            |e| {
                                refuse(&mut control, format!("cannot allocate: {e}"));
                                e
                            },
                        )?;
                        if self.config.prealloc {
                            let threads =
                                std::thread::available_parallelism().map_or(1, |n| n.get());
                            m.prefault(threads).map_err(|e| {
                                refuse(
                                    &mut control,
                                    format!(
                                        "cannot commit {} bytes of guest memory: {e}",
                                        m.total_bytes()
                                    ),
                                );
                                e
                            })?;
                        }
                        Arc::new(m)
                    }
                },
                Err(Refusal::Refuse(code, message)) => {
                    return Err(Self::refuse(&mut control, code, message))
                }
                Err(Refusal::Veto(v)) => {
                    let _ = control.send_control(
                        &ControlMsg::Veto {
                            participant: v.participant.clone(),
                            reason: v.reason.clone(),
                        },
                        &[],
                    );
                    return Err(ReceiveError::Vetoed(v));
                }
            };
        let setup_ms = t_setup.elapsed().as_secs_f64() * 1e3;
        control
            .send_control(&ControlMsg::SetupOk, &[])
            .map_err(t("setup"))?;

        // Page streams.
        let mut readers = Vec::with_capacity(streams as usize);
        let mut seen = vec![false; streams as usize];
        for _ in 0..streams {
            let s = acceptor
                .accept(self.config.accept_timeout)
                .map_err(t("accepting page streams"))?;
            let mut r = FrameReader::new(s, "page");
            match r.control().map_err(t("accepting page streams"))?.0 {
                ControlMsg::StreamHello { session: s2, index }
                    if s2 == session && (index as usize) < seen.len() && !seen[index as usize] =>
                {
                    seen[index as usize] = true;
                    let _ = r.stream().set_read_timeout(Some(self.config.idle_timeout));
                    readers.push((index, r));
                }
                other => {
                    return Err(ReceiveError::Protocol {
                        phase: "accepting page streams",
                        message: format!("bad stream hello ({other:?})"),
                    })
                }
            }
        }
        let _ = control
            .stream()
            .set_read_timeout(Some(self.config.idle_timeout));
        let shared = Arc::new(
            ApplyShared::new(memory.clone(), streams as usize).caller_memory(self.memory.is_some()),
        );
        let shutdowns: Vec<_> = readers
            .iter()
            .map(|(_, r)| r.stream().shutdown_handle())
            .collect();
        let cut_all = |sh: &[Box<dyn Fn() + Send + Sync>]| sh.iter().for_each(|s| s());
        let prefault = if self.config.prefault && !self.config.prealloc && self.memory.is_none() {
            let m = memory.clone();
            Some(std::thread::spawn(move || m.prefault(1)))
        } else {
            None
        };
        let handles: Vec<_> = readers
            .into_iter()
            .map(|(i, r)| {
                let sh = shared.clone();
                std::thread::Builder::new()
                    .name(format!("livemig-recv{i}"))
                    .spawn(move || {
                        let res = apply_stream(&sh, r, i);
                        if res.is_err() {
                            sh.gate.abort();
                        }
                        res
                    })
                    .expect("spawn receiver thread")
            })
            .collect();
        // A failing page stream cuts every page stream so the source's writers fail
        // fast instead of blocking; a watcher does that as soon as the flag is set.
        let watcher = {
            let sh = shared.clone();
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let d2 = done.clone();
            let h = std::thread::spawn(move || {
                while !d2.load(Ordering::Acquire) {
                    if sh.failed.load(Ordering::Acquire) {
                        cut_all(&shutdowns);
                        return;
                    }
                    // Parked, not slept: stopping the watcher unparks it, so the
                    // commit does not wait out a poll interval.
                    std::thread::park_timeout(Duration::from_millis(5));
                }
            });
            (done, h)
        };
        let join_all =
            |handles: Vec<std::thread::JoinHandle<Result<(), String>>>| -> Result<(), String> {
                let mut first = Ok(());
                for h in handles {
                    let r = h
                        .join()
                        .unwrap_or_else(|_| Err("receiver thread panicked".into()));
                    if first.is_ok() {
                        first = r;
                    }
                }
                first
            };
        let stop_watcher = |w: (
            Arc<std::sync::atomic::AtomicBool>,
            std::thread::JoinHandle<()>,
        )| {
            w.0.store(true, Ordering::Release);
            w.1.thread().unpark();
            let _ = w.1.join();
        };

        // Control stream: wait for brownout, device state and commit.
        let mut device_state: Option<Vec<u8>> = None;
        let commit = loop {
            let msg = control.control();
            let page_error = || shared.error.lock().expect("error lock").clone();
            match msg {
                Ok((ControlMsg::Brownout { .. }, _)) => {}
                Ok((ControlMsg::DeviceState, blob)) => device_state = Some(blob),
                Ok((
                    ControlMsg::Commit {
                        digest,
                        pages,
                        rounds,
                    },
                    _,
                )) => break (digest, pages, rounds),
                Ok((ControlMsg::Abort { reason }, _)) => {
                    shared.fail(format!("aborted: {reason}"));
                    let _ = join_all(handles);
                    stop_watcher(watcher);
                    // A page error is the root cause when there is one.
                    return Err(match page_error() {
                        Some(e) if !e.starts_with("aborted") => ReceiveError::Pages(e),
                        _ => ReceiveError::Aborted(reason),
                    });
                }
                Ok((other, _)) => {
                    shared.fail(format!("unexpected {}", other.name()));
                    let _ = join_all(handles);
                    stop_watcher(watcher);
                    return Err(ReceiveError::Protocol {
                        phase: "rounds",
                        message: format!("unexpected {}", other.name()),
                    });
                }
                Err(e) => {
                    shared.fail(e.to_string());
                    let _ = join_all(handles);
                    stop_watcher(watcher);
                    return Err(match page_error() {
                        Some(pe) if pe != e.to_string() => ReceiveError::Pages(pe),
                        _ => ReceiveError::Transport {
                            phase: "rounds",
                            source: e,
                        },
                    });
                }
            }
        };
        let pages_result = join_all(handles);
        stop_watcher(watcher);
        if let Some(p) = prefault {
            let _ = p.join();
        }
        if let Err(e) = pages_result {
            let _ = control.send_control(&ControlMsg::Error { message: e.clone() }, &[]);
            return Err(ReceiveError::Pages(e));
        }

        // Verify: the running digest of everything applied against the source's
        // digest of everything sent (two fixed-size values; see `proof::digest`).
        let (digest, pages, rounds) = commit;
        let t_verify = Instant::now();
        let ours = shared.applied.digest();
        let verify_us = t_verify.elapsed().as_micros() as u64;
        if pages != memory.total_pages() || ours != digest {
            let reason = format!(
                "memory digest mismatch: source {digest} over {pages} pages, destination {ours} over {} pages",
                memory.total_pages()
            );
            let _ = control.send_control(
                &ControlMsg::Veto {
                    participant: "memory".into(),
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(ReceiveError::VerifyFailed(reason));
        }

        // Device state: validate every participant before restoring any.
        let t_restore = Instant::now();
        let entries = match envelope::decode(device_state.as_deref().unwrap_or(&[])) {
            Ok(e) => e,
            Err(e) => {
                let reason = format!("device-state envelope rejected: {e}");
                let _ = control.send_control(
                    &ControlMsg::Veto {
                        participant: "envelope".into(),
                        reason: reason.clone(),
                    },
                    &[],
                );
                return Err(ReceiveError::Vetoed(Veto {
                    participant: "envelope".into(),
                    reason,
                }));
            }
        };
        if let Err(v) = self.validate_all(&entries) {
            let _ = control.send_control(
                &ControlMsg::Veto {
                    participant: v.participant.clone(),
                    reason: v.reason.clone(),
                },
                &[],
            );
            return Err(ReceiveError::Vetoed(v));
        }
        // Everything is validated: let the source release its devices (switch-port
        // step 5) before restoring ours (steps 6–7). See `ControlMsg::Prepared`.
        let validate_us = t_restore.elapsed().as_micros() as u64;
        control
            .send_control(
                &ControlMsg::Prepared {
                    verify_us,
                    validate_us,
                },
                &[],
            )
            .map_err(t("commit"))?;
        match control.control().map_err(t("commit"))?.0 {
            ControlMsg::Released => {}
            ControlMsg::Abort { reason } => return Err(ReceiveError::Aborted(reason)),
            other => {
                return Err(ReceiveError::Protocol {
                    phase: "commit",
                    message: format!("expected released, got {}", other.name()),
                })
            }
        }
        let t_restore = Instant::now();
        let mut participants_us = Vec::with_capacity(entries.len());
        for e in &entries {
            let p = self
                .participants
                .iter_mut()
                .find(|p| p.id() == e.id)
                .expect("validated above");
            let t_p = Instant::now();
            let r = p.restore(e.version, &e.blob);
            participants_us.push((e.id.clone(), t_p.elapsed().as_micros() as u64));
            if let Err(err) = r {
                let _ = control.send_control(
                    &ControlMsg::Error {
                        message: err.to_string(),
                    },
                    &[],
                );
                return Err(err.into());
            }
        }
        let restore_us = validate_us + t_restore.elapsed().as_micros() as u64;
        control
            .send_control(
                &ControlMsg::Committed {
                    verify_us,
                    restore_us,
                    participants_us: participants_us.clone(),
                },
                &[],
            )
            .map_err(t("commit"))?;

        let report = ReceiveReport {
            memory_bytes: memory.total_bytes(),
            streams,
            rounds,
            pages_applied: shared.pages.load(Ordering::Relaxed),
            zero_pages: shared.zero_pages.load(Ordering::Relaxed),
            torn_pages: shared.torn_pages.load(Ordering::Relaxed),
            bytes_received: shared.bytes.load(Ordering::Relaxed) + control.bytes(),
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            setup_ms,
            verify_ms: verify_us as f64 / 1e3,
            restore_ms: restore_us as f64 / 1e3,
            digest: ours.to_string(),
            verified: true,
            participants: entries.iter().map(|e| e.id.clone()).collect(),
            participant_restore_ms: participants_us
                .into_iter()
                .map(|(id, us)| (id, us as f64 / 1e3))
                .collect(),
        };
        Ok(Received { report, memory })
    }

    fn validate_all(&mut self, entries: &[envelope::Entry]) -> Result<(), Veto> {
        for p in self.participants.iter() {
            if !entries.iter().any(|e| e.id == p.id()) {
                return Err(Veto {
                    participant: p.id().into(),
                    reason: "no state arrived for this device".into(),
                });
            }
        }
        for e in entries {
            let Some(p) = self.participants.iter_mut().find(|p| p.id() == e.id) else {
                return Err(Veto {
                    participant: e.id.clone(),
                    reason: "state for a device this host does not have".into(),
                });
            };
            p.validate_state(e.version, &e.blob)?;
        }
        Ok(())
    }
}
