//! Shared fixtures for the integration tests: source memory, a dirtier, a receiver
//! thread, a migration under a timeout guard, a recording `VmControl`, and a
//! frame-aware fault-injecting connector.
//!
//! Each test binary uses a subset of these, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod netns;
pub mod procs;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use livemig::codec::CodecId;
use livemig::dirty::{DirtyTracker, ExplicitTracker, HashScanTracker};
use livemig::engine::{
    DowntimePolicy, Migration, MigrationConfig, MigrationError, Mode, OnLimit, Verify, VmControl,
};
use livemig::memory::{DirtyBitmap, GuestMemory, GuestRegion};
use livemig::receiver::{ReceiveError, Received, Receiver, ReceiverConfig};
use livemig::stats::MigrationReport;
use livemig::transport::{Acceptor, Connector, Stream, TransportError};
use livemig::wire::{FrameHeader, FRAME_HEADER_LEN};
use livemig::workload::{self, Content, Dirtier, DirtierConfig, Skew};

/// Longest a single migration may take before the test is failed as hung.
pub const GUARD: Duration = Duration::from_secs(60);

/// Default test guest size.
pub const MIB: usize = 1 << 20;

/// Run `f` on its own thread; panic if it does not finish within `limit` (a hang
/// is a test failure, not a stuck CI job). A panic inside `f` is propagated.
pub fn with_timeout<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new()
        .name(format!("guard:{what}"))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .expect("spawn guarded thread");
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => {
            let _ = h.join();
            v
        }
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("{what}: did not finish within {limit:?} (hang)"),
    }
}

/// Anonymous single-region memory of `bytes`, filled with the mixed content.
pub fn source_memory(bytes: usize, seed: u64) -> Arc<GuestMemory> {
    let mem = GuestMemory::anonymous(bytes, false).expect("allocate source memory");
    workload::fill(&mem, Content::Mix, seed, 2).expect("fill");
    Arc::new(mem)
}

/// Two regions: `bytes/2` at gpa 0 and `bytes/2` at gpa 1 GiB, filled.
pub fn two_region_memory(bytes: usize, seed: u64) -> Arc<GuestMemory> {
    let half = bytes / 2;
    let mem = GuestMemory::new(vec![
        GuestRegion::anonymous(0, half, false).expect("region 0"),
        GuestRegion::anonymous(1 << 30, half, false).expect("region 1"),
    ])
    .expect("two regions");
    workload::fill(&mem, Content::Mix, seed, 2).expect("fill");
    Arc::new(mem)
}

/// Which tracker a source uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerKind {
    /// Explicit bitmap marked by the dirtier.
    Explicit,
    /// Hash scan (the dirtier marks nothing).
    Hash,
}

/// A running simulated source VM: memory, its explicit bitmap, the dirtier.
pub struct Source {
    pub mem: Arc<GuestMemory>,
    pub bitmap: Arc<DirtyBitmap>,
    pub dirtier: Dirtier,
    pub kind: TrackerKind,
}

impl Source {
    /// Start a dirtier writing `rate` bytes/s over the first `hot` bytes of `mem`.
    pub fn start(mem: Arc<GuestMemory>, kind: TrackerKind, rate: u64, hot: u64) -> Self {
        let bitmap = Arc::new(DirtyBitmap::new(mem.total_pages()));
        let dirtier = Dirtier::start(
            mem.clone(),
            (kind == TrackerKind::Explicit).then(|| bitmap.clone()),
            DirtierConfig {
                rate_bytes_per_s: rate,
                hot_set_bytes: hot,
                skew: Skew::Hot80_20,
                threads: 1,
                seed: 7,
                ..Default::default()
            },
        );
        Self {
            mem,
            bitmap,
            dirtier,
            kind,
        }
    }

    /// The default test source: `bytes` of mixed content, 16 MB/s over 4 MiB.
    pub fn default_running(bytes: usize, kind: TrackerKind) -> Self {
        Self::start(source_memory(bytes, 11), kind, 16_000_000, 4 << 20)
    }

    /// A fresh tracker of this source's kind.
    pub fn tracker(&self) -> Box<dyn DirtyTracker> {
        match self.kind {
            TrackerKind::Explicit => Box::new(ExplicitTracker::new(self.bitmap.clone())),
            TrackerKind::Hash => Box::new(HashScanTracker::new(1)),
        }
    }
}

/// A policy that always ends: force brownout after a few rounds.
pub fn test_policy() -> DowntimePolicy {
    let mut p = DowntimePolicy::with_target(Duration::from_millis(50));
    p.max_rounds = 6;
    p.max_time = Duration::from_secs(20);
    p.on_limit = OnLimit::ForceBrownout;
    p
}

/// Migration settings for tests (short reply timeout so failures surface fast).
pub fn config(mode: Mode, streams: u16, codec: CodecId, verify: Verify) -> MigrationConfig {
    let mut settings = MigrationConfig::default();
    settings.mode = mode;
    settings.streams = streams;
    settings.codec = codec;
    settings.verify = verify;
    settings.reply_timeout = Duration::from_secs(20);
    settings
}

/// Receiver settings for tests.
pub fn receiver_config() -> ReceiverConfig {
    let mut settings = ReceiverConfig::default();
    settings.huge_pages = false;
    settings.prefault = false;
    settings.accept_timeout = Duration::from_secs(20);
    settings.idle_timeout = Duration::from_secs(30);
    settings
}

/// Run `receiver` on its own thread over `acceptor`.
pub fn spawn_receiver<A: Acceptor + 'static>(
    receiver: Receiver,
    acceptor: A,
) -> JoinHandle<Result<Received, ReceiveError>> {
    std::thread::Builder::new()
        .name("test-receiver".into())
        .spawn(move || receiver.run(&acceptor))
        .expect("spawn receiver")
}

/// Both sides' results.
pub struct Outcome {
    pub source: Result<MigrationReport, MigrationError>,
    pub dest: Result<Received, ReceiveError>,
}

/// Run `migration` over `connector` against `receiver` on `acceptor`, both under
/// the timeout guard.
pub fn migrate<C, A>(migration: Migration, connector: C, receiver: Receiver, acceptor: A) -> Outcome
where
    C: Connector + 'static,
    A: Acceptor + 'static,
{
    with_timeout(GUARD, "migration", move || {
        let rx = spawn_receiver(receiver, acceptor);
        let source = migration.run(&connector);
        // The source has finished; the receiver must finish too (it may be waiting
        // on the control stream, which the connector's drop closes).
        drop(connector);
        let dest = rx.join().expect("receiver thread panicked");
        Outcome { source, dest }
    })
}

/// Assert a successful migration whose destination equals the source at brownout.
/// The source stays paused after success, so its memory is still the brownout image.
pub fn assert_migrated(src: &Source, out: Outcome) -> (MigrationReport, Received) {
    let (report, received) = match (out.source, out.dest) {
        (Ok(r), Ok(d)) => (r, d),
        (s, d) => panic!(
            "migration failed: source {:?}; destination {:?}",
            s.err(),
            d.err()
        ),
    };
    assert!(report.verified, "source reports unverified");
    assert!(received.report.verified, "destination reports unverified");
    assert!(
        src.dirtier.control().is_paused(),
        "source must stay paused after a successful switchover"
    );
    let a = src.mem.full_digest(2).expect("source digest");
    let b = received.memory.full_digest(2).expect("dest digest");
    assert_eq!(
        a, b,
        "destination memory differs from the source at brownout"
    );
    assert_eq!(report.digest, received.report.digest);
    (report, received)
}

/// Run a full migration of a running source over a fresh connector/acceptor pair.
pub fn run_e2e<C, A>(src: &Source, cfg: MigrationConfig, connector: C, acceptor: A) -> Outcome
where
    C: Connector + 'static,
    A: Acceptor + 'static,
{
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(src.dirtier.control()))
        .policy(Box::new(test_policy()))
        .config(cfg);
    migrate(
        m,
        connector,
        Receiver::new().config(receiver_config()),
        acceptor,
    )
}

// ---------------------------------------------------------------------------
// VmControl that records calls.

/// Calls made to a [`RecordingVm`].
#[derive(Debug, Default, Clone)]
pub struct VmLog {
    calls: Arc<Mutex<Vec<&'static str>>>,
}

impl VmLog {
    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
    pub fn count(&self, what: &str) -> usize {
        self.calls().iter().filter(|c| **c == what).count()
    }
    /// Every pause was followed by a resume (the source survived).
    pub fn assert_resumed_if_paused(&self) {
        let calls = self.calls();
        let mut paused = false;
        for c in &calls {
            match *c {
                "pause" => paused = true,
                "resume" => paused = false,
                _ => {}
            }
        }
        assert!(!paused, "source VM left paused after a failure: {calls:?}");
    }
}

/// Wraps a [`VmControl`] and records pause/resume/throttle.
pub struct RecordingVm<V> {
    pub inner: V,
    pub log: VmLog,
}

impl<V: VmControl> VmControl for RecordingVm<V> {
    fn pause(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.log.calls.lock().unwrap().push("pause");
        self.inner.pause()
    }
    fn resume(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.log.calls.lock().unwrap().push("resume");
        self.inner.resume()
    }
    fn throttle(&mut self, percent: u8) -> Result<(), livemig::engine::VmControlError> {
        self.log.calls.lock().unwrap().push("throttle");
        self.inner.throttle(percent)
    }
}

// ---------------------------------------------------------------------------
// Frame-aware fault injection.

/// Which section of a frame a [`FrameFault`] hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Header,
    Meta,
    Data,
}

/// What a [`FrameFault`] does when it reaches its target byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Flip one bit of the target byte.
    Flip,
    /// Close the stream just before the target byte (truncation at a known place).
    Cut,
}

/// A fault aimed at byte `offset` of `section` of the `frame`-th frame (0-based,
/// counting every frame) of the `stream`-th stream opened (0 = control).
/// Unlike [`livemig::transport::fault::Fault`], the target does not depend on the
/// length of earlier frames (the JSON handshake varies with the session id).
///
/// With `message` set, `frame` counts only the control frames whose JSON `type`
/// is that message (0 = its first): the index of, say, the `Brownout` among all
/// frames depends on how many `Drain`s the policy asked for first.
#[derive(Debug, Clone, Copy)]
pub struct FrameFault {
    pub stream: usize,
    pub frame: u64,
    pub message: Option<&'static str>,
    pub section: Section,
    pub offset: u64,
    pub action: Action,
}

/// Connector applying a [`FrameFault`].
pub struct FrameFaultConnector<C> {
    inner: C,
    fault: FrameFault,
    opened: AtomicUsize,
    /// Set once the fault fired (so a test can check it was reached).
    pub fired: Arc<std::sync::atomic::AtomicBool>,
}

impl<C> FrameFaultConnector<C> {
    pub fn new(inner: C, fault: FrameFault) -> Self {
        Self {
            inner,
            fault,
            opened: AtomicUsize::new(0),
            fired: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }
}

impl<C: Connector> Connector for FrameFaultConnector<C> {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let s = self.inner.connect()?;
        if self.opened.fetch_add(1, Ordering::SeqCst) == self.fault.stream {
            Ok(Box::new(FrameFaultStream {
                inner: s,
                fault: self.fault,
                fired: self.fired.clone(),
                frame: 0,
                pos: 0,
                head: Vec::with_capacity(FRAME_HEADER_LEN),
                lens: None,
                cut: false,
                held: Vec::new(),
                aimed: None,
                seen: 0,
            }))
        } else {
            Ok(s)
        }
    }
    fn describe(&self) -> String {
        format!("frame-fault({})", self.inner.describe())
    }
}

#[derive(Debug)]
struct FrameFaultStream {
    inner: Box<dyn Stream>,
    fault: FrameFault,
    fired: Arc<std::sync::atomic::AtomicBool>,
    /// Index of the frame being written.
    frame: u64,
    /// Bytes of the current frame written so far.
    pos: u64,
    /// Header bytes of the current frame collected so far.
    head: Vec<u8>,
    /// (meta_len, data_len) once the header is complete.
    lens: Option<(u64, u64)>,
    cut: bool,
    /// With a `message` target: the current frame's header and meta, held back
    /// until the meta says which message the frame carries.
    held: Vec<u8>,
    /// With a `message` target: whether the current frame is the one aimed at
    /// (`None` until its meta is complete).
    aimed: Option<bool>,
    /// With a `message` target: frames carrying that message seen so far.
    seen: u64,
}

impl FrameFaultStream {
    /// Whether the current frame is the one aimed at.
    fn is_target(&self) -> bool {
        match self.fault.message {
            None => self.frame == self.fault.frame,
            Some(_) => self.aimed == Some(true),
        }
    }

    /// Absolute position (within the frame) of the target, once known.
    fn target(&self) -> Option<u64> {
        if !self.is_target() {
            return None;
        }
        let h = FRAME_HEADER_LEN as u64;
        match self.fault.section {
            Section::Header => Some(self.fault.offset),
            Section::Meta => self.lens.map(|_| h + self.fault.offset),
            Section::Data => self.lens.map(|(m, _)| h + m + self.fault.offset),
        }
    }

    /// Advance the frame parser over `b` (bytes actually written).
    fn track(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.head.len() < FRAME_HEADER_LEN {
                let n = (FRAME_HEADER_LEN - self.head.len()).min(b.len());
                self.head.extend_from_slice(&b[..n]);
                self.pos += n as u64;
                b = &b[n..];
                if self.head.len() == FRAME_HEADER_LEN {
                    let mut hb = [0u8; FRAME_HEADER_LEN];
                    hb.copy_from_slice(&self.head);
                    // Parse the original bytes (lengths are never flipped by a
                    // Meta/Data fault; a Header fault ends the useful life anyway).
                    let meta = u32::from_le_bytes(hb[4..8].try_into().unwrap()) as u64;
                    let data = u32::from_le_bytes(hb[8..12].try_into().unwrap()) as u64;
                    let _ = FrameHeader::decode(&hb);
                    self.lens = Some((meta, data));
                    self.maybe_end();
                }
                continue;
            }
            let (m, d) = self.lens.expect("header parsed");
            let end = FRAME_HEADER_LEN as u64 + m + d;
            let n = ((end - self.pos) as usize).min(b.len());
            self.pos += n as u64;
            b = &b[n..];
            self.maybe_end();
        }
    }

    fn maybe_end(&mut self) {
        if let Some((m, d)) = self.lens {
            if self.pos == FRAME_HEADER_LEN as u64 + m + d {
                self.frame += 1;
                self.pos = 0;
                self.head.clear();
                self.lens = None;
                self.aimed = None;
            }
        }
    }
}

impl Read for FrameFaultStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl FrameFaultStream {
    /// With a `message` target and the current frame not yet identified: take
    /// `buf`'s bytes up to the end of the frame's meta into `held`; once the meta
    /// is complete, decide whether this is the frame aimed at and pass the held
    /// bytes on (faulted if so).
    fn hold(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let h = FRAME_HEADER_LEN;
        let want = if self.held.len() < h {
            h
        } else {
            h + u32::from_le_bytes(self.held[4..8].try_into().unwrap()) as usize
        };
        let n = (want - self.held.len()).min(buf.len());
        self.held.extend_from_slice(&buf[..n]);
        if self.held.len() < h {
            return Ok(n);
        }
        let end = h + u32::from_le_bytes(self.held[4..8].try_into().unwrap()) as usize;
        if self.held.len() < end {
            return Ok(n);
        }
        let kind: Option<String> = serde_json::from_slice::<serde_json::Value>(&self.held[h..end])
            .ok()
            .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(String::from));
        let matches = kind.as_deref() == self.fault.message;
        self.aimed = Some(matches && self.seen == self.fault.frame);
        if matches {
            self.seen += 1;
        }
        let held = std::mem::take(&mut self.held);
        let mut done = 0;
        while done < held.len() && !self.cut {
            done += self.pass(&held[done..])?;
        }
        if self.cut {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "fault: stream cut",
            ));
        }
        Ok(n)
    }
}

impl Write for FrameFaultStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cut {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "fault: stream cut",
            ));
        }
        if self.fault.message.is_some() && self.aimed.is_none() && self.pos == 0 {
            return self.hold(buf);
        }
        self.pass(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl FrameFaultStream {
    /// Write (part of) `buf` through, applying the fault where it is aimed.
    fn pass(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cut {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "fault: stream cut",
            ));
        }
        // Never write past the end of the current header in one go, so the target
        // is known before the bytes that contain it are written.
        let mut len = buf.len();
        if self.head.len() < FRAME_HEADER_LEN {
            len = len.min(FRAME_HEADER_LEN - self.head.len());
        }
        let buf = &buf[..len];
        let target = self
            .target()
            .filter(|&t| t >= self.pos && t < self.pos + len as u64);
        let n = match (target, self.fault.action) {
            (None, _) => self.inner.write(buf)?,
            (Some(t), Action::Flip) => {
                let i = (t - self.pos) as usize;
                // Write up to and including the flipped byte, so that exactly one
                // byte is changed even if the inner write is short.
                let mut copy = buf[..=i].to_vec();
                copy[i] ^= 0x10;
                let mut done = 0;
                while done < copy.len() {
                    done += self.inner.write(&copy[done..])?;
                }
                self.fired.store(true, Ordering::SeqCst);
                copy.len()
            }
            (Some(t), Action::Cut) => {
                let i = (t - self.pos) as usize;
                let mut done = 0;
                while done < i {
                    done += self.inner.write(&buf[done..i])?;
                }
                self.inner.flush()?;
                self.cut = true;
                self.fired.store(true, Ordering::SeqCst);
                self.inner.shutdown();
                if i == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "fault: stream cut",
                    ));
                }
                i
            }
        };
        self.track(&buf[..n]);
        Ok(n)
    }
}

impl Stream for FrameFaultStream {
    livemig::forward_stream!(inner);
}

/// Copies everything written on a stream into a shared log (reads pass through), to
/// see what one side sent.
#[derive(Debug)]
pub struct Tee {
    pub inner: Box<dyn Stream>,
    pub log: Arc<Mutex<Vec<u8>>>,
}

impl Read for Tee {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(b)
    }
}

impl Write for Tee {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.log.lock().unwrap().extend_from_slice(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Stream for Tee {
    livemig::forward_stream!(inner);
}

/// A loopback TCP port that was free when picked, for a child process to listen on.
///
/// Picked below Linux's ephemeral range (32768–60999 by default): a port from
/// `bind(:0)` comes from that range, where every outgoing connection of the
/// tests running alongside takes its source port, so one of them could take it
/// before the child binds. Each process starts at its own offset and each call
/// moves on, so parallel tests do not pick the same port.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
        let port = (LOW + (base + step.wrapping_mul(7)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A unique temporary path for this process and `name`.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "livemig-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

/// Keys every migration JSON report carries (`bench --json`, `send --json`).
pub const REPORT_KEYS: &[&str] = &[
    "memory_bytes",
    "mode",
    "streams",
    "image_read",
    "tracker",
    "rounds",
    "total_ms",
    "downtime_ms",
    "predicted_downtime_ms",
    "predicted_downtime_raw_ms",
    "prediction_margin",
    "bytes_on_wire",
    "pages_sent",
    "zero_pages",
    "guest_gib_per_s",
    "wire_gbit_per_s",
    "converged",
    "verified",
];

/// A memory image file of `bytes` of mixed content (as a stopped guest would have
/// it) at a fresh temporary path; returns the path and the bytes written.
pub fn image_file(bytes: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let mem = GuestMemory::anonymous(bytes, false).expect("allocate image memory");
    workload::fill(&mem, Content::Mix, seed, 2).expect("fill");
    let mut data = vec![0u8; bytes];
    mem.read_pages(0, &mut data).expect("read image memory");
    let path = temp_path("image.bin");
    std::fs::write(&path, &data).expect("write image");
    (path, data)
}

/// The last non-empty line of `stdout` parsed as JSON.
pub fn last_json_line(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("no output; stdout was {stdout:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// Wait for `child` up to `limit` (killing it and failing the test past that);
/// its exit code, stdout and stderr.
pub fn wait_with_timeout(
    mut child: std::process::Child,
    limit: Duration,
    what: &str,
) -> (i32, String, String) {
    use std::io::Read as _;
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let (mut out, mut err) = (String::new(), String::new());
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), out, err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
