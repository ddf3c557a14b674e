//! The ownership handoff under faults in the destination → source direction:
//! `Prepared` lost, late or corrupted; `Committed` lost; a destination restore
//! slower than the source's reply timeout; `Released` lost. Each test records when
//! the source paused and resumed and when the destination restored and committed,
//! and asserts that at no instant both ran the VM.

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use livemig::device::{ParticipantError, RestoreState, SaveState, Veto};
use livemig::engine::{Migration, MigrationConfig, MigrationError, Mode, VmControl};
use livemig::receiver::{OutcomeLog, ReceiveError, Received, Receiver};
use livemig::stats::MigrationReport;
use livemig::transport::{mem, Connector, Stream, TransportError};
use livemig::wire::FRAME_HEADER_LEN;

// ---------------------------------------------------------------------------
// A timeline of who ran the VM.

#[derive(Debug, Clone, Default)]
struct Timeline(Arc<Mutex<Vec<(Instant, &'static str)>>>);

impl Timeline {
    fn push(&self, what: &'static str) {
        self.0.lock().unwrap().push((Instant::now(), what));
    }
    fn events(&self) -> Vec<(Instant, &'static str)> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self, what: &str) -> usize {
        self.events().iter().filter(|e| e.1 == what).count()
    }

    /// The source runs except between a pause and the next resume; the destination
    /// runs from its restore on, if it committed. The two must never overlap.
    fn assert_never_both_running(&self, dest_committed: bool) {
        let ev = self.events();
        let names: Vec<_> = ev.iter().map(|e| e.1).collect();
        if !dest_committed {
            return;
        }
        let restore = ev
            .iter()
            .find(|e| e.1 == "dest restore")
            .unwrap_or_else(|| panic!("a committed destination restored: {names:?}"))
            .0;
        // The source must be paused at the restore and never resume afterwards.
        let mut source_running = true;
        for (t, what) in &ev {
            match *what {
                "source pause" => source_running = false,
                "source resume" => {
                    source_running = true;
                    assert!(
                        *t < restore,
                        "the source resumed after the destination restored: {names:?}"
                    );
                }
                _ => {}
            }
            if *t >= restore {
                assert!(
                    !source_running,
                    "the source ran while the destination ran: {names:?}"
                );
            }
        }
        assert!(!source_running, "both run the VM at the end: {names:?}");
    }
}

/// The source VM: records pauses and resumes.
struct TimedVm(Timeline);

impl VmControl for TimedVm {
    fn pause(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.0.push("source pause");
        Ok(())
    }
    fn resume(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.0.push("source resume");
        Ok(())
    }
    fn throttle(&mut self, _percent: u8) -> Result<(), livemig::engine::VmControlError> {
        Ok(())
    }
}

/// One device on each side; the destination's restore may be slow.
struct SrcDev(Timeline);

impl SaveState for SrcDev {
    fn id(&self) -> &str {
        "dev0"
    }
    fn version(&self) -> u32 {
        1
    }
    fn setup_info(&self) -> Vec<u8> {
        Vec::new()
    }
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError> {
        out.extend_from_slice(b"state");
        Ok(())
    }
    fn release(&mut self) -> Result<(), ParticipantError> {
        self.0.push("source release");
        Ok(())
    }
    fn committed(&mut self) {
        self.0.push("source committed");
    }
    fn rolled_back(&mut self) {
        self.0.push("source rolled back");
    }
}

struct DstDev {
    tl: Timeline,
    restore_delay: Duration,
    veto: bool,
}

impl RestoreState for DstDev {
    fn id(&self) -> &str {
        "dev0"
    }
    fn validate_setup(&mut self, _info: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn validate_state(&mut self, _version: u32, _blob: &[u8]) -> Result<(), Veto> {
        if self.veto {
            return Err(Veto {
                participant: "dev0".into(),
                reason: "test veto".into(),
            });
        }
        Ok(())
    }
    fn restore(&mut self, _version: u32, _blob: &[u8]) -> Result<(), ParticipantError> {
        self.tl.push("dest restore");
        std::thread::sleep(self.restore_delay);
        Ok(())
    }
    fn discard(&mut self) {
        self.tl.push("dest discard");
    }
}

// ---------------------------------------------------------------------------
// Faults on what the source reads from its control stream.

#[derive(Debug, Clone, Copy, PartialEq)]
enum ReadAction {
    /// The frame never arrives.
    Drop,
    /// The frame arrives this much later.
    Delay(Duration),
    /// One bit of the frame's meta is flipped.
    Corrupt,
    /// The connection breaks just before the frame.
    Cut,
}

/// Applies `action` to the first control frame named `target` that the source
/// reads on its first connection (the control stream).
struct ReadFaultConnector<C> {
    inner: C,
    target: &'static str,
    action: ReadAction,
    opened: AtomicUsize,
    fired: Arc<std::sync::atomic::AtomicBool>,
}

impl<C: Connector> Connector for ReadFaultConnector<C> {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let s = self.inner.connect()?;
        if self.opened.fetch_add(1, Ordering::SeqCst) > 0 {
            return Ok(s);
        }
        Ok(Box::new(ReadFaultStream {
            inner: s,
            target: self.target,
            action: self.action,
            fired: self.fired.clone(),
            pending: Vec::new(),
            ready: VecDeque::new(),
            held: None,
            eof: false,
        }))
    }
    fn describe(&self) -> String {
        "read-fault".into()
    }
}

#[derive(Debug)]
struct ReadFaultStream {
    inner: Box<dyn Stream>,
    target: &'static str,
    action: ReadAction,
    fired: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes read from the peer, not yet a whole frame.
    pending: Vec<u8>,
    /// Bytes to hand to the reader.
    ready: VecDeque<u8>,
    /// A delayed frame and when it arrives.
    held: Option<(Instant, Vec<u8>)>,
    eof: bool,
}

impl ReadFaultStream {
    /// Move whole frames from `pending` to `ready`, applying the fault.
    fn route(&mut self) {
        loop {
            if self.pending.len() < FRAME_HEADER_LEN {
                return;
            }
            let meta = u32::from_le_bytes(self.pending[4..8].try_into().unwrap()) as usize;
            let data = u32::from_le_bytes(self.pending[8..12].try_into().unwrap()) as usize;
            let end = FRAME_HEADER_LEN + meta + data;
            if self.pending.len() < end {
                return;
            }
            let mut frame: Vec<u8> = self.pending.drain(..end).collect();
            let name = serde_json::from_slice::<serde_json::Value>(
                &frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + meta],
            )
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_string));
            let hit = !self.fired.load(Ordering::SeqCst) && name.as_deref() == Some(self.target);
            if !hit {
                self.ready.extend(frame);
                continue;
            }
            self.fired.store(true, Ordering::SeqCst);
            match self.action {
                ReadAction::Drop => {}
                ReadAction::Delay(d) => self.held = Some((Instant::now() + d, frame)),
                ReadAction::Corrupt => {
                    frame[FRAME_HEADER_LEN + 2] ^= 0x10;
                    self.ready.extend(frame);
                }
                ReadAction::Cut => {
                    self.inner.shutdown();
                    self.eof = true;
                    return;
                }
            }
        }
    }
}

impl Read for ReadFaultStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some((at, _)) = &self.held {
                if Instant::now() >= *at {
                    let (_, f) = self.held.take().unwrap();
                    self.ready.extend(f);
                }
            }
            if !self.ready.is_empty() {
                let n = buf.len().min(self.ready.len());
                for (i, b) in self.ready.drain(..n).enumerate() {
                    buf[i] = b;
                }
                return Ok(n);
            }
            if self.eof {
                return Ok(0);
            }
            let mut tmp = [0u8; 8192];
            let n = self.inner.read(&mut tmp)?; // the reader's timeout applies
            if n == 0 {
                self.eof = true;
                continue;
            }
            self.pending.extend_from_slice(&tmp[..n]);
            self.route();
        }
    }
}

impl Write for ReadFaultStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.eof {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Stream for ReadFaultStream {
    livemig::forward_stream!(inner);
}

// ---------------------------------------------------------------------------
// A migration of a small stopped guest with one device.

struct Setup {
    reply_timeout: Duration,
    outcome_timeout: Duration,
    restore_delay: Duration,
    /// How long the destination answers outcome queries after it finished.
    serve: Duration,
    /// The destination's device vetoes at commit (before `Prepared`).
    veto: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            // Long enough for every reply a fault does not delay on a loaded
            // host; the late-reply tests wait three times as long.
            reply_timeout: Duration::from_millis(1000),
            outcome_timeout: Duration::from_secs(10),
            restore_delay: Duration::ZERO,
            serve: Duration::from_secs(10),
            veto: false,
        }
    }
}

struct Run {
    source: Result<MigrationReport, MigrationError>,
    dest: Result<Received, ReceiveError>,
    tl: Timeline,
    log: Arc<OutcomeLog>,
}

fn run_with<C: Connector + 'static>(
    s: Setup,
    connector: impl FnOnce(mem::MemConnector) -> C,
) -> Run {
    let tl = Timeline::default();
    let (c, a) = mem::pair();
    let log = Arc::new(OutcomeLog::default());
    let cfg = {
        let mut settings = MigrationConfig::default();
        settings.mode = Mode::Multichannel;
        settings.streams = 1;
        settings.reply_timeout = s.reply_timeout;
        settings.outcome_timeout = s.outcome_timeout;
        // No heartbeat in these short migrations: control frames keep their order.
        settings.peer_timeout = Duration::from_secs(3600);
        settings.heartbeat_interval = Duration::from_secs(3600);
        settings
    };
    let m = Migration::new(source_memory(4 * MIB, 3))
        .vm_control(Box::new(TimedVm(tl.clone())))
        .participant(Box::new(SrcDev(tl.clone())))
        .config(cfg);
    let r = Receiver::new()
        .config(receiver_config())
        .participant(Box::new(DstDev {
            tl: tl.clone(),
            restore_delay: s.restore_delay,
            veto: s.veto,
        }))
        .outcome_log(log.clone());
    let connector = connector(c);
    let (tl2, log2, serve) = (tl.clone(), log.clone(), s.serve);
    let (source, dest) = with_timeout(GUARD, "migration", move || {
        let rx = std::thread::spawn(move || {
            let d = r.run(&a);
            match &d {
                Ok(_) => tl2.push("dest committed"),
                Err(_) => tl2.push("dest discarded"),
            }
            // Like `livemig recv`: answer a source that may be in doubt.
            log2.serve(&a, serve);
            d
        });
        let source = m.run(&connector);
        drop(connector);
        (source, rx.join().expect("receiver thread"))
    });
    Run {
        source,
        dest,
        tl,
        log,
    }
}

fn read_fault(target: &'static str, action: ReadAction, s: Setup) -> (Run, bool) {
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f2 = fired.clone();
    let run = run_with(s, move |c| ReadFaultConnector {
        inner: c,
        target,
        action,
        opened: AtomicUsize::new(0),
        fired: f2,
    });
    (run, fired.load(Ordering::SeqCst))
}

/// Before `Released`: the source resumed, the destination discarded.
fn assert_resumed_and_discarded(run: &Run) {
    let names: Vec<_> = run.tl.events().iter().map(|e| e.1).collect();
    assert!(run.source.is_err(), "source must fail: {names:?}");
    assert!(
        run.source.as_ref().unwrap_err().source_running(),
        "{:?}",
        run.source
    );
    assert!(run.dest.is_err(), "destination must discard: {names:?}");
    assert_eq!(run.tl.count("source pause"), 1, "{names:?}");
    assert_eq!(run.tl.count("source resume"), 1, "{names:?}");
    assert_eq!(run.tl.count("source release"), 0, "{names:?}");
    assert_eq!(run.tl.count("dest restore"), 0, "{names:?}");
    run.tl.assert_never_both_running(false);
}

/// The destination committed and the source knows it (never resumed).
fn assert_committed(run: &Run) {
    let names: Vec<_> = run.tl.events().iter().map(|e| e.1).collect();
    let report = match &run.source {
        Ok(r) => r,
        Err(e) => panic!("source: {e}; timeline {names:?}"),
    };
    assert!(run.dest.is_ok(), "{:?}", run.dest.as_ref().err());
    assert_eq!(run.tl.count("source resume"), 0, "{names:?}");
    assert_eq!(run.tl.count("source committed"), 1, "{names:?}");
    run.tl.assert_never_both_running(true);
    let received = run.dest.as_ref().unwrap();
    assert_eq!(report.session, received.report.session);
    assert_eq!(report.digest, received.report.digest);
}

#[test]
fn prepared_lost_source_resumes_destination_discards() {
    let (run, fired) = read_fault("prepared", ReadAction::Drop, Setup::default());
    assert!(fired, "Prepared was never sent");
    assert_resumed_and_discarded(&run);
    assert!(
        matches!(run.source, Err(MigrationError::TimedOut { .. })),
        "{:?}",
        run.source
    );
}

#[test]
fn prepared_late_beyond_reply_timeout_source_resumes_destination_discards() {
    let s = Setup::default();
    let late = s.reply_timeout * 3;
    let (run, fired) = read_fault("prepared", ReadAction::Delay(late), s);
    assert!(fired);
    assert_resumed_and_discarded(&run);
}

#[test]
fn prepared_corrupted_source_resumes_destination_discards() {
    let (run, fired) = read_fault("prepared", ReadAction::Corrupt, Setup::default());
    assert!(fired);
    assert_resumed_and_discarded(&run);
    let e = run.source.as_ref().unwrap_err().to_string();
    assert!(e.contains("checksum") || e.contains("malformed"), "{e}");
}

#[test]
fn committed_lost_source_learns_committed_and_never_resumes() {
    let (run, fired) = read_fault("committed", ReadAction::Cut, Setup::default());
    assert!(fired);
    assert_committed(&run);
    let report = run.source.as_ref().unwrap();
    assert!(report.resolved_by_query, "the outcome came from a query");
    assert!(
        !run.dest.as_ref().unwrap().report.outcome_known,
        "the destination could not know the source learned it"
    );
    assert_eq!(
        run.log.awaiting_query(),
        0,
        "the query's answer was acknowledged"
    );
}

#[test]
fn committed_late_beyond_reply_timeout_source_learns_committed() {
    let s = Setup::default();
    let late = s.reply_timeout * 3;
    let (run, fired) = read_fault("committed", ReadAction::Delay(late), s);
    assert!(fired);
    assert_committed(&run);
}

#[test]
fn committed_corrupted_source_learns_committed() {
    let (run, fired) = read_fault("committed", ReadAction::Corrupt, Setup::default());
    assert!(fired);
    assert_committed(&run);
    assert!(run.source.as_ref().unwrap().resolved_by_query);
}

#[test]
fn restore_slower_than_reply_timeout_source_never_resumes() {
    let s = Setup {
        reply_timeout: Duration::from_millis(1000),
        restore_delay: Duration::from_millis(3000),
        ..Default::default()
    };
    let run = run_with(s, |c| c);
    assert_committed(&run);
    assert!(run.source.as_ref().unwrap().resolved_by_query);
}

#[test]
fn committed_lost_and_no_answer_leaves_the_source_paused_in_doubt() {
    let s = Setup {
        outcome_timeout: Duration::from_millis(500),
        serve: Duration::ZERO,
        ..Default::default()
    };
    let (run, fired) = read_fault("committed", ReadAction::Cut, s);
    assert!(fired);
    let names: Vec<_> = run.tl.events().iter().map(|e| e.1).collect();
    match &run.source {
        Err(e @ MigrationError::InDoubt { session, .. }) => {
            assert!(!e.source_running());
            assert_eq!(
                livemig::receiver::outcomes::session_to_string(*session),
                run.dest.as_ref().unwrap().report.session
            );
        }
        other => panic!("expected in doubt, got {other:?}; {names:?}"),
    }
    assert!(run.dest.is_ok(), "the destination committed");
    assert_eq!(run.tl.count("source resume"), 0, "{names:?}");
    assert_eq!(run.tl.count("source rolled back"), 0, "{names:?}");
    run.tl.assert_never_both_running(true);
    // The operator's query (what `livemig resolve` does) now answers.
    let session = match run.source {
        Err(MigrationError::InDoubt { session, .. }) => session,
        _ => unreachable!(),
    };
    assert_eq!(
        run.log.get(session),
        livemig::wire::control::SessionOutcome::Committed
    );
}

#[test]
fn released_lost_destination_discards_and_the_source_learns_it() {
    let fault = FrameFault {
        stream: 0,
        frame: 0,
        message: Some("released"),
        section: Section::Header,
        offset: 0,
        action: Action::Cut,
    };
    let mut fired = None;
    let run = run_with(Setup::default(), |c| {
        let fc = FrameFaultConnector::new(c, fault);
        fired = Some(fc.fired.clone());
        fc
    });
    assert!(
        fired.unwrap().load(Ordering::SeqCst),
        "Released not reached"
    );
    let names: Vec<_> = run.tl.events().iter().map(|e| e.1).collect();
    assert!(run.dest.is_err(), "no Released, no restore: {names:?}");
    assert_eq!(run.tl.count("dest restore"), 0, "{names:?}");
    // The source released, then learned "discarded": it rolls back and resumes.
    assert!(run.source.is_err());
    assert!(
        run.source
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("discarded"),
        "{:?}",
        run.source
    );
    assert_eq!(run.tl.count("source release"), 1, "{names:?}");
    assert_eq!(run.tl.count("source rolled back"), 1, "{names:?}");
    assert_eq!(run.tl.count("source resume"), 1, "{names:?}");
    run.tl.assert_never_both_running(false);
}

#[test]
fn a_veto_before_prepared_resumes_and_leaves_no_query_to_answer() {
    let t = Instant::now();
    let run = run_with(
        Setup {
            veto: true,
            ..Default::default()
        },
        |c| c,
    );
    assert!(
        matches!(run.source, Err(MigrationError::Vetoed(_))),
        "{:?}",
        run.source
    );
    assert_resumed_and_discarded(&run);
    // Never prepared: the source cannot be in doubt, so nothing lingers.
    assert_eq!(run.log.awaiting_query(), 0);
    assert!(
        t.elapsed() < Setup::default().serve,
        "the destination did not wait for queries"
    );
}
