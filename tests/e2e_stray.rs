//! Stray connections never fail a migration: a port scan, a health check, garbage,
//! a silent client or a page stream of another session is dropped and counted, and
//! the real migration that follows completes and verifies. A receiver that waits in
//! vain says it timed out, and how long it waited; a peer that trickles its setup is
//! cut at the setup deadline.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use livemig::engine::{Migration, MigrationConfig, MigrationError};
use livemig::memory::GuestMemory;
use livemig::receiver::{ReceiveError, Received, Receiver, ReceiverConfig};
use livemig::session::SessionToken;
use livemig::stats::MigrationReport;
use livemig::transport::framed::{write_frame, FrameReader};
use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
use livemig::transport::{mem, Connector, Stream, TransportError};
use livemig::wire::{ControlMsg, FrameKind, CAPABILITIES, PROTOCOL_MAJOR, PROTOCOL_MINOR};

const HELLO_TIMEOUT: Duration = Duration::from_millis(300);

fn stray_config() -> ReceiverConfig {
    let mut settings = receiver_config();
    settings.hello_timeout = HELLO_TIMEOUT;
    settings
}

/// A stopped guest (no dirtier), so both ends must match byte for byte.
fn migration(mem: &Arc<GuestMemory>) -> Migration {
    Migration::new(mem.clone()).config({
        let mut settings = MigrationConfig::default();
        settings.streams = 2;
        settings.reply_timeout = Duration::from_secs(20);
        settings
    })
}

fn assert_verified(
    mem: &GuestMemory,
    source: Result<MigrationReport, MigrationError>,
    dest: Result<Received, ReceiveError>,
) -> Received {
    let (report, received) = match (source, dest) {
        (Ok(r), Ok(d)) => (r, d),
        (s, d) => panic!(
            "migration failed: source {:?}; destination {:?}",
            s.err(),
            d.err()
        ),
    };
    assert!(report.verified && received.report.verified);
    assert_eq!(
        mem.full_digest(2).unwrap(),
        received.memory.full_digest(2).unwrap()
    );
    assert_eq!(received.report.session.len(), 32);
    received
}

fn control_frame(msg: &ControlMsg, attachment: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(
        &mut out,
        FrameKind::Control,
        0,
        &msg.encode(),
        &[attachment],
    )
    .unwrap();
    out
}

/// A port scan (connect + close) and an HTTP request reach a waiting receiver over
/// loopback TCP before the migration does.
#[test]
fn bare_connect_and_garbage_before_the_migration_are_dropped() {
    let mem = source_memory(4 * MIB, 11);
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").expect("bind");
    let addr = acceptor.local_addr().unwrap().to_string();
    let m = migration(&mem);
    let (source, dest) = with_timeout(GUARD, "strays before hello", move || {
        let rx = spawn_receiver(Receiver::new().config(stray_config()), acceptor);
        drop(TcpStream::connect(&addr).unwrap());
        let mut http = TcpStream::connect(&addr).unwrap();
        http.write_all(b"GET / HTTP/1.1\r\nHost: destination\r\n\r\n")
            .unwrap();
        let source = m.run(&TcpConnector::new(addr));
        // The receiver closed the HTTP client's connection: it reads EOF, not a hang.
        http.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 64];
        match http.read(&mut buf) {
            Ok(0) => {}
            // Closed with the rest of the request unread: the kernel resets.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the stray connection is still open: {other:?}"),
        }
        (source, rx.join().unwrap())
    });
    let received = assert_verified(&mem, source, dest);
    assert_eq!(received.report.stray_connections, 2);
}

/// A client that connects and says nothing is dropped after the hello deadline, and
/// the migration queued behind it proceeds.
#[test]
fn silent_connection_is_dropped_at_the_hello_deadline() {
    let mem = source_memory(4 * MIB, 12);
    let (c, a) = mem::pair();
    let m = migration(&mem);
    let (source, dest, silent_saw) = with_timeout(GUARD, "silent stray", move || {
        let mut silent = c.connect().unwrap();
        let rx = spawn_receiver(Receiver::new().config(stray_config()), a);
        let source = m.run(&c);
        let dest = rx.join().unwrap();
        // Dropped means closed: the silent client reads EOF.
        silent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 16];
        (source, dest, silent.read(&mut buf).map_err(|e| e.kind()))
    });
    let received = assert_verified(&mem, source, dest);
    assert_eq!(received.report.stray_connections, 1);
    assert_eq!(silent_saw, Ok(0), "the stray connection was closed");
}

/// Before each page stream of the real source, slips in connections that must not
/// join the session: another session's stream, garbage, a silent client, and (with
/// the real token) a duplicate and an out-of-range stream index.
struct Interloper {
    inner: mem::MemConnector,
    connects: Mutex<u32>,
    control_log: Arc<Mutex<Vec<u8>>>,
    held: Mutex<Vec<Box<dyn Stream>>>,
}

impl Interloper {
    fn stray(&self, bytes: &[u8]) {
        let mut s = self.inner.connect().unwrap();
        s.write_all(bytes).unwrap();
        self.held.lock().unwrap().push(s);
    }
    fn real_token(&self) -> SessionToken {
        let log = self.control_log.lock().unwrap();
        let (_, meta, _, _) = livemig::wire::frame::decode_frame(&log).unwrap();
        match ControlMsg::decode(meta).unwrap() {
            ControlMsg::Hello { session, .. } => session,
            other => panic!("first control frame is {other:?}"),
        }
    }
}

impl Connector for Interloper {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let n = {
            let mut c = self.connects.lock().unwrap();
            *c += 1;
            *c
        };
        match n {
            1 => {
                return Ok(Box::new(Tee {
                    inner: self.inner.connect()?,
                    log: self.control_log.clone(),
                }))
            }
            2 => {
                let other = SessionToken::generate().unwrap();
                self.stray(&control_frame(
                    &ControlMsg::StreamHello {
                        session: other,
                        index: 0,
                    },
                    &[],
                ));
                self.stray(b"\x00\x01garbage that is no frame at all");
                self.stray(&[]);
            }
            3 => {
                let token = self.real_token();
                for index in [0, 7] {
                    self.stray(&control_frame(
                        &ControlMsg::StreamHello {
                            session: token,
                            index,
                        },
                        &[],
                    ));
                }
            }
            _ => {}
        }
        self.inner.connect()
    }
    fn describe(&self) -> String {
        "interloper".into()
    }
}

#[test]
fn foreign_and_malformed_page_streams_are_dropped_during_accept() {
    let mem = source_memory(4 * MIB, 13);
    let (c, a) = mem::pair();
    let connector = Interloper {
        inner: c,
        connects: Mutex::new(0),
        control_log: Arc::default(),
        held: Mutex::new(Vec::new()),
    };
    let m = migration(&mem);
    let (source, dest) = with_timeout(GUARD, "strays during accept", move || {
        let rx = spawn_receiver(Receiver::new().config(stray_config()), a);
        let source = m.run(&connector);
        (source, rx.join().unwrap())
    });
    let received = assert_verified(&mem, source, dest);
    assert_eq!(received.report.streams, 2);
    assert_eq!(received.report.stray_connections, 5);
}

/// No migration ever comes, only strays: the receiver gives up at its accept
/// deadline and says so (no bare "os error 11").
#[test]
fn waiting_in_vain_times_out_and_says_how_long() {
    let (c, a) = mem::pair();
    let config = {
        let mut settings = receiver_config();
        settings.accept_timeout = Duration::from_millis(600);
        settings.hello_timeout = Duration::from_millis(150);
        settings
    };
    let err = with_timeout(GUARD, "no migration", move || {
        let _silent = c.connect().unwrap();
        let mut garbage = c.connect().unwrap();
        garbage.write_all(b"0123456789abcdefXYZ").unwrap();
        Receiver::new().config(config).run(&a).map(|_| ())
    })
    .expect_err("nothing arrived");
    let shown = err.to_string();
    match err {
        ReceiveError::TimedOut {
            phase,
            after,
            stray_connections,
            ..
        } => {
            assert_eq!(phase, "accept");
            assert_eq!(after, Duration::from_millis(600));
            assert_eq!(stray_connections, 2);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        shown.contains("timed out") && shown.contains("600ms"),
        "{shown}"
    );
    assert!(shown.contains("2 stray connections"), "{shown}");
    assert!(!shown.contains("os error"), "{shown}");
}

/// Speak Hello + Setup by hand for a 1 MiB guest; returns the control stream.
fn hand_setup(c: &mem::MemConnector, streams: u16, token: SessionToken) -> FrameReader {
    let mut control = FrameReader::new(c.connect().unwrap(), "control");
    control.send_control(&hello(streams, token), &[]).unwrap();
    assert!(matches!(
        control.control().unwrap().0,
        ControlMsg::Welcome { .. }
    ));
    control.send_control(&setup(), &[]).unwrap();
    assert_eq!(control.control().unwrap().0, ControlMsg::SetupOk);
    control
}

fn hello(streams: u16, session: SessionToken) -> ControlMsg {
    ControlMsg::Hello {
        magic: "livemig".into(),
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
        session,
        streams,
        capabilities: CAPABILITIES.iter().map(|s| s.to_string()).collect(),
    }
}

fn setup() -> ControlMsg {
    ControlMsg::Setup {
        layout: livemig::memory::MemoryLayout {
            regions: vec![(0, MIB as u64)],
        },
        compat: Default::default(),
        config_len: 0,
        participants: vec![],
    }
}

/// One of two page streams arrives: the receiver stops at the accept deadline and
/// names what is missing.
#[test]
fn missing_page_stream_times_out_naming_it() {
    let (c, a) = mem::pair();
    let config = {
        let mut settings = stray_config();
        settings.accept_timeout = Duration::from_millis(500);
        settings
    };
    let err = with_timeout(GUARD, "missing page stream", move || {
        let rx = spawn_receiver(Receiver::new().config(config), a);
        let token = SessionToken::generate().unwrap();
        let _control = hand_setup(&c, 2, token);
        let mut page = c.connect().unwrap();
        page.write_all(&control_frame(
            &ControlMsg::StreamHello {
                session: token,
                index: 1,
            },
            &[],
        ))
        .unwrap();
        rx.join().unwrap().map(|_| ())
    })
    .expect_err("a page stream is missing");
    let shown = err.to_string();
    assert!(
        matches!(
            err,
            ReceiveError::TimedOut {
                phase: "accepting page streams",
                stray_connections: 0,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        shown.contains("only 1 of 2 page streams arrived"),
        "{shown}"
    );
    assert!(shown.contains("500ms"), "{shown}");
}

/// A peer that sends its Hello, then its Setup one byte at a time (each byte well
/// inside any per-read timeout), is cut at the setup deadline: the receiver does not
/// wait for the trickle to end.
#[test]
fn trickled_setup_is_cut_at_the_setup_deadline() {
    let (c, a) = mem::pair();
    let setup_timeout = Duration::from_millis(500);
    let config = {
        let mut settings = receiver_config();
        settings.setup_timeout = setup_timeout;
        settings.hello_timeout = Duration::from_secs(5);
        settings.idle_timeout = Duration::from_secs(5);
        // No wait for the source to start the setup over: the deadline's error.
        settings.resume_window = Duration::ZERO;
        settings
    };
    let setup_frame = control_frame(&setup(), &[]);
    let frame_len = setup_frame.len();
    // Trickled in full, the frame would take frame_len × 40 ms (several seconds).
    assert!(frame_len > 100, "{frame_len}");
    let (result, sent) = with_timeout(GUARD, "trickled setup", move || {
        let rx = spawn_receiver(Receiver::new().config(config), a);
        let mut control = FrameReader::new(c.connect().unwrap(), "control");
        control
            .send_control(&hello(1, SessionToken::generate().unwrap()), &[])
            .unwrap();
        assert!(matches!(
            control.control().unwrap().0,
            ControlMsg::Welcome { .. }
        ));
        let mut stream = control.into_stream();
        let trickler = std::thread::spawn(move || {
            let mut sent = 0;
            for b in &setup_frame {
                if stream.write_all(std::slice::from_ref(b)).is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(40));
            }
            sent
        });
        let result = rx.join().unwrap().map(|_| ());
        (result, trickler.join().unwrap())
    });
    let err = result.expect_err("the setup never completes in time");
    let shown = err.to_string();
    match err {
        ReceiveError::TimedOut { phase, after, .. } => {
            assert_eq!(phase, "setup");
            assert_eq!(after, setup_timeout);
        }
        other => panic!("expected a setup timeout, got {other:?}"),
    }
    assert!(shown.contains("timed out during setup"), "{shown}");
    assert!(
        sent < frame_len,
        "the receiver waited for the whole trickle ({sent} of {frame_len} bytes)"
    );
}
