//! The destination as a service (`recv --serve`): several migrations over one
//! listener, a host limit with a FIFO queue, and stray connections that change
//! nothing for the running sessions.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use livemig::codec::CodecId;
use livemig::engine::{Migration, Mode, Verify};
use livemig::receiver::{Received, Receiver};
use livemig::service::{
    HandlerError, Outcome, Service, ServiceConfig, ServiceEvent, ServiceSummary, SessionHandler,
};
use livemig::session::SessionToken;
use livemig::transport::framed::write_frame;
use livemig::transport::shaped::TokenBucket;
use livemig::transport::tcp::TcpConnector;
use livemig::transport::tls::{server_config, TlsConnector, TlsIdentity};
use livemig::transport::Connector;
use livemig::wire::{ControlMsg, FrameKind};

/// Records every event and the full-memory digest of every committed guest.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<ServiceEvent>>,
    guests: Mutex<Vec<(String, u64)>>,
}

impl Recorder {
    fn events(&self) -> Vec<ServiceEvent> {
        self.events.lock().unwrap().clone()
    }
    /// Wait (bounded) until `pred` holds over the events.
    fn wait_for(&self, what: &str, pred: impl Fn(&[ServiceEvent]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pred(&self.events()) {
            assert!(
                Instant::now() < deadline,
                "{what}: not seen within 20 s; events: {:#?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl SessionHandler for Recorder {
    fn receiver(&self, _session: &str) -> Receiver {
        Receiver::new().config(receiver_config())
    }
    fn committed(&self, session: &str, received: Received) -> Result<(), HandlerError> {
        let d = received.memory.full_digest(2)?;
        self.guests.lock().unwrap().push((session.to_string(), d));
        Ok(())
    }
    fn event(&self, event: &ServiceEvent) {
        self.events.lock().unwrap().push(event.clone());
    }
}

fn count(events: &[ServiceEvent], f: impl Fn(&ServiceEvent) -> bool) -> usize {
    events.iter().filter(|e| f(e)).count()
}

fn refused(e: &ServiceEvent) -> bool {
    matches!(e, ServiceEvent::Refused { .. })
}

type Started = (
    String,
    Arc<Recorder>,
    livemig::service::StopHandle,
    std::thread::JoinHandle<ServiceSummary>,
);

/// Start a plaintext service on a free port with short test deadlines.
fn start(max_sessions: usize) -> Started {
    start_with(max_sessions, None)
}

/// The same, with mutual TLS when `tls` is given.
fn start_with(
    max_sessions: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (
    String,
    Arc<Recorder>,
    livemig::service::StopHandle,
    std::thread::JoinHandle<ServiceSummary>,
) {
    let config = ServiceConfig {
        max_sessions,
        opening_timeout: Duration::from_millis(500),
        queue_deadline: Duration::from_secs(15),
        silent_queue_deadline: Duration::from_secs(15),
        queue_notice_interval: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(10),
        tls,
        ..Default::default()
    };
    let service = Service::bind("127.0.0.1:0", config).expect("bind");
    let addr = service.local_addr().unwrap().to_string();
    let stop = service.stop_handle();
    let rec = Arc::new(Recorder::default());
    let r2 = rec.clone();
    let h = std::thread::spawn(move || service.run(r2).expect("service runs"));
    (addr, rec, stop, h)
}

/// Connections that must not disturb anything: garbage, connect + close, silence
/// past the opening deadline, and a stream hello with a token nobody holds.
fn strays(addr: &str) -> Vec<TcpStream> {
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    drop(TcpStream::connect(addr).unwrap());
    let silent = TcpStream::connect(addr).unwrap();
    let mut unknown = TcpStream::connect(addr).unwrap();
    let mut frame = Vec::new();
    let hello = ControlMsg::StreamHello {
        session: SessionToken::from_bytes([0x5e; 16]),
        index: 0,
    };
    write_frame(&mut frame, FrameKind::Control, 0, &hello.encode(), &[]).unwrap();
    unknown.write_all(&frame).unwrap();
    vec![garbage, silent, unknown]
}

#[test]
fn three_at_once_two_run_one_queues_strays_change_nothing() {
    let (addr, rec, stop, service) = start(2);
    // Bandwidth-capped sources (100 Mbit/s each: about 2 s for 32 MiB), so that all
    // three hellos arrive while the first two sessions still hold their slots.
    let sources: Vec<Source> = (0..3)
        .map(|i| {
            Source::start(
                source_memory(32 * MIB, 100 + i),
                TrackerKind::Explicit,
                4_000_000,
                4 << 20,
            )
        })
        .collect();
    let runs: Vec<_> = sources
        .iter()
        .map(|src| {
            let mut cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
            cfg.bandwidth = Some(TokenBucket::new(100_000_000));
            let m = Migration::new(src.mem.clone())
                .tracker(src.tracker())
                .vm_control(Box::new(src.dirtier.control()))
                .policy(Box::new(test_policy()))
                .config(cfg);
            let addr = addr.clone();
            std::thread::spawn(move || m.run(&TcpConnector::new(addr)))
        })
        .collect();

    // Strays arrive while two sessions run and one waits.
    rec.wait_for("two sessions running and one queued", |ev| {
        count(ev, |e| matches!(e, ServiceEvent::SessionStart { .. })) == 2
            && count(ev, |e| matches!(e, ServiceEvent::Queued { .. })) == 1
    });
    let held = strays(&addr);
    rec.wait_for("four refused connections", |ev| count(ev, refused) == 4);

    let reports: Vec<_> = with_timeout(GUARD, "three migrations", move || {
        runs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    drop(held);
    for (src, r) in sources.iter().zip(&reports) {
        let r = r
            .as_ref()
            .unwrap_or_else(|e| panic!("a migration failed: {e}"));
        assert!(r.verified);
        let _ = src;
    }
    stop.stop();
    let summary = service.join().unwrap();
    let events = rec.events();

    // Every guest arrived whole: the destination's memory equals its source's.
    let mut want: Vec<u64> = sources
        .iter()
        .map(|s| s.mem.full_digest(2).unwrap())
        .collect();
    let mut got: Vec<u64> = rec.guests.lock().unwrap().iter().map(|g| g.1).collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(want, got, "each committed guest equals one source");

    // At most two at once, and two did run at once; exactly one waited.
    let (mut running, mut most) = (0i32, 0i32);
    for e in &events {
        match e {
            ServiceEvent::SessionStart { .. } => running += 1,
            ServiceEvent::SessionEnd(_) => running -= 1,
            _ => {}
        }
        most = most.max(running);
    }
    assert_eq!(most, 2, "two sessions overlapped, never more: {events:#?}");
    let starts: Vec<(usize, &str)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            ServiceEvent::SessionStart { session, .. } => Some((i, session.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), 3);
    let queued: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            ServiceEvent::Queued { session, .. } => Some(session.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(queued, [starts[2].1], "the queued session started last");
    let first_end = events
        .iter()
        .position(|e| matches!(e, ServiceEvent::SessionEnd(_)))
        .unwrap();
    assert!(
        starts[2].0 > first_end,
        "the queued session started only once a slot freed"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ServiceEvent::Queued { notified: true, .. })),
        "the queued source heard queue notices"
    );

    // The stray connections were refused while the sessions ran, each for its reason.
    let reasons: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            ServiceEvent::Refused { reason, .. } => Some(reason.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("bad frame magic")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("closed before")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("no complete first frame within")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("no running session has its token")),
        "{reasons:?}"
    );
    let last_refused = events.iter().rposition(refused).unwrap();
    assert!(
        last_refused < first_end,
        "the strays came while the first sessions were still running"
    );

    // Every session ended committed and verified, and the totals agree.
    for e in &events {
        if let ServiceEvent::SessionEnd(end) = e {
            assert_eq!(end.outcome, Outcome::Committed, "{end:?}");
            assert!(
                end.verified && end.bytes > 0 && end.error.is_none(),
                "{end:?}"
            );
        }
    }
    assert_eq!(
        (summary.committed, summary.failed, summary.refused),
        (3, 0, 0)
    );
    assert_eq!(summary.refused_connections, 4);
    assert_eq!(summary.abandoned, 0);
}

/// A queued source whose slot does not free in time is told "host busy" (not left
/// to time out); a source that closes while queued leaves the queue.
/// The control connection of a served session is cut while the source sends its
/// `Setup`: the source starts the setup over with the same token, the service
/// hands the new `Hello` to the session that holds the token, and the migration
/// completes in that one session, equal to the paused source.
#[test]
fn a_setup_cut_starts_over_within_the_same_session() {
    let (addr, rec, stop, service) = start(1);
    let src = Source::default_running(16 * MIB, TrackerKind::Explicit);
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(src.dirtier.control()))
        .policy(Box::new(test_policy()))
        .config(config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest));
    let report = with_timeout(GUARD, "served migration", move || {
        let connector = FrameFaultConnector::new(
            TcpConnector::new(addr),
            FrameFault {
                stream: 0,
                frame: 0,
                message: Some("setup"),
                section: Section::Meta,
                offset: 10,
                action: Action::Cut,
            },
        );
        m.run(&connector)
    })
    .expect("the served migration starts its setup over and completes");
    assert!(report.verified);
    assert_eq!(report.setup_restarts, 1, "one setup restart");
    assert_eq!(report.reconnects, 1);
    rec.wait_for("the session committed", |ev| {
        count(ev, |e| matches!(e, ServiceEvent::SessionEnd(_))) == 1
    });
    let events = rec.events();
    assert_eq!(
        count(&events, |e| matches!(e, ServiceEvent::SessionStart { .. })),
        1,
        "one session: {events:#?}"
    );
    let guests = rec.guests.lock().unwrap().clone();
    assert_eq!(guests.len(), 1, "one session, committed once");
    assert_eq!(guests[0].0, report.session);
    assert_eq!(guests[0].1, src.mem.full_digest(2).unwrap());
    stop.stop();
    let _ = service.join();
}

/// A page stream of a served session dies mid-transfer: the source resumes on new
/// connections, the service routes its `Resume` to the session by token, and the
/// migration completes, verified, in that same session.
#[test]
fn a_served_session_resumes_after_a_page_stream_dies() {
    let (addr, rec, stop, service) = start(1);
    let src = Source::default_running(16 * MIB, TrackerKind::Explicit);
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(src.dirtier.control()))
        .policy(Box::new(test_policy()))
        .config(config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest));
    let report = with_timeout(GUARD, "served migration", move || {
        // Streams: 0 control, 1 and 2 pages; a page stream dies early.
        let connector = livemig::transport::fault::FaultyConnector::any_page_stream(
            TcpConnector::new(addr),
            2,
            livemig::transport::fault::Fault::CutAfter(256 << 10),
        );
        m.run(&connector)
    })
    .expect("the served migration resumes and completes");
    assert!(report.verified);
    assert_eq!(report.reconnects, 1, "one resumption");
    rec.wait_for("the session committed", |ev| {
        count(ev, |e| matches!(e, ServiceEvent::SessionEnd(_))) == 1
    });
    let guests = rec.guests.lock().unwrap().clone();
    assert_eq!(guests.len(), 1, "one session, committed once");
    assert_eq!(guests[0].0, report.session);
    assert_eq!(guests[0].1, src.mem.full_digest(2).unwrap());
    stop.stop();
    let _ = service.join();
}

#[test]
fn queue_deadline_refuses_with_host_busy() {
    let config = ServiceConfig {
        max_sessions: 1,
        queue_deadline: Duration::from_secs(15),
        silent_queue_deadline: Duration::from_millis(300),
        queue_notice_interval: Duration::from_millis(100),
        opening_timeout: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let service = Service::bind("127.0.0.1:0", config).expect("bind");
    let addr = service.local_addr().unwrap().to_string();
    let stop = service.stop_handle();
    let rec = Arc::new(Recorder::default());
    let r2 = rec.clone();
    let h = std::thread::spawn(move || service.run(r2).expect("service runs"));

    let tok = |n: u8| SessionToken::from_bytes([n; 16]);
    let hello_with = |session: u8, capabilities: Vec<String>| {
        let msg = ControlMsg::Hello {
            magic: "livemig".into(),
            major: livemig::wire::PROTOCOL_MAJOR,
            minor: livemig::wire::PROTOCOL_MINOR,
            session: tok(session),
            streams: 1,
            capabilities,
        };
        let mut f = Vec::new();
        write_frame(&mut f, FrameKind::Control, 0, &msg.encode(), &[]).unwrap();
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&f).unwrap();
        s
    };
    let hello = |session: u8| hello_with(session, vec![]);
    // The first takes the only slot (its receiver answers Welcome and waits for setup).
    let mut first = hello(1);
    let mut head = [0u8; 16];
    first.read_exact(&mut head).unwrap();
    // The second queues, then is refused with host busy.
    let mut second = hello(2);
    let mut reply = Vec::new();
    second.read_to_end(&mut reply).unwrap();
    let (h2, meta, _, _) = livemig::wire::frame::decode_frame(&reply).expect("a refusal frame");
    assert_eq!(h2.kind, FrameKind::Control);
    match ControlMsg::decode(meta).unwrap() {
        ControlMsg::Refuse { code, message } => {
            assert_eq!(code, livemig::wire::control::RefuseCode::HostBusy);
            assert!(message.contains("queued"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A third queues and hangs up: it leaves the queue at once.
    drop(hello(3));
    rec.wait_for("the third session left the queue", |ev| {
        ev.iter()
            .any(|e| matches!(e, ServiceEvent::SessionEnd(s) if s.session == tok(3).to_string()))
    });
    // A fourth understands queue notices: it hears `Queued` at once and again
    // every notice interval, and is not refused at the silent deadline.
    let mut fourth = hello_with(4, vec!["queue-notice".into()]);
    for _ in 0..3 {
        let mut head = [0u8; 16];
        fourth.read_exact(&mut head).unwrap();
        let h = livemig::wire::FrameHeader::decode(&head).unwrap();
        let mut meta = vec![0u8; h.meta_len as usize];
        fourth.read_exact(&mut meta).unwrap();
        assert_eq!(
            ControlMsg::decode(&meta).unwrap(),
            ControlMsg::Queued {
                limit: 1,
                waiting: 1
            }
        );
    }
    drop(fourth);
    drop(first);
    stop.stop();
    let summary = h.join().unwrap();
    let events = rec.events();
    let ends: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ServiceEvent::SessionEnd(s) => Some((s.session.clone(), s.outcome, s.error.clone())),
            _ => None,
        })
        .collect();
    assert!(
        ends.iter()
            .any(|(s, o, _)| *s == tok(2).to_string() && *o == Outcome::Refused),
        "{ends:?}"
    );
    assert!(
        ends.iter().any(|(s, o, e)| *s == tok(3).to_string()
            && *o == Outcome::Refused
            && e.as_deref()
                .is_some_and(|e| e.contains("closed its connection while queued"))),
        "{ends:?}"
    );
    // The first one's source vanished mid-setup: it failed, and the service went on.
    assert!(
        ends.iter()
            .any(|(s, o, _)| *s == tok(1).to_string() && *o == Outcome::Failed),
        "{ends:?}"
    );
    assert_eq!(summary.sessions, 4);
}

/// `livemig recv --serve --json --out-dir`: one JSON line per event, each guest
/// written under its session token, over mutual TLS from certificate files, a
/// plaintext stray refused, and SIGTERM ends it cleanly.
#[test]
fn cli_serve_json_lines_out_dir_and_sigterm() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    const EXE: &str = env!("CARGO_BIN_EXE_livemig");

    let mem = livemig::GuestMemory::anonymous(16 * MIB, false).unwrap();
    livemig::workload::fill(&mem, livemig::workload::Content::Mix, 5, 2).unwrap();
    let mut image = vec![0u8; 16 * MIB];
    mem.read_pages(0, &mut image).unwrap();
    let image_path = temp_path("serve-image.bin");
    std::fs::write(&image_path, &image).unwrap();
    let dir = temp_path("served");
    let addr = format!("127.0.0.1:{}", free_port());
    // Mutual TLS with files: the destination's certificate for the address the
    // source connects to, the source's for the name the destination allows.
    let ca = Ca::new("livemig CLI test CA");
    let (dest_cert, dest_key) = ca.issue("127.0.0.1");
    let (src_cert, src_key) = ca.issue(SOURCE);
    let pem: Vec<String> = [
        ("serve-ca.pem", ca.cert.pem()),
        ("serve-dest.pem", dest_cert),
        ("serve-dest.key", dest_key),
        ("serve-src.pem", src_cert),
        ("serve-src.key", src_key),
    ]
    .into_iter()
    .map(|(name, text)| {
        let p = temp_path(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    })
    .collect();

    let mut child = Command::new(EXE)
        .args([
            "recv",
            "--serve",
            "--tls-cert",
            &pem[1],
            "--tls-key",
            &pem[2],
            "--tls-ca",
            &pem[0],
            "--tls-peer-name",
            SOURCE,
            "--listen",
            &addr,
            "--json",
            "--max-sessions",
            "2",
        ])
        .arg("--out-dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn recv --serve");
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let v = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    let mut next_event = |want: &str| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {want:?} event within 30 s; saw {lines:?}"));
            lines.push(v.clone());
            if v["event"] == want {
                return v;
            }
        }
    };
    let listening = next_event("listening");
    assert_eq!(listening["max_sessions"], 2);

    let mut stray = TcpStream::connect(&addr).unwrap();
    stray.write_all(&[0u8; 64]).unwrap();
    let send = Command::new(EXE)
        .args(["send", "--to", &addr, "--json"])
        .args([
            "--tls-cert",
            &pem[3],
            "--tls-key",
            &pem[4],
            "--tls-ca",
            &pem[0],
            "--image",
        ])
        .arg(&image_path)
        .output()
        .expect("run send");
    assert!(
        send.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    let end = next_event("session_end");
    assert_eq!(end["outcome"], "committed", "{end}");
    assert_eq!(end["verified"], true);
    assert!(end["bytes"].as_u64().unwrap() > 0);
    assert_eq!(end["memory_bytes"].as_u64().unwrap(), image.len() as u64);
    let token = end["session"].as_str().unwrap().to_string();
    let written = std::fs::read(dir.join(format!("{token}.img"))).expect("guest written");
    assert!(written == image, "the written guest differs from the image");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = next_event("stopped");
    assert_eq!(stopped["committed"], 1);
    assert_eq!(stopped["refused_connections"], 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            Instant::now() < deadline,
            "recv --serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    let refused = lines
        .iter()
        .find(|v| v["event"] == "refused")
        .expect("the stray was reported");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("does not speak TLS"),
        "{refused}"
    );
    let _ = std::fs::remove_file(&image_path);
    for p in &pem {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A test CA made with rcgen (as in tests/tls.rs).
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// An identity with a leaf for `name` from this CA that trusts `trusted`.
    fn identity(&self, name: &str, trusted: &Ca) -> TlsIdentity {
        let (cert, key) = self.issue(name);
        TlsIdentity::from_pem(
            cert.as_bytes(),
            key.as_bytes(),
            trusted.cert.pem().as_bytes(),
        )
        .unwrap()
    }

    /// A leaf for `name`: PEM certificate, PEM key.
    fn issue(&self, name: &str) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

const DEST: &str = "dest.livemig.test";
const SOURCE: &str = "source.livemig.test";

#[test]
fn three_at_once_over_tls_refuse_plaintext_and_foreign_certificates() {
    let ca = Ca::new("livemig test CA");
    let rogue = Ca::new("another CA");
    let tls = server_config(&ca.identity(DEST, &ca), Some(SOURCE)).unwrap();
    let (addr, rec, stop, service) = start_with(2, Some(tls));
    let sources: Vec<Source> = (0..3)
        .map(|i| {
            Source::start(
                source_memory(32 * MIB, 200 + i),
                TrackerKind::Explicit,
                4_000_000,
                4 << 20,
            )
        })
        .collect();
    let runs: Vec<_> = sources
        .iter()
        .map(|src| {
            let mut cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
            cfg.bandwidth = Some(TokenBucket::new(100_000_000));
            let m = Migration::new(src.mem.clone())
                .tracker(src.tracker())
                .vm_control(Box::new(src.dirtier.control()))
                .policy(Box::new(test_policy()))
                .config(cfg);
            let connector = TlsConnector::new(
                TcpConnector::new(addr.clone()),
                &ca.identity(SOURCE, &ca),
                DEST,
            )
            .unwrap();
            std::thread::spawn(move || m.run(&connector))
        })
        .collect();

    rec.wait_for("two sessions running and one queued", |ev| {
        count(ev, |e| matches!(e, ServiceEvent::SessionStart { .. })) == 2
            && count(ev, |e| matches!(e, ServiceEvent::Queued { .. })) == 1
    });
    // A plaintext source's valid stream hello, and a source whose certificate
    // comes from another CA (it trusts the right one, so the destination decides).
    let mut plain = TcpStream::connect(&addr).unwrap();
    let mut frame = Vec::new();
    let hello = ControlMsg::StreamHello {
        session: SessionToken::from_bytes([0x5e; 16]),
        index: 0,
    };
    write_frame(&mut frame, FrameKind::Control, 0, &hello.encode(), &[]).unwrap();
    plain.write_all(&frame).unwrap();
    let foreign = TlsConnector::new(
        TcpConnector::new(addr.clone()),
        &rogue.identity(SOURCE, &ca),
        DEST,
    )
    .unwrap()
    .handshake_timeout(Duration::from_secs(5));
    let refused_at = Instant::now();
    let e = match foreign.connect() {
        Ok(_) => panic!("a certificate from another CA was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        refused_at.elapsed() < Duration::from_secs(4),
        "the refusal arrived, not a timeout: {e}"
    );
    assert!(e.contains("unknown CA"), "the source learns why: {e}");
    rec.wait_for("two refused connections", |ev| count(ev, refused) == 2);

    let reports: Vec<_> = with_timeout(GUARD, "three migrations over TLS", move || {
        runs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    drop(plain);
    for r in &reports {
        let r = r
            .as_ref()
            .unwrap_or_else(|e| panic!("a migration failed: {e}"));
        assert!(r.verified);
    }
    stop.stop();
    let summary = service.join().unwrap();
    let events = rec.events();

    let mut want: Vec<u64> = sources
        .iter()
        .map(|s| s.mem.full_digest(2).unwrap())
        .collect();
    let mut got: Vec<u64> = rec.guests.lock().unwrap().iter().map(|g| g.1).collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(want, got, "each committed guest equals one source");

    let (mut running, mut most) = (0i32, 0i32);
    for e in &events {
        match e {
            ServiceEvent::SessionStart { .. } => running += 1,
            ServiceEvent::SessionEnd(_) => running -= 1,
            _ => {}
        }
        most = most.max(running);
    }
    assert_eq!(most, 2, "two sessions overlapped, never more: {events:#?}");

    let reasons: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            ServiceEvent::Refused { reason, .. } => Some(reason.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("TLS handshake failed") && r.contains("does not speak TLS")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("TLS handshake failed") && r.contains("unknown issuer")),
        "{reasons:?}"
    );
    let first_end = events
        .iter()
        .position(|e| matches!(e, ServiceEvent::SessionEnd(_)))
        .unwrap();
    let last_refused = events.iter().rposition(refused).unwrap();
    assert!(
        last_refused < first_end,
        "the refused connections came while the first sessions were still running"
    );
    for e in &events {
        if let ServiceEvent::SessionEnd(end) = e {
            assert_eq!(end.outcome, Outcome::Committed, "{end:?}");
            assert!(end.verified && end.bytes > 0, "{end:?}");
        }
    }
    assert_eq!(
        (summary.committed, summary.failed, summary.refused),
        (3, 0, 0)
    );
    assert_eq!(summary.refused_connections, 2);
    assert_eq!(summary.abandoned, 0);
}
