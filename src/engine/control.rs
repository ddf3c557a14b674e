//! The source's control stream after setup.
//!
//! [`ControlLink`] reads whole control frames without ever losing bytes to a read
//! timeout (partial frames stay buffered), so the engine can wait for an answer in
//! short slices and look at the cancel flag and its deadlines between them.
//! [`Heartbeat`] owns the link while rounds run: it sends `Heartbeat` every
//! interval and fails when the destination has said nothing (no heartbeat answer,
//! no message) for the peer timeout. It hands the link back at brownout.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};

use crate::transport::framed::write_frame;
use crate::transport::{Stream, TransportError};
use crate::wire::{ControlMsg, FrameHeader, FrameKind, FRAME_HEADER_LEN};

/// A control stream read in bounded slices.
#[derive(Debug)]
pub struct ControlLink {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    /// The read timeout currently set on the stream.
    timeout: Option<Duration>,
}

fn io(e: std::io::Error) -> TransportError {
    TransportError::Io {
        what: "control",
        source: e,
    }
}

fn wire(e: crate::wire::WireError) -> TransportError {
    TransportError::Wire {
        what: "control",
        source: e,
    }
}

impl ControlLink {
    /// Wrap the control stream (nothing buffered yet).
    pub fn new(stream: Box<dyn Stream>) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            scratch: vec![0u8; 64 * 1024],
            timeout: None,
        }
    }

    /// The stream (to shut it down from elsewhere).
    pub fn stream(&self) -> &dyn Stream {
        &*self.stream
    }

    /// Send a control message with an attachment.
    pub fn send(&mut self, msg: &ControlMsg, attachment: &[u8]) -> Result<(), TransportError> {
        write_frame(
            &mut *self.stream,
            FrameKind::Control,
            0,
            &msg.encode(),
            &[attachment],
        )
        .map(|_| ())
        .map_err(io)
    }

    /// A complete frame from the buffer, if there is one.
    fn take_frame(&mut self) -> Result<Option<(ControlMsg, Vec<u8>)>, TransportError> {
        if self.buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let mut hb = [0u8; FRAME_HEADER_LEN];
        hb.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
        let h = FrameHeader::decode(&hb).map_err(wire)?;
        if h.kind != FrameKind::Control {
            return Err(wire(crate::wire::WireError::Invalid(
                "expected a control frame",
            )));
        }
        let (m, d) = (h.meta_len as usize, h.data_len as usize);
        let end = FRAME_HEADER_LEN + m + d;
        if self.buf.len() < end {
            return Ok(None);
        }
        let meta = &self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + m];
        let data = &self.buf[FRAME_HEADER_LEN + m..end];
        h.verify(meta, data).map_err(wire)?;
        let msg = ControlMsg::decode(meta).map_err(wire)?;
        let data = data.to_vec();
        self.buf.drain(..end);
        Ok(Some((msg, data)))
    }

    /// The next control frame, waiting at most about `wait` (Ok(None): nothing
    /// complete arrived in time; any bytes read stay buffered).
    pub fn poll(
        &mut self,
        wait: Duration,
    ) -> Result<Option<(ControlMsg, Vec<u8>)>, TransportError> {
        if let Some(f) = self.take_frame()? {
            return Ok(Some(f));
        }
        let wait = wait.max(Duration::from_millis(1));
        if self.timeout != Some(wait) {
            self.stream.set_read_timeout(Some(wait)).map_err(io)?;
            self.timeout = Some(wait);
        }
        self.read_some()
    }

    /// One read into the buffer, then a complete frame if there is one now. A
    /// read timeout (the wait ran out) is not an error.
    fn read_some(&mut self) -> Result<Option<(ControlMsg, Vec<u8>)>, TransportError> {
        match self.stream.read(&mut self.scratch) {
            Ok(0) => Err(TransportError::Closed("control")),
            Ok(n) => {
                self.buf.extend_from_slice(&self.scratch[..n]);
                self.take_frame()
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Like [`poll`](Self::poll), but also returns (`Ok(None)`) as soon as `wake`
    /// turns readable. While the stream has a wait descriptor (nothing buffered
    /// above the socket) both are watched with one `poll(2)`, which sleeps exactly
    /// `wait` or until either is ready; otherwise it is `poll` in slices of
    /// `slice` (the kernel's tick bounds how fast those notice `wake`).
    pub fn poll_or_wake(
        &mut self,
        wait: Duration,
        wake: BorrowedFd<'_>,
        slice: Duration,
    ) -> Result<Option<(ControlMsg, Vec<u8>)>, TransportError> {
        if let Some(f) = self.take_frame()? {
            return Ok(Some(f));
        }
        let readable = match self.stream.wait_fd() {
            None => return self.poll(wait.min(slice)),
            Some(fd) => {
                let ts = Timespec {
                    tv_sec: wait.as_secs().min(i64::MAX as u64) as i64,
                    tv_nsec: wait.subsec_nanos().into(),
                };
                let mut p = [
                    PollFd::new(&fd, PollFlags::IN),
                    PollFd::new(&wake, PollFlags::IN),
                ];
                match rustix::event::poll(&mut p, Some(&ts)) {
                    Ok(_) => !p[0].revents().is_empty(),
                    Err(rustix::io::Errno::INTR) => false,
                    Err(e) => return Err(io(e.into())),
                }
            }
        };
        if !readable {
            return Ok(None);
        }
        // Data, end of stream or an error is waiting, so the read returns at once,
        // unless a stream that decodes records (TLS) got only part of one: then it
        // waits for the rest, at most one slice, and the bytes stay buffered.
        let slice = slice.max(Duration::from_millis(1));
        if self.timeout != Some(slice) {
            self.stream.set_read_timeout(Some(slice)).map_err(io)?;
            self.timeout = Some(slice);
        }
        self.read_some()
    }
}

/// Why the heartbeat stopped the migration.
#[derive(Debug)]
pub enum LinkFailure {
    /// The destination said nothing for this long.
    Silent(Duration),
    /// Reading or writing the control stream failed.
    Transport(TransportError),
    /// The destination sent a message that is not a heartbeat (an `Error` or a
    /// protocol violation): the message.
    Unexpected(ControlMsg),
}

/// The heartbeat thread: owns the control link while rounds run.
#[derive(Debug)]
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    /// An eventfd that `stop` writes to wake the thread out of its wait at once
    /// (`None` if the system gave none: the thread then reads in slices).
    wake: Option<Arc<OwnedFd>>,
    failed: Arc<Mutex<Option<LinkFailure>>>,
    handle: JoinHandle<ControlLink>,
}

/// How long one read waits while the heartbeat thread runs on a stream that has no
/// wait descriptor right now ([`Stream::wait_fd`]: a TLS stream holding decrypted
/// bytes, a wrapper): also its reaction time to `stop`, which the kernel rounds up
/// to its tick (up to 4 ms at `HZ=250`). Not inside the downtime, but the VM runs
/// on while the round loop waits for the link back before the drain, and what it
/// dirties then is in the final set: with 10 ms slices a guest dirtying 400 MB/s
/// added ~1,400 pages (2-3 ms of downtime) to sets of a few dozen. With a wait
/// descriptor (TCP, Unix, TLS with nothing buffered) the thread does not poll in
/// slices: it sleeps until the next heartbeat or a frame, and `stop` wakes it
/// through an eventfd.
const SLICE: Duration = Duration::from_millis(1);

impl Heartbeat {
    /// Start sending `Heartbeat` every `interval` on `link`; fail after `silence`
    /// without a word from the destination.
    pub fn start(mut link: ControlLink, interval: Duration, silence: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        let wake = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .ok()
            .map(Arc::new);
        let (s2, f2, w2) = (stop.clone(), failed.clone(), wake.clone());
        let handle = std::thread::Builder::new()
            .name("livemig-heartbeat".into())
            .spawn(move || {
                let mut seq = 0u64;
                let mut next = Instant::now() + interval;
                let mut heard = Instant::now();
                let fail = |f: LinkFailure| {
                    *f2.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
                };
                while !s2.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now >= next {
                        seq += 1;
                        if let Err(e) = link.send(&ControlMsg::Heartbeat { seq }, &[]) {
                            fail(LinkFailure::Transport(e));
                            break;
                        }
                        next = now + interval;
                    }
                    // Until the next heartbeat is due, a frame arrives or `stop`.
                    let until_next = next
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_micros(100));
                    let got = match &w2 {
                        Some(w) => link.poll_or_wake(until_next, w.as_fd(), SLICE),
                        None => link.poll(SLICE),
                    };
                    match got {
                        Ok(None) => {}
                        Ok(Some((ControlMsg::Heartbeat { .. }, _))) => heard = Instant::now(),
                        Ok(Some((other, _))) => {
                            fail(LinkFailure::Unexpected(other));
                            break;
                        }
                        Err(e) => {
                            fail(LinkFailure::Transport(e));
                            break;
                        }
                    }
                    // Counted from the last heartbeat the destination should have
                    // answered: at least `silence` passes after it stopped.
                    if heard.elapsed() > silence + interval {
                        fail(LinkFailure::Silent(silence));
                        break;
                    }
                }
                link
            })
            .expect("spawn heartbeat thread");
        Self {
            stop,
            wake,
            failed,
            handle,
        }
    }

    /// Whether the link failed (the round loop then stops).
    pub fn has_failed(&self) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Stop the thread and take the link back, with the failure if there was one.
    pub fn stop(self) -> (Option<ControlLink>, Option<LinkFailure>) {
        self.stop.store(true, Ordering::Release);
        // A full counter (it never is: one write per heartbeat) only means the
        // thread is already awake.
        if let Some(w) = &self.wake {
            let _ = rustix::io::write(&**w, &1u64.to_ne_bytes());
        }
        let link = self.handle.join().ok();
        let f = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take();
        (link, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::framed::FrameReader;
    use crate::transport::mem;

    /// One control frame carrying `msg` and `attachment`, as bytes.
    fn control_frame(msg: &ControlMsg, attachment: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        write_frame(
            &mut frame,
            FrameKind::Control,
            0,
            &msg.encode(),
            &[attachment],
        )
        .unwrap();
        frame
    }

    #[test]
    fn a_read_timeout_never_loses_part_of_a_frame() {
        let (a, b) = mem::duplex();
        let mut link = ControlLink::new(Box::new(a));
        let msg = ControlMsg::Heartbeat { seq: 7 };
        let frame = control_frame(&msg, b"xyz");
        let mut peer = b;
        use std::io::Write;
        peer.write_all(&frame[..5]).unwrap();
        assert!(link.poll(Duration::from_millis(20)).unwrap().is_none());
        assert!(link.poll(Duration::from_millis(20)).unwrap().is_none());
        peer.write_all(&frame[5..]).unwrap();
        let (got, att) = link
            .poll(Duration::from_millis(500))
            .unwrap()
            .expect("frame");
        assert_eq!(got, msg);
        assert_eq!(att, b"xyz");
    }

    #[test]
    fn heartbeat_fails_on_silence_and_hands_the_link_back() {
        let (a, b) = mem::duplex();
        let hb = Heartbeat::start(
            ControlLink::new(Box::new(a)),
            Duration::from_millis(10),
            Duration::from_millis(100),
        );
        // The peer reads heartbeats but never answers.
        b.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
        let mut peer = FrameReader::new(Box::new(b), "control");
        let t = Instant::now();
        let mut beats = 0;
        while !hb.has_failed() {
            assert!(t.elapsed() < Duration::from_secs(5), "silence not detected");
            if let Ok((m, _)) = peer.control() {
                assert!(matches!(m, ControlMsg::Heartbeat { .. }));
                beats += 1;
            }
        }
        assert!(beats > 1, "heartbeats were sent ({beats})");
        let (link, f) = hb.stop();
        assert!(link.is_some());
        assert!(matches!(f, Some(LinkFailure::Silent(_))), "{f:?}");
    }

    /// On a TCP link the heartbeat thread sleeps until the next heartbeat, a frame
    /// or `stop`: stopping it hands the link back without waiting for the interval,
    /// and answers that arrive meanwhile keep it alive.
    #[test]
    fn stop_wakes_a_heartbeat_sleeping_on_a_tcp_link() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        let link = ControlLink::new(Box::new(ours));
        assert!(link.stream().wait_fd().is_some());
        let interval = Duration::from_secs(30);
        let hb = Heartbeat::start(link, interval, Duration::from_secs(60));
        // A heartbeat from the peer wakes the thread, which takes it as a sign of life.
        use std::io::Write;
        (&peer)
            .write_all(&control_frame(&ControlMsg::Heartbeat { seq: 1 }, b""))
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!hb.has_failed());
        let t = Instant::now();
        let (link, failure) = hb.stop();
        let took = t.elapsed();
        assert!(failure.is_none(), "{failure:?}");
        assert!(
            took < interval / 10,
            "stop waited {took:?}, as if for the {interval:?} interval"
        );
        // The link still works after the hand-back: a frame sent now arrives whole.
        let mut link = link.expect("link handed back");
        let msg = ControlMsg::Heartbeat { seq: 2 };
        (&peer).write_all(&control_frame(&msg, b"ok")).unwrap();
        let (got, att) = link
            .poll(Duration::from_secs(5))
            .unwrap()
            .expect("frame after the hand-back");
        assert_eq!(got, msg);
        assert_eq!(att, b"ok");
    }
}
