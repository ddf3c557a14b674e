//! Phase 4, rounds: apply pages on every page stream (one thread each, gated per
//! round) while the control stream waits for brownout, device state and `Commit`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::accept::PageStream;
use super::apply::{apply_stream, ApplyShared, PageError, PageErrorKind, PageFault};
use super::{read_error, ReceiveError, Receiver};
use crate::stats::host_load;
use crate::transport::framed::FrameReader;
use crate::wire::ControlMsg;
use crate::wire::ProtocolViolation;

/// Longest wait for the appliers before answering `Drain`: the source's VM runs
/// meanwhile, and an answer that says "still behind" lets its policy run another
/// round instead of pausing onto a backlog.
const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// The source's `Commit`, with the device state that came before it.
pub(super) struct CommitRequest {
    /// The source's running digest of everything it sent.
    pub digest: crate::proof::MemoryDigest,
    /// Pages in the source's memory.
    pub pages: u64,
    /// Rounds sent, the final one included.
    pub rounds: u32,
    /// The device-state envelope, if one arrived.
    pub device_state: Option<Vec<u8>>,
}

/// What the rounds hand to commit: every page applied, and the commit request.
pub(super) struct RoundsDone {
    /// Applied pages, their hashes and counters.
    pub shared: Arc<ApplyShared>,
    /// What the source asks to commit.
    pub commit: CommitRequest,
}

/// Why the rounds ended without a `Commit`.
pub(super) struct RoundsFailed {
    /// The error.
    pub error: ReceiveError,
    /// The connection broke before `Commit`: the source may resume the session.
    pub resumable: bool,
}

impl From<ReceiveError> for RoundsFailed {
    fn from(error: ReceiveError) -> Self {
        Self {
            error,
            resumable: false,
        }
    }
}

impl Receiver {
    /// Run the page appliers from round `first_round` until the source sends
    /// `Commit` (or aborts, or a stream fails), then wait for every applier to
    /// finish. `shared` (pages applied, their stamps and the digest) outlives a
    /// broken connection, so a resumed session goes on with it.
    pub(super) fn receive_rounds(
        &self,
        control: &mut FrameReader,
        shared: &Arc<ApplyShared>,
        page_streams: Vec<PageStream>,
        first_round: u32,
        prefault: bool,
    ) -> Result<RoundsDone, RoundsFailed> {
        const PHASE: &str = "rounds";
        let _ = control
            .stream()
            .set_read_timeout(Some(self.config.control_timeout));
        // Whether a background pre-fault would have a CPU of its own (counted
        // before the streams move into the appliers).
        let spare_cpu = super::prefault_pays(page_streams.len(), host_load::cpus() as usize);
        // A page stream that loses its link ends the control stream's wait too, so
        // the session moves on to resumption at once.
        let appliers = Appliers::start(
            shared.clone(),
            page_streams,
            first_round,
            control.stream().shutdown_handle(),
        );
        // Memory the receiver allocated, or prepared in advance and not committed.
        let own_memory = self.memory.is_none() || self.memory_zero;
        // The background pre-fault stops when the brownout nears (`Drain` or
        // `Brownout`): faulting in memory no page will land on would compete with
        // the final pages and hold the memory-map lock inside the downtime.
        let stop_prefault = Arc::new(AtomicBool::new(false));
        let prefault =
            if prefault && self.config.prefault && spare_cpu && !self.config.prealloc && own_memory
            {
                let m = shared.memory.clone();
                let stop = stop_prefault.clone();
                Some(std::thread::spawn(move || m.prefault_until(1, &stop)))
            } else {
                None
            };
        let mut device_state = None;
        let commit = loop {
            match control.control_capped(&self.config.rounds_caps()) {
                Ok((ControlMsg::Heartbeat { seq }, _)) => {
                    if let Err(e) = super::handoff::answer_heartbeat(control, seq) {
                        return Err(appliers.control_write_failed(PHASE, e));
                    }
                }
                // A break before `Commit` resumes even after `Brownout`: the source
                // then runs its VM again and goes on with the rounds.
                Ok((ControlMsg::Brownout { .. }, _)) => {
                    stop_prefault.store(true, Ordering::Relaxed);
                }
                Ok((ControlMsg::Drain { round }, _)) => {
                    stop_prefault.store(true, Ordering::Relaxed);
                    let t = Instant::now();
                    let wait = DRAIN_WAIT.min(self.config.control_timeout / 2);
                    let applied = shared.gate.wait_completed(round, t + wait);
                    // The appliers are idle now (if applied): what else runs on this
                    // host competes with the brownout's hand-offs here.
                    let host_busy = applied && host_load::host_is_busy();
                    let answer = ControlMsg::Drained {
                        round,
                        applied,
                        waited_us: t.elapsed().as_micros() as u64,
                        host_busy,
                    };
                    if let Err(e) = control.send_control(&answer, &[]) {
                        return Err(appliers.control_write_failed(PHASE, e));
                    }
                }
                Ok((ControlMsg::DeviceState, blob)) => device_state = Some(blob),
                Ok((
                    ControlMsg::Commit {
                        digest,
                        pages,
                        rounds,
                    },
                    _,
                )) => {
                    break CommitRequest {
                        digest,
                        pages,
                        rounds,
                        device_state,
                    }
                }
                Ok((ControlMsg::Abort { reason }, _)) => {
                    // A page error is the root cause when there is one.
                    return Err(match appliers.fail() {
                        Some(e) if e.kind() != PageErrorKind::Stopped => ReceiveError::Pages(e),
                        _ => ReceiveError::Aborted(reason.into()),
                    }
                    .into());
                }
                Ok((other, _)) => {
                    appliers.fail();
                    return Err(ReceiveError::Protocol {
                        phase: PHASE,
                        violation: ProtocolViolation::Unexpected {
                            expected: "heartbeat, brownout, device state, commit or abort",
                            got: other.name(),
                        },
                    }
                    .into());
                }
                Err(e) => {
                    let link = e.is_link_loss();
                    return Err(match appliers.fail() {
                        Some(pe) if pe.kind() != PageErrorKind::Stopped => RoundsFailed {
                            resumable: pe.is_link(),
                            error: ReceiveError::Pages(pe),
                        },
                        _ => RoundsFailed {
                            resumable: link,
                            error: read_error(
                                PHASE,
                                "the source sent nothing on the control stream",
                                self.config.control_timeout,
                            )(e),
                        },
                    });
                }
            }
        };
        let pages_result = appliers.finish();
        if let Some(p) = prefault {
            let _ = p.join();
        }
        if let Err(e) = pages_result {
            let _ = control.send_control(
                &ControlMsg::Error {
                    message: e.to_string(),
                },
                &[],
            );
            return Err(ReceiveError::Pages(e).into());
        }
        Ok(RoundsDone {
            shared: shared.clone(),
            commit,
        })
    }
}

/// One applier thread per page stream, plus a watcher that cuts every page stream
/// as soon as one fails, so the source's writers fail fast instead of blocking.
struct Appliers {
    shared: Arc<ApplyShared>,
    threads: Vec<JoinHandle<Result<(), PageError>>>,
    watcher_done: Arc<AtomicBool>,
    watcher: JoinHandle<()>,
}

impl Appliers {
    /// Start an applier per stream, each from round `first_round`; a lost page
    /// stream also cuts the control stream (`cut_control`).
    fn start(
        shared: Arc<ApplyShared>,
        page_streams: Vec<PageStream>,
        first_round: u32,
        cut_control: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        let shutdowns: Vec<_> = page_streams
            .iter()
            .map(|p| p.reader.stream().shutdown_handle())
            .collect();
        let threads = page_streams
            .into_iter()
            .map(|PageStream { index, reader }| {
                let sh = shared.clone();
                std::thread::Builder::new()
                    .name(format!("livemig-recv{index}"))
                    .spawn(move || {
                        let res = apply_stream(&sh, reader, index, first_round);
                        if res.is_err() {
                            sh.gate.abort();
                        }
                        res
                    })
                    .expect("spawn receiver thread")
            })
            .collect();
        let watcher_done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let sh = shared.clone();
            let done = watcher_done.clone();
            std::thread::spawn(move || {
                while !done.load(Ordering::Acquire) {
                    if sh.failed.load(Ordering::Acquire) {
                        shutdowns.iter().for_each(|cut| cut());
                        if sh.first_error().is_some_and(|e| e.is_link()) {
                            cut_control();
                        }
                        return;
                    }
                    // Parked, not slept: stopping the watcher unparks it, so the
                    // commit does not wait out a poll interval.
                    std::thread::park_timeout(Duration::from_millis(5));
                }
            })
        };
        Self {
            shared,
            threads,
            watcher_done,
            watcher,
        }
    }

    /// Wait for every applier, then stop the watcher; the first error wins.
    fn finish(self) -> Result<(), PageError> {
        let mut first = Ok(());
        for (stream, h) in self.threads.into_iter().enumerate() {
            let r = h.join().unwrap_or_else(|_| {
                Err(PageError {
                    stream: stream as u16,
                    fault: PageFault::Panicked,
                })
            });
            if first.is_ok() {
                first = r;
            }
        }
        self.watcher_done.store(true, Ordering::Release);
        self.watcher.thread().unpark();
        let _ = self.watcher.join();
        first
    }

    /// Stop the session's page streams, wait for every applier to stop, and
    /// return the first page error recorded (a `Stopped` one if no stream had
    /// failed before).
    /// A write on the control stream failed: stop the appliers; the session may
    /// resume when the link was lost.
    fn control_write_failed(
        self,
        phase: &'static str,
        e: crate::transport::TransportError,
    ) -> RoundsFailed {
        let resumable = e.is_link_loss();
        self.fail();
        RoundsFailed {
            error: ReceiveError::Transport { phase, source: e },
            resumable,
        }
    }

    fn fail(self) -> Option<PageError> {
        self.shared.stop();
        let shared = self.shared.clone();
        let _ = self.finish();
        shared.first_error()
    }
}
