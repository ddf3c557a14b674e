//! TCP streams, with a peer deadline and several destination addresses.
//!
//! Every stream made here carries the **peer timeout** (default
//! [`DEFAULT_PEER_TIMEOUT`]): a peer that stops reading, stops answering, or drops
//! off the network makes the next read or write fail with
//! [`TransportError::TimedOut`] within that time, instead of blocking for good.
//! Three kernel mechanisms together cover the ways a peer can fall silent:
//!
//! | peer state                          | caught by                               |
//! |-------------------------------------|-----------------------------------------|
//! | stops reading (process stopped)     | write timeout (`SO_SNDTIMEO`)            |
//! | gone while we send (link cut, drop) | `TCP_USER_TIMEOUT` on unacknowledged data |
//! | gone while we only read             | keepalive probes, bounded by the above   |
//!
//! A peer that stays connected and answers TCP but stops *writing* while we read is
//! not a transport failure (it may be thinking); the read timeout the engine and
//! receiver set per phase bounds that wait.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{sockopt, RecvAncillaryBuffer, RecvFlags};

use super::{Acceptor, Connector, Deadlines, Stream, TransportError};

/// Default peer timeout: long enough for a loaded host's scheduling hiccups and a
/// routing change, short enough that a dead peer is reported well under a minute.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(20);

impl Stream for TcpStream {
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, Shutdown::Both);
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
    fn deadlines(&self) -> Deadlines {
        Deadlines {
            read: self.read_timeout().ok().flatten(),
            write: self.write_timeout().ok().flatten(),
            peer: sockopt::tcp_user_timeout(self)
                .ok()
                .filter(|&ms| ms > 0)
                .map(|ms| Duration::from_millis(ms.into())),
        }
    }
    fn splice_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
    fn wait_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(self.as_fd())
    }
    fn peer_addr(&self) -> Option<String> {
        TcpStream::peer_addr(self).ok().map(|a| a.to_string())
    }
    fn read_payload(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<()> {
        read_payload_low_water(self, bufs)
    }
    fn shutdown_handle(&self) -> Box<dyn Fn() + Send + Sync> {
        match self.try_clone() {
            Ok(s) => Box::new(move || {
                let _ = s.shutdown(Shutdown::Both);
            }),
            Err(_) => Box::new(|| {}),
        }
    }
}

/// Payloads shorter than this are read the plain way (a wake-up per segment costs
/// little next to a few syscalls).
const LOW_WATER_MIN: usize = 64 << 10;
/// The highest receive low-water mark asked for (a page batch is at most 1 MiB).
const LOW_WATER_MAX: usize = 1 << 20;

/// Set the socket's receive low-water mark (`SO_RCVLOWAT`): the kernel wakes a
/// reader (`poll` included) only once that many bytes are queued, or the receive
/// buffer or window is nearly full, or the peer closed. rustix has no wrapper.
fn set_low_water(fd: BorrowedFd<'_>, bytes: usize) -> std::io::Result<()> {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&v`, a live c_int;
    // `fd` is a socket borrowed for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Read a long payload into `bufs` with a wake-up per payload, not per segment.
///
/// On loopback and fast links a reader blocked in `recv` is woken for every arriving
/// segment (64 KiB here), and on a virtual machine each wake-up of a thread on the
/// other CPU is an inter-processor interrupt and a VM exit. This raises the receive
/// low-water mark to the bytes still missing, waits in `poll` (which honours it),
/// and then takes what is queued with a non-blocking `recvmsg`.
///
/// It never sleeps inside `recvmsg`: there the kernel compares the mark with the
/// bytes queued *since the call started copying*, so a call that has already copied
/// part of the payload would wait for more than the peer will ever send. A poll
/// that times out with nothing queued is the read timeout (`WouldBlock`, as
/// `SO_RCVTIMEO` gives); with some bytes queued it is progress, and reading goes on.
/// The mark is set back to 1 before returning, so that headers are read as before.
fn read_payload_low_water(
    s: &mut TcpStream,
    mut bufs: &mut [IoSliceMut<'_>],
) -> std::io::Result<()> {
    use std::io::ErrorKind;
    let mut left: usize = bufs.iter().map(|b| b.len()).sum();
    if left < LOW_WATER_MIN {
        return super::framed::read_exact_vectored(s, bufs);
    }
    let timeout = s.read_timeout()?.map(|t| Timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: t.subsec_nanos().into(),
    });
    IoSliceMut::advance_slices(&mut bufs, 0);
    let fd = s.as_fd();
    let mut mark = 1usize;
    let out = (|| {
        while !bufs.is_empty() {
            let want = left.min(LOW_WATER_MAX);
            if want != mark {
                set_low_water(fd, want)?;
                mark = want;
            }
            let mut p = [PollFd::new(&fd, PollFlags::IN)];
            match rustix::event::poll(&mut p, timeout.as_ref()) {
                Ok(0) if rustix::io::ioctl_fionread(fd)? == 0 => {
                    return Err(ErrorKind::WouldBlock.into());
                }
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let mut control = RecvAncillaryBuffer::default();
            match rustix::net::recvmsg(fd, bufs, &mut control, RecvFlags::DONTWAIT) {
                Ok(m) if m.bytes == 0 => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(m) => {
                    IoSliceMut::advance_slices(&mut bufs, m.bytes);
                    left -= m.bytes;
                }
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })();
    if mark != 1 {
        let reset = set_low_water(fd, 1);
        if out.is_ok() {
            reset?;
        }
    }
    out
}

/// Keepalive schedule `(idle, interval, probes)` that declares a silent peer dead
/// within `peer` (`idle + probes × interval ≤ peer` for `peer` ≥ 2 s; the kernel
/// counts whole seconds, so below that the schedule is 1 s + 1 × 1 s and
/// `TCP_USER_TIMEOUT` = `peer` ends the connection at the first probe instead).
///
/// Half the budget is idle time (a busy migration stream is never idle, so probes
/// only run on streams that wait), the other half is split over up to 4 probes so
/// that one lost probe does not end a healthy connection.
pub fn keepalive_schedule(peer: Duration) -> (Duration, Duration, u32) {
    let total = peer.as_secs().max(2);
    let idle = (total / 2).max(1);
    let rest = total - idle;
    let probes = rest.clamp(1, 4);
    let interval = (rest / probes).max(1);
    (
        Duration::from_secs(idle),
        Duration::from_secs(interval),
        probes as u32,
    )
}

/// Put the peer deadline on a connected socket: nodelay (control messages are small
/// and latency-sensitive; page frames are large writes anyway), write timeout,
/// keepalive and `TCP_USER_TIMEOUT`. `peer` zero leaves all deadlines off.
pub fn apply_peer_timeout(s: &TcpStream, peer: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    if peer.is_zero() {
        return Ok(());
    }
    s.set_write_timeout(Some(peer))?;
    let (idle, interval, probes) = keepalive_schedule(peer);
    sockopt::set_socket_keepalive(s, true)?;
    sockopt::set_tcp_keepidle(s, idle)?;
    sockopt::set_tcp_keepintvl(s, interval)?;
    sockopt::set_tcp_keepcnt(s, probes)?;
    let ms = u32::try_from(peer.as_millis()).unwrap_or(u32::MAX).max(1);
    sockopt::set_tcp_user_timeout(s, ms)?;
    Ok(())
}

/// Connect to `addr` within `timeout`, with congestion control `congestion` (None:
/// the system's default) chosen before the handshake. Chosen after it, the switch
/// away from BBR would leave BBR's pacing on: the kernel keeps a socket's pacing
/// status once an algorithm asked for it, and on a VM every pacing timer armed is a
/// VM exit (docs/TUNING.md).
pub fn connect_with(
    addr: &SocketAddr,
    timeout: Duration,
    congestion: Option<&str>,
) -> std::io::Result<TcpStream> {
    let Some(name) = congestion else {
        return TcpStream::connect_timeout(addr, timeout);
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(*addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    set_congestion(&s, name)?;
    s.connect_timeout(&(*addr).into(), timeout)?;
    Ok(s.into())
}

/// Set the TCP congestion control of `s` to `name`; the error names the algorithm
/// and where the kernel lists those it offers.
pub fn set_congestion(s: impl AsFd, name: &str) -> std::io::Result<()> {
    sockopt::set_tcp_congestion(s, name).map_err(|e| {
        std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!(
                "TCP congestion control {name:?} is not available ({e}; the kernel offers those in /proc/sys/net/ipv4/tcp_allowed_congestion_control)"
            ),
        )
    })
}

/// The system's default TCP congestion control (`net.ipv4.tcp_congestion_control`).
pub fn default_congestion() -> Option<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Connects TCP streams to one of several addresses, in priority order (one per
/// migration network).
///
/// The first stream goes to the first address that answers; later streams go to
/// the same address while it answers, and to the others, in priority order, when it
/// stops. [`TcpConnector::active_addr`] tells which one is in use.
#[derive(Debug)]
pub struct TcpConnector {
    addrs: Vec<String>,
    peer_timeout: Duration,
    /// TCP congestion control of every stream opened (None: the system's default).
    congestion: Option<String>,
    /// Index in `addrs` of the address the last stream went to (`usize::MAX`: none yet).
    active: AtomicUsize,
}

impl Clone for TcpConnector {
    fn clone(&self) -> Self {
        Self {
            addrs: self.addrs.clone(),
            peer_timeout: self.peer_timeout,
            congestion: self.congestion.clone(),
            active: AtomicUsize::new(self.active.load(Ordering::Relaxed)),
        }
    }
}

impl TcpConnector {
    /// Connector to `addr` ("host:port").
    pub fn new(addr: impl Into<String>) -> Self {
        Self::with_addrs([addr])
    }

    /// Connector to several addresses of the same destination, in priority order.
    /// An empty list makes every `connect` fail with a clear error.
    pub fn with_addrs<S: Into<String>>(addrs: impl IntoIterator<Item = S>) -> Self {
        Self {
            addrs: addrs.into_iter().map(Into::into).collect(),
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            congestion: None,
            active: AtomicUsize::new(usize::MAX),
        }
    }

    /// Peer timeout of every stream this connector opens (see the module docs); it
    /// also bounds each connection attempt. Zero turns the deadlines off.
    pub fn peer_timeout(mut self, t: Duration) -> Self {
        self.peer_timeout = t;
        self
    }

    /// TCP congestion control algorithm of every stream this connector opens
    /// (`TCP_CONGESTION`, e.g. "cubic"); the default is the system's
    /// (`net.ipv4.tcp_congestion_control`). The sender's choice is the one that
    /// governs the page streams. An algorithm the kernel does not offer fails the
    /// connection, naming it. See docs/TUNING.md for why it matters on a VM host.
    pub fn congestion(mut self, name: Option<String>) -> Self {
        self.congestion = name.filter(|n| !n.is_empty());
        self
    }

    /// The addresses, in priority order.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The address the last stream was opened to, if any was.
    pub fn active_addr(&self) -> Option<&str> {
        self.addrs
            .get(self.active.load(Ordering::Acquire))
            .map(String::as_str)
    }

    fn connect_one(&self, addr: &str) -> std::io::Result<TcpStream> {
        let resolved: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        let limit = if self.peer_timeout.is_zero() {
            DEFAULT_PEER_TIMEOUT
        } else {
            self.peer_timeout
        };
        let mut last = None;
        for a in resolved {
            match connect_with(&a, limit, self.congestion.as_deref()) {
                Ok(s) => {
                    apply_peer_timeout(&s, self.peer_timeout)?;
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the name resolved to no address",
            )
        }))
    }
}

impl Connector for TcpConnector {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        // The address in use first, then the others in priority order.
        let active = self.active.load(Ordering::Acquire);
        let order = (active < self.addrs.len())
            .then_some(active)
            .into_iter()
            .chain((0..self.addrs.len()).filter(|&i| i != active));
        let mut failures = Vec::new();
        let mut last = None;
        for i in order {
            match self.connect_one(&self.addrs[i]) {
                Ok(s) => {
                    tracing::debug!(addr = self.addrs[i].as_str(), "connected");
                    self.active.store(i, Ordering::Release);
                    return Ok(Box::new(s));
                }
                Err(e) => {
                    tracing::debug!(addr = self.addrs[i].as_str(), error = %e, "connect failed");
                    failures.push(format!("{}: {e}", self.addrs[i]));
                    last = Some(e);
                }
            }
        }
        let source = match (last, failures.len()) {
            (Some(e), 1) => e,
            (Some(e), _) => std::io::Error::new(e.kind(), failures.join("; ")),
            (None, _) => std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no destination address given",
            ),
        };
        Err(TransportError::Connect {
            addr: self.addrs.join(","),
            source,
        })
    }
    fn describe(&self) -> String {
        format!(
            "tcp://{}",
            self.active_addr().unwrap_or(&self.addrs.join(","))
        )
    }
}

/// Accepts TCP streams on a listener; every accepted stream carries the peer
/// timeout (see the module docs).
#[derive(Debug)]
pub struct TcpAcceptor {
    listener: TcpListener,
    peer_timeout: Duration,
}

impl TcpAcceptor {
    /// Bind `addr` ("127.0.0.1:0" picks a free port).
    pub fn bind(addr: &str) -> Result<Self, TransportError> {
        let listener = TcpListener::bind(addr).map_err(TransportError::Accept)?;
        Ok(Self::from_listener(listener))
    }
    /// Wrap an existing listener.
    pub fn from_listener(listener: TcpListener) -> Self {
        Self {
            listener,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
        }
    }
    /// Peer timeout of every accepted stream; zero turns the deadlines off.
    pub fn peer_timeout(mut self, t: Duration) -> Self {
        self.peer_timeout = t;
        self
    }
    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

impl Acceptor for TcpAcceptor {
    fn accept(&self, timeout: Duration) -> Result<Box<dyn Stream>, TransportError> {
        self.listener
            .set_nonblocking(true)
            .map_err(TransportError::Accept)?;
        let (s, peer) =
            super::accept_until(timeout, self.listener.as_fd(), || self.listener.accept())?;
        tracing::debug!(%peer, "accepted");
        s.set_nonblocking(false).map_err(TransportError::Accept)?;
        apply_peer_timeout(&s, self.peer_timeout).map_err(TransportError::Accept)?;
        Ok(Box::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn keepalive_finds_a_dead_peer_within_the_peer_timeout() {
        for secs in [2u64, 3, 5, 10, 20, 30, 61, 600] {
            let (idle, interval, probes) = keepalive_schedule(Duration::from_secs(secs));
            assert!(idle >= Duration::from_secs(1) && interval >= Duration::from_secs(1));
            assert!(probes >= 1);
            let worst = idle + interval * probes;
            assert!(
                worst <= Duration::from_secs(secs),
                "peer timeout {secs} s: keepalive gives up after {worst:?}"
            );
        }
        // Sub-second and one-second budgets fall back to the kernel's minimum.
        assert_eq!(
            keepalive_schedule(Duration::from_millis(500)),
            (Duration::from_secs(1), Duration::from_secs(1), 1)
        );
    }

    fn low_water(s: &TcpStream) -> usize {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, a live c_int, and
        // the length into `len`; the descriptor is the stream's, borrowed.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        v as usize
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// A payload sent in pieces, with pauses, arrives whole and in order, in two
    /// buffers, and the low-water mark is back to 1 afterwards.
    #[test]
    fn a_long_payload_is_read_whole_under_the_low_water_mark() {
        let (mut a, mut b) = pair();
        let payload: Vec<u8> = (0..(300 << 10)).map(|i| (i * 31 % 251) as u8).collect();
        let sent = payload.clone();
        let w = std::thread::spawn(move || {
            for piece in sent.chunks(70_000) {
                a.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            a
        });
        let (mut x, mut y) = (vec![0u8; 100 << 10], vec![0u8; 200 << 10]);
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        b.read_payload(&mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)])
            .unwrap();
        assert_eq!(&x[..], &payload[..100 << 10]);
        assert_eq!(&y[..], &payload[100 << 10..]);
        assert_eq!(low_water(&b), 1);
        // The next (short) read is not held back by the mark.
        let mut a = w.join().unwrap();
        a.write_all(b"next").unwrap();
        let mut next = [0u8; 4];
        b.read_payload(&mut [IoSliceMut::new(&mut next)]).unwrap();
        assert_eq!(&next, b"next");
    }

    /// A peer that sends part of a payload and then nothing: the read fails with
    /// the read timeout once no byte came for that long; a peer that closes: EOF.
    #[test]
    fn a_stalled_or_closed_peer_ends_a_payload_read() {
        let (mut a, mut b) = pair();
        a.write_all(&[7u8; 100 << 10]).unwrap();
        b.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = vec![0u8; 200 << 10];
        let t = std::time::Instant::now();
        let e = b
            .read_payload(&mut [IoSliceMut::new(&mut buf)])
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert!(
            buf[..100 << 10].iter().all(|&v| v == 7),
            "the bytes that came were taken"
        );
        assert_eq!(low_water(&b), 1);
        let (mut a2, mut b2) = pair();
        a2.write_all(&[1u8; 90 << 10]).unwrap();
        drop(a2);
        let e = b2
            .read_payload(&mut [IoSliceMut::new(&mut buf)])
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        drop(a);
    }

    /// A connector's congestion control is on every stream it opens; an algorithm
    /// the kernel lacks fails the connection with its name in the error.
    /// A payload read waiting in `poll` ends at once when another thread shuts the
    /// stream down (cancel, abort), not at the read timeout.
    #[test]
    fn a_shutdown_ends_a_waiting_payload_read() {
        let (mut a, mut b) = pair();
        a.write_all(&[3u8; 80 << 10]).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let cut = b.shutdown_handle();
        let t = std::time::Instant::now();
        let cutter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            cut();
        });
        let mut buf = vec![0u8; 1 << 20];
        let e = b
            .read_payload(&mut [IoSliceMut::new(&mut buf)])
            .unwrap_err();
        cutter.join().unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        drop(a);
    }

    #[test]
    fn streams_carry_the_congestion_control_asked_for() {
        let acc = TcpAcceptor::bind("127.0.0.1:0").unwrap();
        let addr = acc.local_addr().unwrap().to_string();
        let c = TcpConnector::new(addr.clone()).congestion(Some("reno".into()));
        let out = c.connect().unwrap();
        let _in = acc.accept(Duration::from_secs(5)).unwrap();
        let fd = out.splice_fd().unwrap();
        assert_eq!(sockopt::tcp_congestion(fd).unwrap(), "reno");
        let bad = TcpConnector::new(addr).congestion(Some("no-such-algorithm".into()));
        let e = bad.connect().unwrap_err().to_string();
        assert!(e.contains("no-such-algorithm"), "{e}");
    }

    #[test]
    fn streams_carry_the_peer_timeout() {
        let acc = TcpAcceptor::bind("127.0.0.1:0")
            .unwrap()
            .peer_timeout(Duration::from_millis(1500));
        let addr = acc.local_addr().unwrap().to_string();
        let c = TcpConnector::new(addr).peer_timeout(Duration::from_secs(3));
        let out = c.connect().unwrap();
        let inc = acc.accept(Duration::from_secs(5)).unwrap();
        let d = out.deadlines();
        assert_eq!(d.write, Some(Duration::from_secs(3)));
        assert_eq!(d.peer, Some(Duration::from_secs(3)));
        assert_eq!(d.read, None);
        let d = inc.deadlines();
        assert_eq!(d.write, Some(Duration::from_millis(1500)));
        assert_eq!(d.peer, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn the_next_address_is_tried_when_one_refuses() {
        let acc = TcpAcceptor::bind("127.0.0.1:0").unwrap();
        let live = acc.local_addr().unwrap().to_string();
        // A port that was just free: nothing listens there, connecting is refused.
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let c = TcpConnector::with_addrs([dead.clone(), live.clone()]);
        assert_eq!(c.active_addr(), None);
        let _s = c.connect().expect("the live address answers");
        assert_eq!(c.active_addr(), Some(live.as_str()));
        let _t = c.connect().expect("later streams go to the same address");
        assert_eq!(c.active_addr(), Some(live.as_str()));
        assert_eq!(c.describe(), format!("tcp://{live}"));

        let none = TcpConnector::with_addrs([dead.clone()]);
        let e = none.connect().unwrap_err().to_string();
        assert!(e.contains(&dead), "{e}");
        let empty = TcpConnector::with_addrs(Vec::<String>::new());
        let e = empty.connect().unwrap_err().to_string();
        assert!(e.contains("no destination address"), "{e}");
    }
}
