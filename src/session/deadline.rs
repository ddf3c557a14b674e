//! A deadline on a whole exchange, not on one read.
//!
//! A socket's read timeout restarts with every byte, so a peer that trickles one
//! byte just inside it can hold a reader forever. [`DeadlineStream`] bounds the sum:
//! while its [`Deadline`] is armed, every read may wait only for what is left until
//! the deadline, and a read after it fails with [`std::io::ErrorKind::TimedOut`].
//! Disarmed, reads pass straight through with the stream's own read timeout.

use std::io::{IoSliceMut, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::transport::Stream;

/// A deadline shared by a [`DeadlineStream`] and whoever moves it (the stream
/// itself may be owned by a frame reader by then).
#[derive(Debug, Clone, Default)]
pub struct Deadline(Arc<DeadlineState>);

#[derive(Debug, Default)]
struct DeadlineState {
    armed: AtomicBool,
    at: Mutex<Option<Instant>>,
    first_byte: OnceLock<Instant>,
}

impl Deadline {
    /// A disarmed deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads must complete by `at` from now on.
    pub fn arm(&self, at: Instant) {
        *self.0.at.lock().expect("deadline lock") = Some(at);
        self.0.armed.store(true, Ordering::Release);
    }

    /// Reads are bounded by the stream's own read timeout again.
    pub fn disarm(&self) {
        self.0.armed.store(false, Ordering::Release);
        *self.0.at.lock().expect("deadline lock") = None;
    }

    /// When the first byte was read through the stream, if one was.
    pub fn first_byte_at(&self) -> Option<Instant> {
        self.0.first_byte.get().copied()
    }

    /// The armed deadline, if any (one atomic load when disarmed).
    fn current(&self) -> Option<Instant> {
        if self.0.armed.load(Ordering::Acquire) {
            *self.0.at.lock().expect("deadline lock")
        } else {
            None
        }
    }
}

/// A stream whose reads respect a [`Deadline`]. Everything else passes through.
#[derive(Debug)]
pub struct DeadlineStream {
    inner: Box<dyn Stream>,
    deadline: Deadline,
    /// The read timeout the owner asked for, restored once the deadline is disarmed.
    base_timeout: Mutex<Option<Duration>>,
    /// The inner read timeout currently comes from the deadline.
    bounded: bool,
}

impl DeadlineStream {
    /// Wrap `inner`; `deadline` bounds its reads while armed.
    pub fn new(inner: Box<dyn Stream>, deadline: Deadline) -> Self {
        Self {
            inner,
            deadline,
            base_timeout: Mutex::new(None),
            bounded: false,
        }
    }

    /// Set the inner read timeout for the next read: what is left until the
    /// deadline, or the owner's timeout once disarmed.
    fn before_read(&mut self) -> std::io::Result<()> {
        match self.deadline.current() {
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "deadline passed",
                    ));
                }
                self.inner.set_read_timeout(Some(left))?;
                self.bounded = true;
            }
            None if self.bounded => {
                let base = *self.base_timeout.lock().expect("timeout lock");
                self.inner.set_read_timeout(base)?;
                self.bounded = false;
            }
            None => {}
        }
        Ok(())
    }

    fn after_read(&self, n: usize) {
        if n > 0 {
            let _ = self.deadline.0.first_byte.set(Instant::now());
        }
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.before_read()?;
        let n = self.inner.read(buf)?;
        self.after_read(n);
        Ok(n)
    }

    // Page streams read payloads scattered straight into guest memory.
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        self.before_read()?;
        let n = self.inner.read_vectored(bufs)?;
        self.after_read(n);
        Ok(n)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.inner.write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Stream for DeadlineStream {
    crate::forward_stream!(
        inner: shutdown,
        set_write_timeout,
        deadlines,
        shutdown_handle,
        splice_fd
    );
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        *self.base_timeout.lock().expect("timeout lock") = t;
        self.inner.set_read_timeout(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::mem::duplex;

    #[test]
    fn a_trickling_peer_cannot_outlast_the_deadline() {
        let (a, mut b) = duplex();
        let deadline = Deadline::new();
        let mut s = DeadlineStream::new(Box::new(a), deadline.clone());
        // Each byte arrives well inside a per-read timeout of 200 ms…
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // Fewer one-byte writes than the in-memory queue holds, so the writer never
        // blocks once the reader has given up.
        let writer = std::thread::spawn(move || {
            for _ in 0..24 {
                if b.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let start = Instant::now();
        deadline.arm(start + Duration::from_millis(150));
        let mut buf = [0u8; 64];
        let e = s.read_exact(&mut buf).unwrap_err();
        // …but the whole read is cut at the deadline.
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ),
            "{e:?}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(deadline.first_byte_at().is_some());
        drop(s);
        writer.join().unwrap();
    }

    #[test]
    fn disarmed_reads_pass_through_with_the_owners_timeout() {
        let (a, mut b) = duplex();
        let deadline = Deadline::new();
        let mut s = DeadlineStream::new(Box::new(a), deadline.clone());
        deadline.arm(Instant::now() - Duration::from_millis(1));
        let mut buf = [0u8; 4];
        assert_eq!(
            s.read(&mut buf).unwrap_err().kind(),
            std::io::ErrorKind::TimedOut
        );
        deadline.disarm();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        b.write_all(b"ping").unwrap();
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert!(deadline.first_byte_at().is_some());
    }
}
