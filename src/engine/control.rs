//! The source's control stream after setup.
//!
//! [`ControlLink`] reads whole control frames without ever losing bytes to a read
//! timeout (partial frames stay buffered), so the engine can wait for an answer in
//! short slices and look at the cancel flag and its deadlines between them.
//! [`Heartbeat`] owns the link while rounds run: it sends `Heartbeat` every
//! interval and fails when the destination has said nothing (no heartbeat answer,
//! no message) for the peer timeout. It hands the link back at brownout.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    failed: Arc<Mutex<Option<LinkFailure>>>,
    handle: JoinHandle<ControlLink>,
}

/// How long one read waits while the heartbeat thread runs: also its reaction
/// time to `stop`. Not inside the downtime, but the VM runs on while the round
/// loop waits for the link back before the drain, and what it dirties then is in
/// the final set: with 10 ms slices a guest dirtying 400 MB/s added ~1,400 pages
/// (2-3 ms of downtime) to sets of a few dozen. A 1 ms slice costs ~1,000 short
/// reads a second on one thread; round 0's throughput measured the same
/// (docs/BENCHMARKS.md, 2026-12-06).
const SLICE: Duration = Duration::from_millis(1);

impl Heartbeat {
    /// Start sending `Heartbeat` every `interval` on `link`; fail after `silence`
    /// without a word from the destination.
    pub fn start(mut link: ControlLink, interval: Duration, silence: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        let (s2, f2) = (stop.clone(), failed.clone());
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
                    match link.poll(SLICE) {
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

    #[test]
    fn a_read_timeout_never_loses_part_of_a_frame() {
        let (a, b) = mem::duplex();
        let mut link = ControlLink::new(Box::new(a));
        let mut frame = Vec::new();
        let msg = ControlMsg::Heartbeat { seq: 7 };
        write_frame(&mut frame, FrameKind::Control, 0, &msg.encode(), &[b"xyz"]).unwrap();
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
}
