//! Setup restart: a connection lost before round 0 (during the handshake, while
//! the setup and its attachment are sent, while the page streams open) does not
//! fail the migration. The source starts the setup over with the same token, the
//! destination drops the half-built session and takes the new `Hello`, and the
//! migration completes, proven equal. When nobody comes back, each side gives up
//! within its budget, the source VM running and never paused.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use livemig::codec::CodecId;
use livemig::engine::{Migration, MigrationConfig, MigrationError, Mode, Verify};
use livemig::receiver::{ReceiveError, Received, Receiver, ReceiverConfig};
use livemig::session::SessionToken;
use livemig::stats::{Event, MigrationReport};
use livemig::transport::framed::FrameReader;
use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
use livemig::transport::{Connector, Stream, TransportError};
use livemig::wire::control::RefuseCode;
use livemig::wire::{ControlMsg, CAPABILITIES, PROTOCOL_MAJOR, PROTOCOL_MINOR, SETUP_RESTART};

fn restart_receiver() -> ReceiverConfig {
    ReceiverConfig {
        resume_window: Duration::from_secs(10),
        ..receiver_config()
    }
}

fn restart_config() -> MigrationConfig {
    let mut cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
    cfg.reconnect_timeout = Duration::from_secs(10);
    // A setup attachment of some size, so a cut can land inside it.
    cfg.vm_config = vec![0x5a; 16 * 1024];
    cfg
}

type DestResult = Result<Received, ReceiveError>;

/// Migrate a running guest over TCP through `wrap(connector)`; returns the
/// source, both results and the source's reconnecting events.
fn migrate_through<C: Connector + 'static>(
    wrap: impl FnOnce(TcpConnector) -> C + Send + 'static,
) -> (
    Source,
    Result<MigrationReport, MigrationError>,
    DestResult,
    Vec<String>,
) {
    let src = Source::default_running(16 * MIB, TrackerKind::Explicit);
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").expect("bind");
    let addr = acceptor.local_addr().expect("addr").to_string();
    let rx = spawn_receiver(Receiver::new().config(restart_receiver()), acceptor);
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(src.dirtier.control()))
        .policy(Box::new(test_policy()))
        .config(restart_config())
        .progress(Arc::new(move |e: &Event| {
            if let Event::Reconnecting { phase, round, .. } = e {
                seen.lock().unwrap().push(format!("{phase}:{round}"));
            }
        }));
    let (source, dest) = with_timeout(GUARD, "restarted migration", move || {
        let connector = wrap(TcpConnector::new(addr));
        let source = m.run(&connector);
        drop(connector);
        (source, rx.join().expect("receiver thread"))
    });
    let events = events.lock().unwrap().clone();
    (src, source, dest, events)
}

/// The migration completed, equal to the paused source, after exactly one
/// setup restart on both sides, reported as such.
fn assert_restarted_once(
    src: Source,
    source: Result<MigrationReport, MigrationError>,
    dest: DestResult,
    events: Vec<String>,
) {
    let (report, received) = assert_migrated(&src, Outcome { source, dest });
    assert_eq!(received.report.setup_restarts, 1, "destination restarts");
    assert_eq!(received.report.resumes, 0, "nothing resumed");
    assert_eq!(report.reconnects, 1, "a setup restart is a reconnection");
    assert_eq!(report.setup_restarts, 1);
    assert!(!report.resumed, "no round was resumed");
    assert_eq!(events, ["setup:0"], "one reconnecting event, in setup");
    assert_eq!(report.session, received.report.session, "the same token");
}

/// A stream that loses the first bytes it reads: it waits for them, then cuts
/// the connection (both ways) and fails. On the control stream, the destination
/// has read the `Hello` and sent `Welcome`, and the source never gets it.
#[derive(Debug)]
struct CutOnRead {
    inner: Box<dyn Stream>,
    armed: Arc<AtomicBool>,
}

impl Read for CutOnRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.armed.swap(false, Ordering::SeqCst) {
            let _ = self.inner.read(buf)?;
            self.inner.shutdown();
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "test: link cut while waiting for the welcome",
            ));
        }
        self.inner.read(buf)
    }
}

impl Write for CutOnRead {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Stream for CutOnRead {
    livemig::forward_stream!(inner);
}

/// Cuts the first control connection at its first read.
struct CutFirstWelcome<C> {
    inner: C,
    first: AtomicBool,
}

impl<C: Connector> Connector for CutFirstWelcome<C> {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let s = self.inner.connect()?;
        if self.first.swap(false, Ordering::SeqCst) {
            Ok(Box::new(CutOnRead {
                inner: s,
                armed: Arc::new(AtomicBool::new(true)),
            }))
        } else {
            Ok(s)
        }
    }
    fn describe(&self) -> String {
        format!("cut-first-welcome({})", self.inner.describe())
    }
}

/// The link breaks during the handshake: the destination read the `Hello` and
/// answered, the source never got the `Welcome`.
#[test]
fn a_link_cut_during_the_handshake_starts_the_setup_over_and_completes() {
    let (src, source, dest, events) = migrate_through(|c| CutFirstWelcome {
        inner: c,
        first: AtomicBool::new(true),
    });
    assert_restarted_once(src, source, dest, events);
}

/// The link breaks while the `Setup` attachment is on its way.
#[test]
fn a_link_cut_inside_the_setup_attachment_starts_the_setup_over_and_completes() {
    let fault = FrameFault {
        stream: 0,
        frame: 0,
        message: Some("setup"),
        section: Section::Data,
        offset: 8 * 1024,
        action: Action::Cut,
    };
    let fired = Arc::new(Mutex::new(None));
    let f = fired.clone();
    let (src, source, dest, events) = migrate_through(move |c| {
        let fc = FrameFaultConnector::new(c, fault);
        *f.lock().unwrap() = Some(fc.fired.clone());
        fc
    });
    let fired = fired.lock().unwrap().take().unwrap();
    assert!(fired.load(Ordering::SeqCst), "the cut happened");
    assert_restarted_once(src, source, dest, events);
}

/// The link breaks while the page streams open: the second page stream's
/// `StreamHello` never gets out, after the first page stream was opened.
#[test]
fn a_link_cut_while_opening_page_streams_starts_the_setup_over_and_completes() {
    // Connections: 0 control, 1 and 2 page streams.
    let fault = FrameFault {
        stream: 2,
        frame: 0,
        message: None,
        section: Section::Header,
        offset: 0,
        action: Action::Cut,
    };
    let fired = Arc::new(Mutex::new(None));
    let f = fired.clone();
    let (src, source, dest, events) = migrate_through(move |c| {
        let fc = FrameFaultConnector::new(c, fault);
        *f.lock().unwrap() = Some(fc.fired.clone());
        fc
    });
    let fired = fired.lock().unwrap().take().unwrap();
    assert!(fired.load(Ordering::SeqCst), "the cut happened");
    assert_restarted_once(src, source, dest, events);
}

/// A destination that takes the `Hello` and dies for good: the source tries
/// again until its reconnection budget is spent, then fails with
/// `ReconnectFailed`, its VM running and never paused.
#[test]
fn the_source_gives_up_within_its_budget_when_the_destination_never_comes_back() {
    let src = Source::default_running(8 * MIB, TrackerKind::Explicit);
    let log = VmLog::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // The destination: reads the first frame's header, then goes away, its
    // listener with it (every later attempt is refused).
    let dest = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut header = [0u8; 16];
        s.read_exact(&mut header).unwrap();
        drop(s);
        drop(listener);
    });
    let budget = Duration::from_millis(800);
    let mut cfg = restart_config();
    cfg.reconnect_timeout = budget;
    cfg.reply_timeout = Duration::from_secs(2);
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(RecordingVm {
            inner: src.dirtier.control(),
            log: log.clone(),
        }))
        .policy(Box::new(test_policy()))
        .config(cfg);
    let (err, took) = with_timeout(GUARD, "abandoned setup", move || {
        let t0 = Instant::now();
        let r = m.run(&TcpConnector::new(addr));
        (r.expect_err("nobody to migrate to"), t0.elapsed())
    });
    dest.join().unwrap();
    match &err {
        MigrationError::ReconnectFailed {
            attempts, after, ..
        } => {
            assert!(*attempts >= 1, "{err}");
            assert_eq!(*after, budget);
        }
        other => panic!("expected ReconnectFailed, got {other}"),
    }
    assert!(err.source_running(), "{err}");
    // The budget, one reply timeout for the attempt under way, and slack for a
    // loaded host: not an unbounded retry.
    assert!(
        took < budget + Duration::from_secs(2) + Duration::from_secs(5),
        "gave up after {took:?}"
    );
    assert_eq!(log.count("pause"), 0, "the VM was never paused");
    let w0 = src.dirtier.writes();
    let deadline = Instant::now() + Duration::from_secs(10);
    while src.dirtier.writes() == w0 {
        assert!(Instant::now() < deadline, "the source guest does not run");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Speak the start of a setup by hand: `Hello` (offering `setup-restart` or
/// not) and read the answer.
fn hand_hello(addr: &str, session: SessionToken, restarts: bool) -> (FrameReader, ControlMsg) {
    let mut control = FrameReader::new(TcpConnector::new(addr).connect().unwrap(), "control");
    let hello = ControlMsg::Hello {
        magic: "livemig".into(),
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
        session,
        streams: 1,
        capabilities: CAPABILITIES
            .iter()
            .filter(|c| restarts || **c != SETUP_RESTART)
            .map(|s| s.to_string())
            .collect(),
    };
    control.send_control(&hello, &[]).unwrap();
    let answer = control.control().unwrap().0;
    (control, answer)
}

fn hand_receiver(resume_window: Duration) -> (String, std::thread::JoinHandle<DestResult>) {
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").expect("bind");
    let addr = acceptor.local_addr().expect("addr").to_string();
    let config = ReceiverConfig {
        resume_window,
        accept_timeout: Duration::from_secs(5),
        ..receiver_config()
    };
    (
        addr,
        spawn_receiver(Receiver::new().config(config), acceptor),
    )
}

/// A source that drops its connection after `Welcome` and never comes back:
/// the destination waits its resume window for the same token, refuses another
/// session meanwhile, and then fails with `NotResumed`, keeping nothing.
#[test]
fn the_destination_gives_up_when_the_source_never_starts_over() {
    let window = Duration::from_millis(700);
    let (addr, rx) = hand_receiver(window);
    let (err, other) = with_timeout(GUARD, "abandoned setup", move || {
        let token = SessionToken::generate().unwrap();
        let (control, answer) = hand_hello(&addr, token, true);
        assert!(
            matches!(answer, ControlMsg::Welcome { ref capabilities, .. }
                if capabilities.iter().any(|c| c == SETUP_RESTART)),
            "{answer:?}"
        );
        drop(control);
        // Another migration while the session waits for its source: busy.
        let (_c, other) = hand_hello(&addr, SessionToken::generate().unwrap(), true);
        (rx.join().unwrap().map(|_| ()), other)
    });
    assert!(
        matches!(
            other,
            ControlMsg::Refuse {
                code: RefuseCode::HostBusy,
                ..
            }
        ),
        "{other:?}"
    );
    match err.expect_err("nobody came back") {
        ReceiveError::NotResumed { after, cause } => {
            assert_eq!(after, window);
            assert!(
                matches!(*cause, ReceiveError::Transport { .. }),
                "the cause is the lost connection: {cause}"
            );
        }
        other => panic!("expected NotResumed, got {other}"),
    }
}

/// A source that did not offer `setup-restart` (a 2.0 source, or one that never
/// reconnects) is not waited for: a lost setup fails the destination at once,
/// as before.
#[test]
fn a_source_without_setup_restart_is_not_waited_for() {
    let (addr, rx) = hand_receiver(Duration::from_secs(30));
    let (result, took) = with_timeout(GUARD, "lost setup", move || {
        let (control, answer) = hand_hello(&addr, SessionToken::generate().unwrap(), false);
        assert!(matches!(answer, ControlMsg::Welcome { .. }), "{answer:?}");
        let t0 = Instant::now();
        drop(control);
        (rx.join().unwrap().map(|_| ()), t0.elapsed())
    });
    let err = result.expect_err("the setup was lost");
    assert!(
        matches!(err, ReceiveError::Transport { .. }),
        "fails with the lost connection itself: {err}"
    );
    assert!(
        took < Duration::from_secs(20),
        "did not wait for a restart: {took:?}"
    );
}

/// The session's second `Hello` arrives while the destination still accepts the
/// first attempt's page streams (it noticed nothing): it starts over at once.
#[test]
fn a_hello_of_the_session_while_page_streams_are_accepted_starts_over() {
    let window = Duration::from_millis(500);
    let (addr, rx) = hand_receiver(window);
    let (first_ok, second, end) = with_timeout(GUARD, "early restart", move || {
        let token = SessionToken::generate().unwrap();
        let (mut control, answer) = hand_hello(&addr, token, true);
        assert!(matches!(answer, ControlMsg::Welcome { .. }), "{answer:?}");
        let setup = ControlMsg::Setup {
            layout: livemig::memory::MemoryLayout {
                regions: vec![(0, MIB as u64)],
            },
            compat: Default::default(),
            config_len: 0,
            participants: vec![],
        };
        control.send_control(&setup, &[]).unwrap();
        let first_ok = control.control().unwrap().0;
        // The source lost its link here and starts over; the old control
        // stream stays open, so the destination notices nothing.
        let (second, answer) = hand_hello(&addr, token, true);
        // Then it is gone for good: the second attempt is lost as well.
        drop(second);
        drop(control);
        (first_ok, answer, rx.join().unwrap().map(|_| ()))
    });
    assert_eq!(first_ok, ControlMsg::SetupOk);
    assert!(
        matches!(second, ControlMsg::Welcome { .. }),
        "the same session's hello is welcomed again: {second:?}"
    );
    assert!(
        matches!(end, Err(ReceiveError::NotResumed { after, .. }) if after == window),
        "and after the second loss it waited its window: {end:?}"
    );
}
