//! A hostile source: raw bytes over in-memory streams to a real `Receiver`, one bad
//! input per test. Each asserts the specific error the receiver ends with and that
//! it ended within a deadline (no hang, no waiting out a timeout it did not need).

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, temp_path, MIB};
use livemig::codec::CodecId;
use livemig::device::envelope;
use livemig::device::{ParticipantError, RestoreState, Veto};
use livemig::engine::{Migration, MigrationConfig, MigrationError};
use livemig::memory::{zero_page_hash, GuestMemory, MemoryLayout, PAGE_SIZE};
use livemig::receiver::{ReceiveError, Received, Receiver, ReceiverConfig};
use livemig::transport::framed::{write_frame, FrameReader};
use livemig::transport::{mem, Acceptor, Connector, Stream};
use livemig::wire::batch::BatchMeta;
use livemig::wire::control::RefuseCode;
use livemig::wire::frame::RoundEnd;
use livemig::wire::{ControlMsg, Extent, FrameHeader, FrameKind, PROTOCOL_MAJOR, PROTOCOL_MINOR};

/// Longest any bad input may keep the receiver busy.
const DEADLINE: Duration = Duration::from_secs(10);
/// The hostile session's guest: 16 pages.
const GUEST_PAGES: u64 = 16;

type Outcome = Result<Received, ReceiveError>;

/// A receiver running on its own thread, and the source's side of its acceptor.
struct Dest {
    connector: mem::MemConnector,
    done: std::sync::mpsc::Receiver<Outcome>,
}

fn config() -> ReceiverConfig {
    let mut settings = ReceiverConfig::default();
    settings.huge_pages = false;
    settings.prefault = false;
    settings.accept_timeout = Duration::from_secs(30);
    settings.idle_timeout = Duration::from_secs(30);
    // A hostile session is never waited for: resumption has its own tests
    // (tests/e2e_resume.rs).
    settings.resume_window = Duration::ZERO;
    settings
}

/// A receiver that drops a malformed connection as a stray and keeps waiting, for
/// a short while: the test then reads why it dropped it from the timeout.
fn stray_config() -> ReceiverConfig {
    let mut settings = config();
    settings.accept_timeout = Duration::from_secs(1);
    settings
}

fn start(receiver: Receiver) -> Dest {
    let (connector, acceptor) = mem::pair();
    let (tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let acceptor: Box<dyn Acceptor> = Box::new(acceptor);
        let _ = tx.send(receiver.run(&*acceptor));
    });
    Dest { connector, done }
}

impl Dest {
    fn connect(&self) -> Box<dyn Stream> {
        self.connector.connect().expect("connect")
    }

    /// The receiver's result, which must come within [`DEADLINE`] of `since`.
    fn finish(self, since: Instant) -> ReceiveError {
        let r = self
            .done
            .recv_timeout(DEADLINE)
            .expect("the receiver returns instead of hanging");
        assert!(since.elapsed() < DEADLINE, "took {:?}", since.elapsed());
        match r {
            Ok(_) => panic!("a hostile session must not succeed"),
            Err(e) => e,
        }
    }
}

fn send(s: &mut dyn Stream, kind: FrameKind, meta: &[u8], data: &[u8]) {
    write_frame(s, kind, 0, meta, &[data]).expect("write frame");
}

fn send_control(s: &mut dyn Stream, msg: &ControlMsg, attachment: &[u8]) {
    send(s, FrameKind::Control, &msg.encode(), attachment);
}

/// A control frame header declaring `data_len` attachment bytes, and its meta;
/// the attachment itself is never sent.
fn send_declared(s: &mut dyn Stream, msg: &ControlMsg, data_len: u32) {
    let meta = msg.encode();
    let h = FrameHeader {
        kind: FrameKind::Control,
        flags: 0,
        meta_len: meta.len() as u32,
        data_len,
        crc: 0,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(&meta).unwrap();
}

fn hello(streams: u16) -> ControlMsg {
    ControlMsg::Hello {
        magic: "livemig".into(),
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
        session: livemig::session::SessionToken::from_bytes([7; 16]),
        streams,
        capabilities: vec![],
    }
}

fn stream_hello(index: u16) -> ControlMsg {
    ControlMsg::StreamHello {
        session: livemig::session::SessionToken::from_bytes([7; 16]),
        index,
    }
}

fn setup(layout: MemoryLayout) -> ControlMsg {
    ControlMsg::Setup {
        layout,
        compat: Default::default(),
        config_len: 0,
        participants: vec![],
    }
}

fn guest_layout() -> MemoryLayout {
    MemoryLayout {
        regions: vec![(0, GUEST_PAGES * PAGE_SIZE as u64)],
    }
}

/// Read one reply on the control stream.
fn reply(control: Box<dyn Stream>) -> (ControlMsg, Box<dyn Stream>) {
    let mut r = FrameReader::new(control, "control");
    let msg = r.control().expect("a reply").0;
    (msg, r.into_stream())
}

/// Handshake and setup with `streams` page streams; returns the control stream.
fn handshake(dest: &Dest, streams: u16, layout: MemoryLayout) -> Box<dyn Stream> {
    let mut c = dest.connect();
    send_control(&mut *c, &hello(streams), &[]);
    let (m, mut c) = reply(c);
    assert!(matches!(m, ControlMsg::Welcome { .. }), "{m:?}");
    send_control(&mut *c, &setup(layout), &[]);
    let (m, c) = reply(c);
    assert_eq!(m, ControlMsg::SetupOk);
    c
}

/// Handshake, setup and `n` page streams.
fn session(dest: &Dest, n: u16) -> (Box<dyn Stream>, Vec<Box<dyn Stream>>) {
    let c = handshake(dest, n, guest_layout());
    let pages = (0..n)
        .map(|i| {
            let mut p = dest.connect();
            send_control(&mut *p, &stream_hello(i), &[]);
            p
        })
        .collect();
    (c, pages)
}

/// Encoded batch meta of zero pages at `extents` (not validated: hostile).
fn zero_batch(round: u32, extents: &[(u64, u32)]) -> Vec<u8> {
    let n: usize = extents.iter().map(|e| e.1 as usize).sum();
    let m = BatchMeta {
        round,
        codec: Some(CodecId::Raw),
        flags: 0,
        payload_len: 0,
        extents: extents
            .iter()
            .map(|&(gfn, count)| Extent { gfn, count })
            .collect(),
        zero_map: (0..n.div_ceil(8))
            .map(|i| {
                if (i + 1) * 8 <= n {
                    0xff
                } else {
                    (1u8 << (n % 8)) - 1
                }
            })
            .collect(),
        hashes: vec![zero_page_hash(); n],
    };
    let mut b = Vec::new();
    m.encode_into(&mut b);
    b
}

fn round_end(round: u32) -> Vec<u8> {
    RoundEnd {
        round,
        batches: 0,
        pages: 0,
    }
    .encode()
    .to_vec()
}

/// Wait until the receiver cuts page stream `p` (it does on any page error), then
/// abort on the control stream so the receiver reports the page error. (After a
/// lost link the receiver cuts the control stream too, and the abort finds it
/// closed.)
fn await_cut_then_abort(mut control: Box<dyn Stream>, mut p: Box<dyn Stream>) {
    let _ = p.set_read_timeout(Some(DEADLINE));
    let mut b = [0u8; 1];
    assert_eq!(
        p.read(&mut b).unwrap_or(0),
        0,
        "the receiver cuts page streams"
    );
    let abort = ControlMsg::Abort {
        reason: "test".into(),
    };
    let _ = write_frame(
        &mut *control,
        FrameKind::Control,
        0,
        &abort.encode(),
        &[&[]],
    );
}

/// A hostile page stream is refused as invalid, never taken for a broken link
/// the session could resume from.
fn pages_error(e: ReceiveError) -> String {
    pages_error_of_kind(e, livemig::receiver::PageErrorKind::Invalid)
}

fn pages_error_of_kind(e: ReceiveError, kind: livemig::receiver::PageErrorKind) -> String {
    match e {
        ReceiveError::Pages(m) => {
            assert_eq!(m.kind(), kind, "{m}");
            m.to_string()
        }
        other => panic!("expected a page error, got {other:?}"),
    }
}

fn refused(e: ReceiveError, want: RefuseCode) -> String {
    match e {
        ReceiveError::Refused { code, reason } if code == want => reason.to_string(),
        other => panic!("expected a {want:?} refusal, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Size limits before allocation.

#[test]
fn oversize_control_attachment() {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let mut c = dest.connect();
    send_control(&mut *c, &hello(1), &[]);
    let (_, mut c) = reply(c);
    // Declares the protocol's largest attachment and sends none of it: refused from
    // the header alone (reading it would wait for bytes that never come).
    send_declared(
        &mut *c,
        &setup(guest_layout()),
        livemig::wire::MAX_CONTROL_DATA as u32,
    );
    let e = dest.finish(t).to_string();
    assert!(
        e.contains("control attachment length 67108864 exceeds the bound 1048576"),
        "{e}"
    );
}

#[test]
fn setup_attachment_over_its_configured_cap() {
    let dest = start(Receiver::new().config({
        let mut settings = config();
        settings.max_setup_attachment = 4096;
        settings
    }));
    let t = Instant::now();
    let mut c = dest.connect();
    send_control(&mut *c, &hello(1), &[]);
    let (_, mut c) = reply(c);
    send_declared(&mut *c, &setup(guest_layout()), 4097);
    let e = dest.finish(t).to_string();
    assert!(e.contains("exceeds the bound 4096"), "{e}");
}

#[test]
fn stream_hello_with_huge_attachment() {
    let dest = start(Receiver::new().config(stray_config()));
    let t = Instant::now();
    let _c = handshake(&dest, 1, guest_layout());
    let mut p = dest.connect();
    send_declared(&mut *p, &stream_hello(0), 64 << 20);
    let e = dest.finish(t);
    let m = e.to_string();
    // Dropped as a stray (the session's real streams may still come); the
    // receiver then times out naming why it dropped it.
    assert!(
        m.contains("accepting page streams")
            && m.contains("1 stray")
            && m.contains("control attachment length 67108864 exceeds the bound 0"),
        "{m}"
    );
}

#[test]
fn hello_with_an_attachment() {
    let dest = start(Receiver::new().config(stray_config()));
    let t = Instant::now();
    let mut c = dest.connect();
    send_control(&mut *c, &hello(1), &[0u8; 100]);
    let e = dest.finish(t).to_string();
    assert!(
        e.contains("accept") && e.contains("1 stray") && e.contains("exceeds the bound 0"),
        "{e}"
    );
}

#[test]
fn device_state_over_its_configured_cap() {
    let dest = start(Receiver::new().config({
        let mut settings = config();
        settings.max_device_state = 4096;
        settings
    }));
    let t = Instant::now();
    let (mut c, _pages) = session(&dest, 1);
    send_declared(&mut *c, &ControlMsg::DeviceState, 8192);
    let e = dest.finish(t).to_string();
    assert!(e.contains("exceeds the bound 4096"), "{e}");
}

#[test]
fn commit_with_an_attachment() {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let (mut c, _pages) = session(&dest, 1);
    let commit = ControlMsg::Commit {
        digest: livemig::proof::MemoryDigest::default(),
        pages: GUEST_PAGES,
        rounds: 1,
    };
    send_control(&mut *c, &commit, &[1, 2, 3]);
    let e = dest.finish(t).to_string();
    assert!(
        e.contains("control attachment length 3 exceeds the bound 0"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Extents and per-page round stamps.

fn batch_error(extents: &[(u64, u32)]) -> String {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let (c, mut pages) = session(&dest, 1);
    let mut p = pages.pop().unwrap();
    send(&mut *p, FrameKind::Batch, &zero_batch(0, extents), &[]);
    await_cut_then_abort(c, p);
    pages_error(dest.finish(t))
}

#[test]
fn overlapping_extents() {
    let e = batch_error(&[(0, 4), (2, 2)]);
    assert!(e.contains("extents overlap or are not sorted"), "{e}");
}

#[test]
fn duplicate_extents() {
    let e = batch_error(&[(5, 1), (5, 1)]);
    assert!(e.contains("extents overlap or are not sorted"), "{e}");
}

#[test]
fn unsorted_extents() {
    let e = batch_error(&[(8, 1), (3, 1)]);
    assert!(e.contains("extents overlap or are not sorted"), "{e}");
}

#[test]
fn extent_past_guest_memory() {
    let e = batch_error(&[(GUEST_PAGES - 1, 2)]);
    assert!(e.contains("crosses the end of its region"), "{e}");
}

#[test]
fn same_page_on_two_streams_in_one_round() {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let (c, mut pages) = session(&dest, 2);
    let mut p1 = pages.pop().unwrap();
    let mut p0 = pages.pop().unwrap();
    send(&mut *p0, FrameKind::Batch, &zero_batch(0, &[(3, 2)]), &[]);
    send(&mut *p1, FrameKind::Batch, &zero_batch(0, &[(4, 1)]), &[]);
    await_cut_then_abort(c, p0);
    let e = pages_error(dest.finish(t));
    assert!(
        e.contains("page at index 4 arrives twice in round 0"),
        "{e}"
    );
}

#[test]
fn same_page_twice_on_one_stream_in_one_round() {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let (c, mut pages) = session(&dest, 1);
    let mut p = pages.pop().unwrap();
    send(&mut *p, FrameKind::Batch, &zero_batch(0, &[(6, 1)]), &[]);
    send(&mut *p, FrameKind::Batch, &zero_batch(0, &[(6, 1)]), &[]);
    await_cut_then_abort(c, p);
    let e = pages_error(dest.finish(t));
    assert!(
        e.contains("page at index 6 arrives twice in round 0"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Layout and memory bound.

#[test]
fn layout_overflow() {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let mut c = dest.connect();
    send_control(&mut *c, &hello(1), &[]);
    let (_, mut c) = reply(c);
    // 2^63 + 2^63 bytes: wraps to 0 in unchecked u64 arithmetic.
    let layout = MemoryLayout {
        regions: vec![(0, 1 << 63), (1 << 63, 1 << 63)],
    };
    send_control(&mut *c, &setup(layout), &[]);
    let (m, _c) = reply(c);
    assert!(
        matches!(&m, ControlMsg::Refuse { code: RefuseCode::MemoryLayout, message } if message.contains("overflows")),
        "{m:?}"
    );
    let e = refused(dest.finish(t), RefuseCode::MemoryLayout);
    assert!(e.contains("memory layout overflows"), "{e}");
}

#[test]
fn region_past_the_address_space() {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let mut c = dest.connect();
    send_control(&mut *c, &hello(1), &[]);
    let (_, mut c) = reply(c);
    let layout = MemoryLayout {
        regions: vec![(u64::MAX - 4095, 8192)],
    };
    send_control(&mut *c, &setup(layout), &[]);
    let e = refused(dest.finish(t), RefuseCode::MemoryLayout);
    assert!(e.contains("region end"), "{e}");
}

#[test]
fn guest_larger_than_max_memory() {
    // A real source with a 128 MiB guest; the receiver may commit 64 MiB.
    let dest = start(Receiver::new().config({
        let mut settings = config();
        settings.max_memory = Some(64 * MIB as u64);
        settings
    }));
    let t = Instant::now();
    let src = Arc::new(GuestMemory::anonymous(128 * MIB, false).unwrap());
    let r = Migration::new(src)
        .config({
            let mut settings = MigrationConfig::default();
            settings.streams = 1;
            settings
        })
        .run(&dest.connector);
    match r {
        Err(MigrationError::Refused {
            code: RefuseCode::MemoryLayout,
            message,
        }) => assert!(
            message.as_str().contains("not enough memory")
                && message
                    .as_str()
                    .contains(&format!("{} bytes available", 64 * MIB)),
            "{message}"
        ),
        other => panic!("expected a memory refusal, got {other:?}"),
    }
    let e = refused(dest.finish(t), RefuseCode::MemoryLayout);
    assert!(e.contains("the guest needs"), "{e}");
}

#[test]
fn guest_larger_than_max_memory_over_the_cli() {
    const EXE: &str = env!("CARGO_BIN_EXE_livemig");
    let image = temp_path("hostile-128m.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(128 * MIB as u64))
        .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut recv = Command::new(EXE)
        .args([
            "recv",
            "--plaintext",
            "--listen",
            &addr,
            "--max-memory",
            "64M",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let send = loop {
        let out = Command::new(EXE)
            .args([
                "send",
                "--plaintext",
                "--to",
                &addr,
                "--image",
                image.to_str().unwrap(),
            ])
            .args(["--streams", "1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        // The listener may not be up yet on the first try.
        if err.contains("cannot connect") && t.elapsed() < DEADLINE {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        break (out.status, err);
    };
    let _ = std::fs::remove_file(&image);
    assert!(!send.0.success(), "send must fail: {}", send.1);
    assert!(
        send.1.contains("not enough memory on the destination"),
        "send names memory: {}",
        send.1
    );
    // The receiver refused and exited with an error of its own: not killed.
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = recv.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "recv did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(recv.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "recv exits by itself: {err}");
    assert!(err.contains("refused") && err.contains("memory"), "{err}");
}

// ---------------------------------------------------------------------------
// Rounds and stream ends.

#[test]
fn stream_end_while_round_end() {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let (c, mut pages) = session(&dest, 2);
    let mut p1 = pages.pop().unwrap();
    let mut p0 = pages.pop().unwrap();
    send(&mut *p0, FrameKind::RoundEnd, &round_end(0), &[]);
    send(&mut *p1, FrameKind::RoundEnd, &round_end(0), &[]);
    // Stream 0 waits at the end of round 1; stream 1 ends instead.
    send(&mut *p0, FrameKind::RoundEnd, &round_end(1), &[]);
    send(&mut *p1, FrameKind::StreamEnd, &[], &[]);
    await_cut_then_abort(c, p0);
    let e = pages_error(dest.finish(t));
    assert!(
        e.contains("page stream 1 ended after 1 round(s) while this stream still sends round 1"),
        "{e}"
    );
}

#[test]
fn stream_end_before_any_round() {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let (c, mut pages) = session(&dest, 2);
    let mut p1 = pages.pop().unwrap();
    let mut p0 = pages.pop().unwrap();
    send(&mut *p0, FrameKind::RoundEnd, &round_end(0), &[]);
    send(&mut *p1, FrameKind::StreamEnd, &[], &[]);
    await_cut_then_abort(c, p0);
    let e = pages_error(dest.finish(t));
    assert!(
        e.contains("page stream 1 ended before any round was complete"),
        "{e}"
    );
}

#[test]
fn too_many_rounds() {
    let dest = start(Receiver::new().config({
        let mut settings = config();
        settings.max_rounds = 3;
        settings
    }));
    let t = Instant::now();
    let (c, mut pages) = session(&dest, 1);
    let mut p = pages.pop().unwrap();
    for r in 0..4 {
        send(&mut *p, FrameKind::RoundEnd, &round_end(r), &[]);
    }
    await_cut_then_abort(c, p);
    let e = pages_error(dest.finish(t));
    assert!(
        e.contains("round 3 exceeds this receiver's limit of 3 rounds"),
        "{e}"
    );
}

#[test]
fn round_end_out_of_order() {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let (c, mut pages) = session(&dest, 1);
    let mut p = pages.pop().unwrap();
    send(&mut *p, FrameKind::RoundEnd, &round_end(5), &[]);
    await_cut_then_abort(c, p);
    let e = pages_error(dest.finish(t));
    assert!(e.contains("round end 5 during round 0"), "{e}");
}

// ---------------------------------------------------------------------------
// Device state.

/// A participant that accepts any state (the envelope is what is under test).
struct AnyState;

impl RestoreState for AnyState {
    fn id(&self) -> &str {
        "cpu"
    }
    fn validate_setup(&mut self, _info: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn validate_state(&mut self, _version: u32, _blob: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn restore(&mut self, _version: u32, _blob: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn discard(&mut self) {}
}

/// A complete session (every page sent as a zero page in one round) that ends
/// with `envelope` as the device state; returns the receiver's veto reason.
fn envelope_veto(env: Vec<u8>) -> String {
    let dest = start(
        Receiver::new()
            .config(config())
            .participant(Box::new(AnyState)),
    );
    let t = Instant::now();
    let mut c = dest.connect();
    send_control(&mut *c, &hello(1), &[]);
    let (_, mut c) = reply(c);
    let setup = ControlMsg::Setup {
        layout: guest_layout(),
        compat: Default::default(),
        config_len: 0,
        participants: vec![("cpu".into(), 0)],
    };
    send_control(&mut *c, &setup, &[]);
    let (m, mut c) = reply(c);
    assert_eq!(m, ControlMsg::SetupOk);
    let mut p = dest.connect();
    send_control(&mut *p, &stream_hello(0), &[]);
    send(
        &mut *p,
        FrameKind::Batch,
        &zero_batch(0, &[(0, GUEST_PAGES as u32)]),
        &[],
    );
    send(&mut *p, FrameKind::RoundEnd, &round_end(0), &[]);
    send(&mut *p, FrameKind::StreamEnd, &[], &[]);
    send_control(&mut *c, &ControlMsg::Brownout { final_round: 0 }, &[]);
    send_control(&mut *c, &ControlMsg::DeviceState, &env);
    let digest =
        livemig::proof::MemoryDigest::of_table(&vec![zero_page_hash(); GUEST_PAGES as usize]);
    let commit = ControlMsg::Commit {
        digest,
        pages: GUEST_PAGES,
        rounds: 1,
    };
    send_control(&mut *c, &commit, &[]);
    let (m, _c) = reply(c);
    assert!(
        matches!(&m, ControlMsg::Veto { participant, .. } if participant == "envelope"),
        "{m:?}"
    );
    match dest.finish(t) {
        ReceiveError::Vetoed(v) => {
            assert_eq!(v.participant, "envelope");
            v.reason
        }
        other => panic!("expected an envelope veto, got {other:?}"),
    }
}

fn good_envelope() -> Vec<u8> {
    envelope::encode(&[envelope::Entry {
        id: "cpu".into(),
        version: 1,
        blob: b"registers".to_vec(),
    }])
}

#[test]
fn bad_device_envelope_version() {
    let mut env = good_envelope();
    env[4..6].copy_from_slice(&(envelope::MAJOR + 1).to_le_bytes());
    let e = envelope_veto(env);
    assert!(e.contains("version 2.0 is not supported"), "{e}");
}

#[test]
fn bad_device_envelope_checksum() {
    let mut env = good_envelope();
    let last = env.len() - 1;
    env[last] ^= 0xff;
    let e = envelope_veto(env);
    assert!(e.contains("entry \"cpu\" fails its checksum"), "{e}");
}

#[test]
fn bad_device_envelope_size() {
    let mut env = good_envelope();
    // The blob length field of the first entry (after magic, version, count,
    // id length, id and version).
    let at = 4 + 4 + 4 + 2 + 3 + 4;
    env[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = envelope_veto(env);
    assert!(e.contains("blob length 4294967295 exceeds the cap"), "{e}");
}

#[test]
fn bad_device_envelope_truncated() {
    let env = good_envelope();
    let e = envelope_veto(env[..env.len() - 3].to_vec());
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn a_valid_hostile_session_still_commits() {
    // The harness itself is right: the same session with a good envelope commits,
    // so the failures above are the receiver's checks, not the harness's mistakes.
    let dest = start(
        Receiver::new()
            .config(config())
            .participant(Box::new(AnyState)),
    );
    let mut c = dest.connect();
    send_control(&mut *c, &hello(1), &[]);
    let (_, mut c) = reply(c);
    let setup = ControlMsg::Setup {
        layout: guest_layout(),
        compat: Default::default(),
        config_len: 0,
        participants: vec![("cpu".into(), 0)],
    };
    send_control(&mut *c, &setup, &[]);
    let (_, mut c) = reply(c);
    let mut p = dest.connect();
    send_control(&mut *p, &stream_hello(0), &[]);
    send(
        &mut *p,
        FrameKind::Batch,
        &zero_batch(0, &[(0, GUEST_PAGES as u32)]),
        &[],
    );
    send(&mut *p, FrameKind::RoundEnd, &round_end(0), &[]);
    send(&mut *p, FrameKind::StreamEnd, &[], &[]);
    send_control(&mut *c, &ControlMsg::Brownout { final_round: 0 }, &[]);
    send_control(&mut *c, &ControlMsg::DeviceState, &good_envelope());
    let digest =
        livemig::proof::MemoryDigest::of_table(&vec![zero_page_hash(); GUEST_PAGES as usize]);
    let commit = ControlMsg::Commit {
        digest,
        pages: GUEST_PAGES,
        rounds: 1,
    };
    send_control(&mut *c, &commit, &[]);
    let (m, mut c) = reply(c);
    assert!(matches!(m, ControlMsg::Prepared { .. }), "{m:?}");
    send_control(&mut *c, &ControlMsg::Released, &[]);
    let (m, _c) = reply(c);
    assert!(matches!(m, ControlMsg::Committed { .. }), "{m:?}");
    let r = dest
        .done
        .recv_timeout(DEADLINE)
        .expect("returns")
        .expect("commits");
    assert!(r.report.verified);
}

// ---------------------------------------------------------------------------
// Truncated frames.

#[test]
fn truncated_control_frame() {
    let dest = start(Receiver::new().config(stray_config()));
    let t = Instant::now();
    let mut c = dest.connect();
    let mut frame = Vec::new();
    write_frame(&mut frame, FrameKind::Control, 0, &hello(1).encode(), &[]).unwrap();
    c.write_all(&frame[..frame.len() - 5]).unwrap();
    c.shutdown();
    let e = dest.finish(t).to_string();
    assert!(
        e.contains("accept") && e.contains("1 stray") && e.contains("closed the control stream"),
        "{e}"
    );
}

#[test]
fn truncated_batch_frame() {
    let dest = start(Receiver::new().config(config()));
    let t = Instant::now();
    let (c, mut pages) = session(&dest, 2);
    let p1 = pages.pop().unwrap();
    let mut p0 = pages.pop().unwrap();
    let mut frame = Vec::new();
    write_frame(
        &mut frame,
        FrameKind::Batch,
        0,
        &zero_batch(0, &[(0, 4)]),
        &[],
    )
    .unwrap();
    p0.write_all(&frame[..frame.len() / 2]).unwrap();
    p0.shutdown();
    // The truncated stream fails its page thread, which cuts stream 1 too. A
    // stream that ends mid-frame is a lost link (the session could resume), until
    // the source aborts.
    await_cut_then_abort(c, p1);
    let e = pages_error_of_kind(dest.finish(t), livemig::receiver::PageErrorKind::Link);
    assert!(e.contains("closed the page stream"), "{e}");
}

// ---------------------------------------------------------------------------
// The source bounds what it accepts, too.

#[test]
fn sender_refuses_a_reply_with_an_attachment() {
    let (connector, acceptor) = mem::pair();
    let fake = std::thread::spawn(move || {
        let s = acceptor.accept(DEADLINE).expect("accept");
        let mut r = FrameReader::new(s, "control");
        let _ = r.control().expect("hello");
        let welcome = ControlMsg::Welcome {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            capabilities: vec![],
        };
        // A reply carrying a 1 MiB attachment the source never asked for.
        // The source may hang up before all of it is written.
        let _ = r.send_control(&welcome, &vec![0u8; MIB]);
    });
    let t = Instant::now();
    let src = Arc::new(GuestMemory::anonymous(MIB, false).unwrap());
    let e = Migration::new(src)
        .config({
            let mut settings = MigrationConfig::default();
            settings.streams = 1;
            settings
        })
        .run(&connector)
        .expect_err("the source refuses the reply");
    assert!(t.elapsed() < DEADLINE);
    let m = e.to_string();
    assert!(
        m.contains("control attachment length 1048576 exceeds the bound 0"),
        "{m}"
    );
    fake.join().unwrap();
}
