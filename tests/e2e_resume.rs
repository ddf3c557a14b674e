//! Resumption: a connection that breaks during the rounds does not restart the
//! migration. The source reconnects, the destination reports what it holds, only
//! the missing pages go again, and the result is proven equal; when nobody comes
//! back, each side gives up within its budget and the source VM keeps running.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use livemig::codec::CodecId;
use livemig::engine::{Migration, MigrationError, Mode, Verify};
use livemig::receiver::{ReceiveError, Receiver};
use livemig::stats::Event;
use livemig::transport::fault::{Fault, FaultyConnector};
use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
use livemig::transport::{Connector, Stream, TransportError};
use livemig::wire::MAX_BATCH_PAGES;

/// Shuts one stream down.
type Cut = Box<dyn Fn() + Send + Sync>;

/// A connector that remembers how to cut every stream it opened.
#[derive(Clone, Default)]
struct KillSwitch {
    cuts: Arc<Mutex<Vec<Cut>>>,
}

impl KillSwitch {
    /// Cut every stream opened so far (the network broke).
    fn cut_all(&self) {
        for cut in self.cuts.lock().unwrap().drain(..) {
            cut();
        }
    }
}

struct Killable<C> {
    inner: C,
    switch: KillSwitch,
}

impl<C: Connector> Connector for Killable<C> {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let s = self.inner.connect()?;
        self.switch.cuts.lock().unwrap().push(s.shutdown_handle());
        Ok(s)
    }
    fn describe(&self) -> String {
        format!("killable({})", self.inner.describe())
    }
}

fn tcp_pair(
    receiver: Receiver,
) -> (
    String,
    std::thread::JoinHandle<Result<livemig::receiver::Received, ReceiveError>>,
) {
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").expect("bind");
    let addr = acceptor.local_addr().expect("addr").to_string();
    (addr, spawn_receiver(receiver, acceptor))
}

fn resume_receiver() -> Receiver {
    Receiver::new().config(livemig::receiver::ReceiverConfig {
        resume_window: Duration::from_secs(10),
        ..receiver_config()
    })
}

/// A page stream cut half way through round 0 of a stopped guest: the migration
/// completes on new connections, proven equal, and sends little twice (not the
/// whole guest again).
#[test]
fn a_page_stream_cut_in_round_zero_resumes_and_sends_little_twice() {
    let bytes = 32 * MIB;
    let mem = source_memory(bytes, 5);
    let pages = mem.total_pages();
    let (addr, rx) = tcp_pair(resume_receiver());
    let out = with_timeout(GUARD, "resumed migration", move || {
        // Cut a page stream early in round 0 (whichever of the two first carries
        // that much: the streams share one queue, so a stream's share is not fixed).
        let connector = FaultyConnector::any_page_stream(
            TcpConnector::new(addr),
            2,
            Fault::CutAfter(bytes as u64 / 16),
        );
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let report = Migration::new(mem.clone())
            .config(config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest))
            .progress(Arc::new(move |e: &Event| {
                if matches!(e, Event::Reconnecting { .. } | Event::Resumed { .. }) {
                    seen.lock().unwrap().push(format!("{e:?}"));
                }
            }))
            .run(&connector);
        let dest = rx.join().expect("receiver thread");
        let events = events.lock().unwrap().clone();
        (mem, report, dest, events)
    });
    let (mem, report, dest, events) = out;
    let report = report.expect("the migration resumes and completes");
    let dest = dest.expect("the destination completes");
    assert!(report.verified && dest.report.verified);
    assert!(report.resumed, "report says resumed");
    assert_eq!(report.reconnects, 1);
    assert_eq!(dest.report.resumes, 1);
    assert_eq!(
        mem.full_digest(2).unwrap(),
        dest.memory.full_digest(2).unwrap(),
        "destination memory equals the source's"
    );
    // A stopped guest's pages are written once, and those the cut lost once
    // more, which the report counts.
    assert_eq!(
        report.pages_sent,
        pages + report.resent_pages,
        "pages sent again are counted"
    );
    // What a cut loses is what was in flight: the batches in the streams'
    // socket buffers and those the destination had not applied yet (0 to 2
    // measured over loopback). At most 4 a stream, against the whole guest for a
    // migration that starts over.
    assert!(
        report.resent_pages <= report.streams as u64 * 4 * MAX_BATCH_PAGES as u64,
        "sent {} pages again for a guest of {pages}: a resumption must not start over",
        report.resent_pages
    );
    assert_eq!(
        events.len(),
        2,
        "one reconnecting and one resumed event: {events:?}"
    );
}

/// Every stream (control included) of a running, dirtying guest cut at `when`:
/// the session resumes and the destination ends equal to the paused source.
fn cut_everything_at(when: impl Fn(&Event) -> bool + Send + Sync + 'static) -> u32 {
    let src = Source::default_running(16 * MIB, TrackerKind::Explicit);
    let switch = KillSwitch::default();
    let (addr, rx) = tcp_pair(resume_receiver());
    let cut = switch.clone();
    let once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(src.dirtier.control()))
        .policy(Box::new(test_policy()))
        .config(config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest))
        .progress(Arc::new(move |e: &Event| {
            if when(e) && !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                cut.cut_all();
            }
        }));
    let (source, dest) = with_timeout(GUARD, "resumed migration", move || {
        let connector = Killable {
            inner: TcpConnector::new(addr),
            switch,
        };
        let r = m.run(&connector);
        (r, rx.join().expect("receiver thread"))
    });
    let (report, _) = assert_migrated(&src, Outcome { source, dest });
    report.reconnects
}

#[test]
fn every_stream_cut_after_round_zero_of_a_running_guest_resumes() {
    let n = cut_everything_at(|e| matches!(e, Event::RoundFinished(r) if r.round == 0));
    assert!(n >= 1, "resumed {n} times");
}

/// Cut while the VM is paused, before it was released: the source runs the VM
/// again, resumes the session and browns out again later.
#[test]
fn every_stream_cut_during_the_brownout_resumes_with_the_vm_running_again() {
    let n = cut_everything_at(|e| matches!(e, Event::Brownout { .. }));
    assert!(n >= 1, "resumed {n} times");
}

/// The destination is gone for good: the source tries for its reconnection budget,
/// then fails with an error saying so, its VM running.
#[test]
fn the_source_gives_up_when_the_destination_never_comes_back() {
    let src = Source::default_running(16 * MIB, TrackerKind::Explicit);
    let log = VmLog::default();
    // A destination that does not keep the session: it fails when the link
    // breaks, and its listener closes with it.
    let (addr, rx) = tcp_pair(Receiver::new().config(livemig::receiver::ReceiverConfig {
        resume_window: Duration::ZERO,
        ..receiver_config()
    }));
    let mut cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
    cfg.reconnect_timeout = Duration::from_millis(600);
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(RecordingVm {
            inner: src.dirtier.control(),
            log: log.clone(),
        }))
        .policy(Box::new(test_policy()))
        .config(cfg);
    let (source, dest) = with_timeout(GUARD, "abandoned migration", move || {
        let connector = FaultyConnector::any_page_stream(
            TcpConnector::new(addr),
            2,
            Fault::CutAfter(256 << 10),
        );
        let r = m.run(&connector);
        (r, rx.join().expect("receiver thread"))
    });
    match source {
        Err(e @ MigrationError::ReconnectFailed { .. }) => {
            assert!(e.source_running(), "{e}");
            assert!(e.to_string().contains("reconnecting to resume"), "{e}");
        }
        other => panic!("expected ReconnectFailed, got {other:?}"),
    }
    assert!(dest.is_err(), "the destination failed too");
    log.assert_resumed_if_paused();
    assert!(!src.dirtier.control().is_paused(), "the source VM runs");
}

/// The source never comes back (every stream cut, and it does not resume): the
/// destination, which no `Abort` can reach, waits for its resume window, then
/// fails naming what broke and that nobody resumed.
#[test]
fn the_destination_gives_up_when_the_source_never_resumes() {
    let src = Source::default_running(16 * MIB, TrackerKind::Explicit);
    let (addr, rx) = tcp_pair(Receiver::new().config(livemig::receiver::ReceiverConfig {
        resume_window: Duration::from_millis(300),
        ..receiver_config()
    }));
    let mut cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
    cfg.reconnect_timeout = Duration::ZERO;
    let switch = KillSwitch::default();
    let cut = switch.clone();
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(src.dirtier.control()))
        .policy(Box::new(test_policy()))
        .config(cfg)
        .progress(Arc::new(move |e: &Event| {
            if matches!(e, Event::Started { .. }) {
                cut.cut_all();
            }
        }));
    let (source, dest) = with_timeout(GUARD, "abandoned migration", move || {
        let connector = Killable {
            inner: TcpConnector::new(addr),
            switch,
        };
        let r = m.run(&connector);
        (r, rx.join().expect("receiver thread"))
    });
    let e = source.expect_err("no resumption: the source fails");
    assert!(e.source_running(), "{e}");
    assert!(!src.dirtier.control().is_paused(), "the source VM runs");
    match dest {
        Err(ReceiveError::NotResumed { cause, .. }) => {
            assert!(
                matches!(
                    *cause,
                    ReceiveError::Pages(_) | ReceiveError::Transport { .. }
                ),
                "{cause}"
            );
        }
        other => panic!("expected NotResumed, got {:?}", other.err()),
    }
}
