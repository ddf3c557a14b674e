//! Injecting a plan's faults into a live migration: a [`Connector`] and an
//! [`Acceptor`] whose streams can be cut, stalled, corrupted or failed on
//! command, and an [`Injector`] that fires each fault when the migration reaches
//! its trigger.
//!
//! Why over 600 lines: the connector, the acceptor and the injector that fires their
//! faults share one switchboard of stream handles; each fault class's action is a few
//! lines beside the others.
//!
//! Progress comes from three places: the engine's events (the injector is the
//! migration's [`ProgressSink`]: `Started`, `RoundFinished`, `Brownout`), the
//! control frames the source writes and reads (its end of the control stream
//! parses frame headers and messages, and hands the source a frame only after
//! the injector has seen it, so a fault can drop, hold or garble exactly that
//! frame), and the bytes the source writes on its page streams.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::ledger::Ledger;
use super::plan::{Dir, Fault, FaultKind, Target, Trigger};
use crate::receiver::OutcomeLog;
use crate::stats::{Event, ProgressSink};
use crate::transport::tcp::TcpAcceptor;
use crate::transport::{Acceptor, Connector, Stream, TransportError};
use crate::wire::control::{SessionId, SessionOutcome};
use crate::wire::FRAME_HEADER_LEN;

/// Larger meta or data sections than these mean the bytes are not frames after
/// all (they are far above the protocol's bounds); the stream then passes bytes
/// through unparsed.
const MAX_META: usize = 1 << 20;
const MAX_DATA: usize = 128 << 20;
/// Granularity of the waits of a stalled stream.
const STALL_TICK: Duration = Duration::from_millis(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which side holds a stream end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source (opened through the connector).
    Source,
    /// The destination (taken from the acceptor).
    Dest,
}

/// What a stream carries, learned from its first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Unknown,
    Control,
    Page(u16),
    /// An outcome query, or anything else that is not part of the migration.
    Other,
}

impl Role {
    fn of_first_frame(name: &str, meta: &serde_json::Value) -> Self {
        match name {
            "hello" => Self::Control,
            "stream_hello" => meta["index"]
                .as_u64()
                .and_then(|i| u16::try_from(i).ok())
                .map_or(Self::Other, Self::Page),
            _ => Self::Other,
        }
    }
    fn is(self, t: Target) -> bool {
        match t {
            Target::Control => self == Self::Control,
            Target::Page(i) => self == Self::Page(i),
        }
    }
}

/// One end of one stream, as the injector acts on it.
struct End {
    side: Side,
    role: Mutex<Role>,
    /// Shuts the stream down from another thread; dropped with the stream (it
    /// holds a duplicate of the socket, which would keep the connection open).
    shutdown: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    cut: AtomicBool,
    failed: AtomicBool,
    stall_read: Mutex<Option<Instant>>,
    stall_write: Mutex<Option<Instant>>,
    corrupt_read: Mutex<Option<(u32, u8)>>,
    corrupt_write: Mutex<Option<(u32, u8)>>,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
}

impl std::fmt::Debug for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("End")
            .field("side", &self.side)
            .field("role", &*lock(&self.role))
            .field("cut", &self.cut.load(Ordering::Relaxed))
            .finish()
    }
}

impl End {
    fn role(&self) -> Role {
        *lock(&self.role)
    }
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        if let Some(f) = lock(&self.shutdown).as_ref() {
            f();
        }
    }
    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
    fn check(&self) -> std::io::Result<()> {
        if self.is_cut() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "fault: connection cut",
            ));
        }
        if self.failed.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "fault: injected transport error",
            ));
        }
        Ok(())
    }
    /// Wait out a stall in `slot`, but no later than `deadline` (then the
    /// stream's own timeout runs out: `WouldBlock`, as a socket reports it).
    fn wait_stall(
        &self,
        slot: &Mutex<Option<Instant>>,
        deadline: Option<Instant>,
    ) -> std::io::Result<()> {
        loop {
            let Some(until) = *lock(slot) else {
                return Ok(());
            };
            let now = Instant::now();
            if now >= until {
                *lock(slot) = None;
                return Ok(());
            }
            if self.is_cut() {
                return Ok(());
            }
            let mut wait = (until - now).min(STALL_TICK);
            if let Some(d) = deadline {
                if now >= d {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "fault: stream stalled",
                    ));
                }
                wait = wait.min(d - now);
            }
            std::thread::sleep(wait);
        }
    }
}

/// Apply a pending corruption `(skip, bit)` in `slot` to `bytes`, which are
/// about to move: returns how many of them may move in this step (up to and
/// including a flipped byte, so that exactly one byte changes).
fn corrupt(slot: &Mutex<Option<(u32, u8)>>, bytes: &mut [u8]) -> usize {
    let mut s = lock(slot);
    match *s {
        Some((skip, bit)) if (skip as usize) < bytes.len() => {
            bytes[skip as usize] ^= 1 << bit;
            *s = None;
            skip as usize + 1
        }
        Some((skip, bit)) => {
            *s = Some((skip - bytes.len() as u32, bit));
            bytes.len()
        }
        None => bytes.len(),
    }
}

/// A frame's header and message, collected before any of it moves on.
#[derive(Debug, Default)]
struct Scan {
    head: Vec<u8>,
    data_left: u64,
}

impl Scan {
    /// Bytes still needed for the header and meta; `None` if the header says
    /// this is not a frame.
    fn need(&self) -> Option<usize> {
        if self.head.len() < FRAME_HEADER_LEN {
            return Some(FRAME_HEADER_LEN - self.head.len());
        }
        let (meta, _) = lens(&self.head)?;
        Some(FRAME_HEADER_LEN + meta - self.head.len())
    }
}

/// (meta_len, data_len) of a frame header, if plausible.
fn lens(h: &[u8]) -> Option<(usize, usize)> {
    if h.len() < FRAME_HEADER_LEN || h[0..2] != *b"LM" {
        return None;
    }
    let meta = u32::from_le_bytes(h[4..8].try_into().ok()?) as usize;
    let data = u32::from_le_bytes(h[8..12].try_into().ok()?) as usize;
    (meta <= MAX_META && data <= MAX_DATA).then_some((meta, data))
}

/// The message `type` and JSON of a control frame's meta (empty name for other
/// frames).
fn message(frame: &[u8]) -> (String, serde_json::Value) {
    let Some((meta, _)) = lens(frame) else {
        return (String::new(), serde_json::Value::Null);
    };
    let end = (FRAME_HEADER_LEN + meta).min(frame.len());
    if frame[2] != 1 {
        return (String::new(), serde_json::Value::Null);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&frame[FRAME_HEADER_LEN..end]).unwrap_or_default();
    (v["type"].as_str().unwrap_or_default().to_string(), v)
}

/// A stream end wrapped for fault injection.
pub struct ChaosStream {
    inner: Box<dyn Stream>,
    end: Arc<End>,
    inj: Arc<Injector>,
    /// Frames written (source end: every frame of the control stream, the first
    /// of the others).
    w: Scan,
    /// Frames read and not yet handed on (source end of the control stream).
    r_pending: Vec<u8>,
    ready: VecDeque<u8>,
    r_eof: bool,
    /// The destination's view of the first frame (its role).
    sniff: Vec<u8>,
}

impl std::fmt::Debug for ChaosStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosStream")
            .field("end", &self.end)
            .finish()
    }
}

impl ChaosStream {
    fn new(inner: Box<dyn Stream>, side: Side, inj: Arc<Injector>) -> Self {
        let end = Arc::new(End {
            side,
            role: Mutex::new(Role::Unknown),
            shutdown: Mutex::new(Some(inner.shutdown_handle())),
            cut: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            stall_read: Mutex::new(None),
            stall_write: Mutex::new(None),
            corrupt_read: Mutex::new(None),
            corrupt_write: Mutex::new(None),
            read_timeout: Mutex::new(None),
            write_timeout: Mutex::new(inner.deadlines().write),
        });
        *lock(&end.read_timeout) = inner.deadlines().read;
        inj.register(end.clone());
        Self {
            inner,
            end,
            inj,
            w: Scan::default(),
            r_pending: Vec::new(),
            ready: VecDeque::new(),
            r_eof: false,
            sniff: Vec::new(),
        }
    }

    /// Whether writes are parsed into frames: the source's control stream, and
    /// every stream until its first frame is known.
    fn scans_writes(&self) -> bool {
        self.end.side == Side::Source && matches!(self.end.role(), Role::Unknown | Role::Control)
    }

    /// Whether reads are held until the injector has seen each frame.
    fn holds_reads(&self) -> bool {
        self.end.side == Side::Source && !matches!(self.end.role(), Role::Page(_))
    }

    fn deadline(t: &Mutex<Option<Duration>>) -> Option<Instant> {
        lock(t).map(|t| Instant::now() + t)
    }

    /// Move `bytes` on (some of them), applying stalls, errors, cuts and a
    /// pending corruption.
    fn pass_write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.end.check()?;
        let deadline = Self::deadline(&self.end.write_timeout);
        self.end.wait_stall(&self.end.stall_write, deadline)?;
        self.end.check()?;
        let n = if lock(&self.end.corrupt_write).is_some() {
            let mut copy = bytes.to_vec();
            let k = corrupt(&self.end.corrupt_write, &mut copy);
            let mut done = 0;
            while done < k {
                done += self.inner.write(&copy[done..k])?;
            }
            k
        } else {
            self.inner.write(bytes)?
        };
        if self.end.side == Side::Source && matches!(self.end.role(), Role::Page(_)) {
            self.inj.on_page_bytes(n as u64);
        }
        Ok(n)
    }

    fn pass_write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = self.pass_write(bytes)?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// The header and message of a frame the source is about to write are
    /// complete: tell the injector, then write them (or not, if it cut us).
    fn frame_written(&mut self) -> std::io::Result<()> {
        let head = std::mem::take(&mut self.w.head);
        let (name, meta) = message(&head);
        if self.end.role() == Role::Unknown {
            *lock(&self.end.role) = Role::of_first_frame(&name, &meta);
        }
        if name == "hello" {
            if let Some(s) = meta["session"]
                .as_str()
                .and_then(|s| SessionId::parse(s).ok())
            {
                self.inj.set_session(s);
            }
        }
        self.w.data_left = lens(&head).map_or(0, |(_, d)| d as u64);
        self.inj.on_frame(&self.end, Dir::SourceToDest, &name);
        self.pass_write_all(&head)
    }

    /// Move whole frames from `r_pending` to `ready`, each after the injector
    /// saw it.
    fn route(&mut self) {
        loop {
            let Some((meta, data)) = lens(&self.r_pending) else {
                if self.r_pending.len() >= FRAME_HEADER_LEN {
                    // Not frames: hand the bytes on as they are.
                    self.ready.extend(self.r_pending.drain(..));
                }
                return;
            };
            let total = FRAME_HEADER_LEN + meta + data;
            if self.r_pending.len() < total {
                return;
            }
            let frame: Vec<u8> = self.r_pending.drain(..total).collect();
            let (name, _) = message(&frame);
            self.inj.on_frame(&self.end, Dir::DestToSource, &name);
            if self.end.is_cut() {
                // Lost with the connection.
                self.r_pending.clear();
                self.r_eof = true;
                return;
            }
            self.ready.extend(frame);
        }
    }

    fn read_held(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let deadline = Self::deadline(&self.end.read_timeout);
        loop {
            if self.end.is_cut() {
                return Ok(0);
            }
            self.end.check()?;
            if !self.ready.is_empty() {
                self.end.wait_stall(&self.end.stall_read, deadline)?;
                if self.end.is_cut() {
                    return Ok(0);
                }
                self.end.check()?;
                let n = buf.len().min(self.ready.len());
                for (i, b) in self.ready.drain(..n).enumerate() {
                    buf[i] = b;
                }
                let k = corrupt(&self.end.corrupt_read, &mut buf[..n]);
                if k < n {
                    // Keep what follows the flipped byte for the next read.
                    for &b in buf[k..n].iter().rev() {
                        self.ready.push_front(b);
                    }
                }
                return Ok(k);
            }
            if self.r_eof {
                return Ok(0);
            }
            let mut tmp = [0u8; 16 * 1024];
            let n = self.inner.read(&mut tmp)?;
            if n == 0 {
                self.r_eof = true;
                self.ready.extend(self.r_pending.drain(..));
                continue;
            }
            self.r_pending.extend_from_slice(&tmp[..n]);
            self.route();
        }
    }

    fn read_through(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.end.is_cut() {
            return Ok(0);
        }
        self.end.check()?;
        let deadline = Self::deadline(&self.end.read_timeout);
        self.end.wait_stall(&self.end.stall_read, deadline)?;
        if self.end.is_cut() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if self.end.role() == Role::Unknown {
            self.sniff.extend_from_slice(&buf[..n]);
            if let Some((meta, _)) = lens(&self.sniff) {
                if self.sniff.len() >= FRAME_HEADER_LEN + meta {
                    let (name, v) = message(&self.sniff);
                    *lock(&self.end.role) = Role::of_first_frame(&name, &v);
                    self.sniff = Vec::new();
                }
            } else if self.sniff.len() >= FRAME_HEADER_LEN || n == 0 {
                *lock(&self.end.role) = Role::Other;
                self.sniff = Vec::new();
            }
        }
        Ok(n)
    }
}

impl Drop for ChaosStream {
    fn drop(&mut self) {
        lock(&self.end.shutdown).take();
    }
}

impl Read for ChaosStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.holds_reads() {
            self.read_held(buf)
        } else {
            self.read_through(buf)
        }
    }
}

impl Write for ChaosStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.end.check()?;
        let mut used = 0;
        while used < buf.len() {
            if self.w.data_left > 0 {
                let k = (self.w.data_left as usize).min(buf.len() - used);
                let n = match self.pass_write(&buf[used..used + k]) {
                    Ok(n) => n,
                    Err(e) if used == 0 => return Err(e),
                    Err(_) => return Ok(used),
                };
                used += n;
                self.w.data_left -= n as u64;
                if n < k {
                    return Ok(used);
                }
                continue;
            }
            if !self.scans_writes() {
                return match self.pass_write(&buf[used..]) {
                    Ok(n) => Ok(used + n),
                    Err(e) if used == 0 => Err(e),
                    Err(_) => Ok(used),
                };
            }
            let Some(need) = self.w.need() else {
                // Not a frame: stop parsing this stream.
                *lock(&self.end.role) = Role::Other;
                let head = std::mem::take(&mut self.w.head);
                self.pass_write_all(&head)?;
                continue;
            };
            let k = need.min(buf.len() - used);
            self.w.head.extend_from_slice(&buf[used..used + k]);
            used += k;
            if self.w.need() == Some(0) {
                self.frame_written()?;
            }
        }
        Ok(used)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.w.head.is_empty() && self.w.need() != Some(0) {
            // A partial header cannot be judged: let it go as it is.
            let head = std::mem::take(&mut self.w.head);
            self.pass_write_all(&head)?;
        }
        self.inner.flush()
    }
}

impl Stream for ChaosStream {
    crate::forward_stream!(inner: shutdown, deadlines, shutdown_handle, peer_addr);
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        *lock(&self.end.read_timeout) = t;
        self.inner.set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        *lock(&self.end.write_timeout) = t;
        self.inner.set_write_timeout(t)
    }
}

/// The source's connector: every stream it opens is a [`ChaosStream`].
#[derive(Debug)]
pub struct ChaosConnector<C> {
    inner: C,
    inj: Arc<Injector>,
}

impl<C: Connector> Connector for ChaosConnector<C> {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let s = self.inner.connect()?;
        Ok(Box::new(ChaosStream::new(
            s,
            Side::Source,
            self.inj.clone(),
        )))
    }
    fn describe(&self) -> String {
        format!("chaos({})", self.inner.describe())
    }
}

/// The destination's acceptor: accepted streams are [`ChaosStream`]s; once the
/// destination is killed it accepts nothing (the listener stays, for the
/// restarted destination).
#[derive(Debug)]
pub struct ChaosAcceptor {
    inner: Arc<TcpAcceptor>,
    inj: Arc<Injector>,
}

fn killed_error() -> TransportError {
    TransportError::Accept(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "fault: the destination was killed",
    ))
}

impl Acceptor for ChaosAcceptor {
    fn accept(&self, timeout: Duration) -> Result<Box<dyn Stream>, TransportError> {
        let until = Instant::now() + timeout;
        loop {
            if self.inj.killed() {
                return Err(killed_error());
            }
            let slice = until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            match self.inner.accept(slice) {
                Ok(s) => {
                    if self.inj.killed() {
                        s.shutdown();
                        return Err(killed_error());
                    }
                    return Ok(Box::new(ChaosStream::new(s, Side::Dest, self.inj.clone())));
                }
                Err(TransportError::Accept(e))
                    if e.kind() == std::io::ErrorKind::TimedOut && Instant::now() < until => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The destination's death, as the injector recorded it.
#[derive(Debug, Clone)]
pub struct Kill {
    /// When it died.
    pub at: Instant,
    /// When it comes back (after `at`), if it does by itself.
    pub restart_after: Option<Duration>,
    /// The outcome record a restarted destination loads: what the dead one had
    /// recorded at its death, a session still in progress loading as discarded
    /// (as `recv --outcome-log` loads its file).
    pub record: Arc<OutcomeLog>,
}

#[derive(Debug, Default)]
struct Progress {
    started: bool,
    round: u32,
    round_start: u64,
    paused: bool,
    paused_start: u64,
}

#[derive(Debug, Clone)]
struct Armed {
    fault: Fault,
    /// When it fired (ms into the run).
    fired: Option<u64>,
    /// It fired but found no stream to act on.
    idle: bool,
}

/// A fault of the plan and what became of it.
#[derive(Debug, Clone)]
pub struct FaultReport {
    /// The fault.
    pub fault: Fault,
    /// It fired and acted on the migration.
    pub fired: bool,
}

/// Fires a plan's faults when their triggers are reached.
pub struct Injector {
    start: Instant,
    faults: Mutex<Vec<Armed>>,
    progress: Mutex<Progress>,
    page_bytes: AtomicU64,
    ends: Mutex<Vec<Arc<End>>>,
    ledger: Arc<Ledger>,
    dest_log: Arc<OutcomeLog>,
    session: Mutex<Option<SessionId>>,
    killed: AtomicBool,
    kill: Mutex<Option<Kill>>,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("faults", &*lock(&self.faults))
            .field("killed", &self.killed())
            .finish()
    }
}

impl Injector {
    /// An injector of `faults`, telling `ledger` what it does; `dest_log` is the
    /// destination's outcome record (what a restart after a kill loads).
    pub fn new(faults: &[Fault], ledger: Arc<Ledger>, dest_log: Arc<OutcomeLog>) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            faults: Mutex::new(
                faults
                    .iter()
                    .map(|&fault| Armed {
                        fault,
                        fired: None,
                        idle: false,
                    })
                    .collect(),
            ),
            progress: Mutex::new(Progress::default()),
            page_bytes: AtomicU64::new(0),
            ends: Mutex::new(Vec::new()),
            ledger,
            dest_log,
            session: Mutex::new(None),
            killed: AtomicBool::new(false),
            kill: Mutex::new(None),
        })
    }

    /// The source's connector over `inner`.
    pub fn connector<C: Connector>(self: &Arc<Self>, inner: C) -> ChaosConnector<C> {
        ChaosConnector {
            inner,
            inj: self.clone(),
        }
    }

    /// The destination's acceptor over `inner`.
    pub fn acceptor(self: &Arc<Self>, inner: Arc<TcpAcceptor>) -> ChaosAcceptor {
        ChaosAcceptor {
            inner,
            inj: self.clone(),
        }
    }

    fn register(&self, end: Arc<End>) {
        let mut ends = lock(&self.ends);
        ends.retain(|e| Arc::strong_count(e) > 1 || !e.is_cut());
        ends.push(end);
    }

    fn set_session(&self, s: SessionId) {
        *lock(&self.session) = Some(s);
    }

    /// The session of the migration (from the source's `Hello`).
    pub fn session(&self) -> Option<SessionId> {
        *lock(&self.session)
    }

    /// Whether the destination was killed.
    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// The destination's death, if it died.
    pub fn kill(&self) -> Option<Kill> {
        lock(&self.kill).clone()
    }

    /// The faults and whether each fired.
    pub fn report(&self) -> Vec<FaultReport> {
        lock(&self.faults)
            .iter()
            .map(|a| FaultReport {
                fault: a.fault,
                fired: a.fired.is_some() && !a.idle,
            })
            .collect()
    }

    /// The slow restore's delay, if the plan has one (it fires now).
    pub fn restore_delay(&self) -> Option<Duration> {
        let mut delay = None;
        let ms = self.start.elapsed().as_millis() as u64;
        for a in lock(&self.faults).iter_mut() {
            if let (FaultKind::SlowRestore { delay: d }, None) = (a.fault.kind, a.fired) {
                a.fired = Some(ms);
                delay = Some(delay.unwrap_or(Duration::ZERO).max(d));
            }
        }
        if let Some(d) = delay {
            self.ledger
                .event(format!("fault fired: slow restore ({} ms)", d.as_millis()));
        }
        delay
    }

    /// Take the faults whose trigger `hit` accepts, marking them fired.
    fn take(&self, hit: impl Fn(&Trigger) -> bool) -> Vec<Fault> {
        let ms = self.start.elapsed().as_millis() as u64;
        let mut out = Vec::new();
        for a in lock(&self.faults).iter_mut() {
            if a.fired.is_none() && hit(&a.fault.trigger) {
                a.fired = Some(ms);
                out.push(a.fault);
            }
        }
        out
    }

    fn on_frame(&self, end: &End, dir: Dir, name: &str) {
        if end.side != Side::Source {
            return;
        }
        let role = end.role();
        let mut due = self.take(|t| match *t {
            Trigger::Frame {
                dir: d,
                name: n,
                stream,
            } => d == dir && n == name && role.is(stream),
            // At the latest just before `Commit`.
            Trigger::Paused { .. } => dir == Dir::SourceToDest && name == "commit",
            _ => false,
        });
        due.sort_by_key(|f| matches!(f.kind, FaultKind::DestKill { .. }));
        for f in due {
            self.fire(&f);
        }
    }

    fn on_page_bytes(&self, n: u64) {
        let total = self.page_bytes.fetch_add(n, Ordering::Relaxed) + n;
        let due = {
            let p = lock(&self.progress);
            if !p.started {
                return;
            }
            let (round, paused) = (p.round, p.paused);
            let into_round = total - p.round_start;
            let into_pause = total - p.paused_start;
            drop(p);
            self.take(|t| match *t {
                Trigger::Round { round: r, bytes } => !paused && r == round && into_round >= bytes,
                Trigger::Paused { bytes } => paused && into_pause >= bytes,
                _ => false,
            })
        };
        for f in due {
            self.fire(&f);
        }
    }

    /// The latest stream end of `side` carrying `target`.
    fn end_of(&self, side: Side, target: Target) -> Option<Arc<End>> {
        lock(&self.ends)
            .iter()
            .rev()
            .find(|e| e.side == side && e.role().is(target))
            .cloned()
    }

    fn fire(&self, f: &Fault) {
        self.ledger.event(format!("fault fired: {f}"));
        let src = self.end_of(Side::Source, f.target);
        let dst = self.end_of(Side::Dest, f.target);
        let hold = |slot: &Mutex<Option<Instant>>, d: Duration| {
            *lock(slot) = Some(Instant::now() + d);
        };
        let acted = match f.kind {
            FaultKind::StreamKill | FaultKind::ControlReset => {
                let (a, b) = match f.dir {
                    Dir::SourceToDest => (src, dst),
                    Dir::DestToSource => (dst, src),
                };
                let any = a.is_some() || b.is_some();
                for e in [a, b].into_iter().flatten() {
                    e.cut();
                }
                any
            }
            FaultKind::DestKill { restart_after } => {
                self.kill_destination(restart_after);
                true
            }
            FaultKind::SourceError => src
                .inspect(|e| e.failed.store(true, Ordering::SeqCst))
                .is_some(),
            FaultKind::Stall { hold: d, .. } => match (f.dir, f.target) {
                (Dir::SourceToDest, _) => src.inspect(|e| hold(&e.stall_write, d)).is_some(),
                (Dir::DestToSource, Target::Control) => {
                    src.inspect(|e| hold(&e.stall_read, d)).is_some()
                }
                (Dir::DestToSource, Target::Page(_)) => {
                    dst.inspect(|e| hold(&e.stall_read, d)).is_some()
                }
            },
            FaultKind::Corrupt { skip, bit } => {
                let slot = |e: &Arc<End>| match f.dir {
                    Dir::SourceToDest => *lock(&e.corrupt_write) = Some((skip, bit)),
                    Dir::DestToSource => *lock(&e.corrupt_read) = Some((skip, bit)),
                };
                src.inspect(slot).is_some()
            }
            FaultKind::SlowRestore { .. } => true,
        };
        if !acted {
            self.ledger.event(format!("fault found no stream: {f}"));
            for a in lock(&self.faults).iter_mut() {
                if a.fault == *f {
                    a.idle = true;
                }
            }
        }
    }

    /// Kill the destination: it stops running anything, every stream it holds
    /// is cut, it accepts nothing, and its outcome record is what it had written.
    pub fn kill_destination(&self, restart_after: Option<Duration>) {
        if self.killed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.ledger.dest_killed();
        for e in lock(&self.ends).iter().filter(|e| e.side == Side::Dest) {
            e.cut();
        }
        let record = Arc::new(OutcomeLog::default());
        if let Some(s) = self.session() {
            let o = match self.dest_log.get(s) {
                SessionOutcome::InProgress => SessionOutcome::Discarded,
                o => o,
            };
            if o != SessionOutcome::Unknown {
                let _ = record.record(s, o);
            }
        }
        *lock(&self.kill) = Some(Kill {
            at: Instant::now(),
            restart_after,
            record,
        });
    }
}

impl ProgressSink for Injector {
    fn on_event(&self, event: &Event) {
        let total = self.page_bytes.load(Ordering::Relaxed);
        let due = match event {
            Event::Started { .. } => {
                let mut p = lock(&self.progress);
                p.started = true;
                p.round = 0;
                p.round_start = total;
                Vec::new()
            }
            Event::RoundFinished(s) => {
                let round = s.round;
                {
                    let mut p = lock(&self.progress);
                    p.round = round + 1;
                    p.round_start = total;
                }
                // A round that ended before its byte count fires its faults now.
                self.take(|t| matches!(*t, Trigger::Round { round: r, .. } if r <= round))
            }
            Event::Brownout { .. } => {
                {
                    let mut p = lock(&self.progress);
                    p.paused = true;
                    p.paused_start = total;
                }
                self.take(|t| matches!(*t, Trigger::Paused { bytes: 0 }))
            }
            _ => Vec::new(),
        };
        for f in due {
            self.fire(&f);
        }
    }
}
