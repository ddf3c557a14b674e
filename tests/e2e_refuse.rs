//! A destination that refuses: the source gets a clear error naming the reason,
//! keeps running, and its memory is untouched.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use livemig::codec::CodecId;
use livemig::engine::{Migration, MigrationError, Mode, Verify};
use livemig::memory::GuestMemory;
use livemig::receiver::{ReceiveError, Receiver};
use livemig::session::SessionToken;
use livemig::transport::framed::FrameReader;
use livemig::transport::{mem, Acceptor, Connector};
use livemig::wire::control::RefuseCode;
use livemig::wire::{ControlMsg, PROTOCOL_MAJOR, PROTOCOL_MINOR};

fn mismatched_receiver(bytes: usize) -> Receiver {
    let dest = Arc::new(GuestMemory::anonymous(bytes, false).unwrap());
    Receiver::new().memory(dest).config(receiver_config())
}

fn assert_size_refusal(out: Outcome) {
    match out.source {
        Err(MigrationError::Refused {
            code: RefuseCode::MemoryLayout,
            ref message,
        }) => assert!(
            message.as_str().contains("memory size mismatch"),
            "refusal does not name the reason: {message}"
        ),
        other => panic!("expected a memory-layout refusal, got {other:?}"),
    }
    let e = out
        .dest
        .expect_err("the destination must not report success");
    assert!(
        matches!(
            e,
            ReceiveError::Refused {
                code: RefuseCode::MemoryLayout,
                ..
            }
        ),
        "{e:?}"
    );
    // The source error's Display names the reason too.
}

/// Size mismatch with a running source: refused, the VM was never paused and keeps
/// writing.
#[test]
fn memory_size_mismatch_source_keeps_running() {
    let src = Source::default_running(32 * MIB, TrackerKind::Explicit);
    let log = VmLog::default();
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(RecordingVm {
            inner: src.dirtier.control(),
            log: log.clone(),
        }))
        .policy(Box::new(test_policy()))
        .config(config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest));
    let (c, a) = mem::pair();
    let out = migrate(m, c, mismatched_receiver(16 * MIB), a);
    let msg = out
        .source
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("memory size mismatch"), "{msg}");
    assert_size_refusal(out);
    assert_eq!(log.count("pause"), 0, "refused at setup: no pause");
    assert!(!src.dirtier.control().is_paused());
    let w0 = src.dirtier.writes();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while src.dirtier.writes() == w0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the source guest stopped writing after a refused migration"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The engine never writes source memory: a digest taken with the guest stopped is
/// the same before and after a refused migration (and also after a successful one).
#[test]
fn refused_migration_leaves_source_memory_untouched() {
    let src = Source::default_running(32 * MIB, TrackerKind::Explicit);
    // Stop the simulated CPUs to take a stable digest (the engine gets a StoppedVm).
    let mut ctl = src.dirtier.control();
    livemig::engine::VmControl::pause(&mut ctl).unwrap();
    let before = src.mem.full_digest(2).unwrap();
    let (c, a) = mem::pair();
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .policy(Box::new(test_policy()))
        .config(config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest));
    let out = migrate(m, c, mismatched_receiver(64 * MIB), a);
    assert_size_refusal(out);
    assert_eq!(src.mem.full_digest(2).unwrap(), before);
    livemig::engine::VmControl::resume(&mut ctl).unwrap();
}

/// Two regions on the source, one region of the same total on the destination:
/// still a layout refusal.
#[test]
fn region_layout_mismatch_is_refused() {
    let mem = two_region_memory(16 * MIB, 1);
    let (c, a) = mem::pair();
    let out = migrate(Migration::new(mem), c, mismatched_receiver(16 * MIB), a);
    assert_size_refusal(out);
}

/// A host memory limit refuses with a layout code and says why.
#[test]
fn host_memory_limit_is_refused() {
    let mem = source_memory(16 * MIB, 1);
    let mut cfg = receiver_config();
    cfg.host.max_memory = Some(8 * MIB as u64);
    let (c, a) = mem::pair();
    let out = migrate(Migration::new(mem), c, Receiver::new().config(cfg), a);
    match out.source {
        Err(MigrationError::Refused {
            code: RefuseCode::MemoryLayout,
            message,
        }) => assert!(message.as_str().contains("limit"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(out.dest.is_err());
}

/// Hand-crafted Hello with another protocol major: the receiver answers Refuse
/// (Version) on the wire and returns the same refusal.
#[test]
fn wrong_major_version_is_refused_by_receiver() {
    for (major, minor) in [
        (PROTOCOL_MAJOR + 1, 0),
        (0, PROTOCOL_MINOR),
        (PROTOCOL_MAJOR, PROTOCOL_MINOR + 5),
    ] {
        let (c, a) = mem::pair();
        let reply = with_timeout(GUARD, "version refusal", move || {
            let rx = spawn_receiver(Receiver::new().config(receiver_config()), a);
            let mut control = FrameReader::new(c.connect().unwrap(), "control");
            control
                .send_control(
                    &ControlMsg::Hello {
                        magic: "livemig".into(),
                        major,
                        minor,
                        session: SessionToken::from_bytes([42; 16]),
                        streams: 1,
                        capabilities: vec![],
                    },
                    &[],
                )
                .unwrap();
            let reply = control.control().map(|(m, _)| m);
            (reply, rx.join().unwrap())
        });
        match reply.0 {
            Ok(ControlMsg::Refuse {
                code: RefuseCode::Version,
                message,
            }) => assert!(message.contains(&format!("{major}.{minor}")), "{message}"),
            other => panic!("{major}.{minor}: expected a version refusal, got {other:?}"),
        }
        assert!(
            matches!(
                reply.1,
                Err(ReceiveError::Refused {
                    code: RefuseCode::Version,
                    ..
                })
            ),
            "{:?}",
            reply.1.err()
        );
    }
}

/// A source of the previous major version, whose Hello carries its session as a
/// number (protocol 1): the receiver cannot parse that Hello, still answers with a
/// version refusal naming both versions, and returns the same refusal.
#[test]
fn previous_major_hello_with_old_fields_gets_a_version_refusal() {
    let (c, a) = mem::pair();
    let (reply, recv) = with_timeout(GUARD, "old hello", move || {
        let rx = spawn_receiver(Receiver::new().config(receiver_config()), a);
        let mut stream = c.connect().unwrap();
        let old_hello = br#"{"type":"hello","magic":"livemig","major":1,"minor":0,"session":12345,"streams":1,"capabilities":[]}"#;
        livemig::transport::framed::write_frame(
            &mut stream,
            livemig::wire::FrameKind::Control,
            0,
            old_hello,
            &[],
        )
        .unwrap();
        let mut control = FrameReader::new(stream, "control");
        let reply = control.control().map(|(m, _)| m);
        (reply, rx.join().unwrap())
    });
    match reply {
        Ok(ControlMsg::Refuse {
            code: RefuseCode::Version,
            message,
        }) => {
            assert!(message.contains("1.0"), "{message}");
            assert!(
                message.contains(&format!("{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}")),
                "{message}"
            );
        }
        other => panic!("expected a version refusal, got {other:?}"),
    }
    assert!(
        matches!(
            recv,
            Err(ReceiveError::Refused {
                code: RefuseCode::Version,
                ..
            })
        ),
        "{:?}",
        recv.err()
    );
}

/// A fake destination that refuses the version: the source reports it verbatim.
#[test]
fn version_refusal_reaches_the_source() {
    let mem = source_memory(16 * MIB, 1);
    let (c, a) = mem::pair();
    let result = with_timeout(GUARD, "source refused", move || {
        let fake = std::thread::spawn(move || {
            let s = a.accept(Duration::from_secs(10)).unwrap();
            let mut control = FrameReader::new(s, "control");
            let (hello, _) = control.control().unwrap();
            assert!(matches!(hello, ControlMsg::Hello { .. }));
            control
                .send_control(
                    &ControlMsg::Refuse {
                        code: RefuseCode::Version,
                        message: "protocol version 1.0 is not supported (destination speaks 2.0)"
                            .into(),
                    },
                    &[],
                )
                .unwrap();
        });
        let r = Migration::new(mem).run(&c);
        fake.join().unwrap();
        r
    });
    match result {
        Err(MigrationError::Refused {
            code: RefuseCode::Version,
            message,
        }) => assert!(message.as_str().contains("not supported")),
        other => panic!("{other:?}"),
    }
}

/// A hostile destination's refusal text is its claim, not ours: the source
/// carries it bounded and with every control character escaped, so it cannot
/// write terminal escape sequences or fake lines into the operator's logs.
#[test]
fn a_hostile_refusal_message_reaches_the_source_sanitized_and_bounded() {
    let mem = source_memory(16 * MIB, 1);
    let (c, a) = mem::pair();
    let hostile = format!(
        "\x1b[2J\x1b]0;pwned\x07\nERROR fake line\u{202e}{}",
        "A".repeat(16 * 1024)
    );
    let sent = hostile.clone();
    let result = with_timeout(GUARD, "hostile refusal", move || {
        let fake = std::thread::spawn(move || {
            let s = a.accept(Duration::from_secs(10)).unwrap();
            let mut control = FrameReader::new(s, "control");
            let _ = control.control().unwrap();
            control
                .send_control(
                    &ControlMsg::Refuse {
                        code: RefuseCode::Other,
                        message: sent,
                    },
                    &[],
                )
                .unwrap();
        });
        let r = Migration::new(mem).run(&c);
        fake.join().unwrap();
        r
    });
    match result {
        Err(e @ MigrationError::Refused { .. }) => {
            let shown = e.to_string();
            assert!(!shown.chars().any(char::is_control), "{shown:?}");
            assert!(!shown.contains('\u{202e}'), "{shown:?}");
            assert!(shown.contains("\\u{1b}[2J"), "{shown:?}");
            assert!(shown.contains("\\nERROR fake line"), "{shown:?}");
            assert!(
                shown.len() < hostile.len() / 8,
                "bounded: {} bytes",
                shown.len()
            );
            let MigrationError::Refused { message, .. } = e else {
                unreachable!()
            };
            assert!(message.is_truncated());
            assert!(message.as_str().len() <= livemig::wire::PeerText::MAX_BYTES);
        }
        other => panic!("{other:?}"),
    }
}

/// Too many streams requested: refused with a message naming the limit.
#[test]
fn too_many_streams_is_refused() {
    let mem = source_memory(16 * MIB, 1);
    let mut cfg = receiver_config();
    cfg.max_streams = 2;
    let (c, a) = mem::pair();
    let m = Migration::new(mem).config(config(Mode::Multichannel, 4, CodecId::Raw, Verify::Digest));
    let out = migrate(m, c, Receiver::new().config(cfg), a);
    match out.source {
        Err(MigrationError::Refused { message, .. }) => {
            assert!(message.as_str().contains("1 to 2"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(out.dest.is_err());
}
