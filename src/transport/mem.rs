//! In-process streams for tests: a duplex pair of bounded chunk queues.
//!
//! Writes copy into chunks of at most 256 KiB and block when 32 chunks are queued
//! (back-pressure like a socket buffer); shutting either end down wakes both. Read
//! and write timeouts behave like a socket's: a read that gets no data, or a write
//! whose chunk the peer does not take, for that long fails with `TimedOut`.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use super::{Acceptor, Connector, Deadlines, Stream, TransportError};

const CHUNK: usize = 256 * 1024;
const DEPTH: usize = 32;

/// One end of an in-memory duplex stream.
#[derive(Debug)]
pub struct MemStream {
    tx: Option<Sender<Vec<u8>>>,
    rx: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    closed: Arc<AtomicBool>,
    timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
}

/// A connected pair of in-memory streams.
pub fn duplex() -> (MemStream, MemStream) {
    let (atx, arx) = bounded(DEPTH);
    let (btx, brx) = bounded(DEPTH);
    let closed = Arc::new(AtomicBool::new(false));
    let a = MemStream {
        tx: Some(atx),
        rx: brx,
        cur: Vec::new(),
        pos: 0,
        closed: closed.clone(),
        timeout: Mutex::new(None),
        write_timeout: Mutex::new(None),
    };
    let b = MemStream {
        tx: Some(btx),
        rx: arx,
        cur: Vec::new(),
        pos: 0,
        closed,
        timeout: Mutex::new(None),
        write_timeout: Mutex::new(None),
    };
    (a, b)
}

fn broken() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "in-memory stream shut down")
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // The read timeout bounds the whole read, not one 50 ms poll of the queue
        // (polling is only how a shutdown by the peer is noticed).
        let deadline = self
            .timeout
            .lock()
            .expect("timeout lock")
            .map(|t| Instant::now() + t);
        while self.pos >= self.cur.len() {
            if self.closed.load(Ordering::Acquire) && self.rx.is_empty() {
                return Ok(0);
            }
            let wait = deadline
                .map_or(Duration::from_millis(50), |d| {
                    d.saturating_duration_since(Instant::now())
                })
                .min(Duration::from_millis(50));
            match self.rx.recv_timeout(wait) {
                Ok(chunk) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
                Err(RecvTimeoutError::Timeout) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "read timed out",
                        ));
                    }
                }
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.closed.load(Ordering::Acquire) {
            return Err(broken());
        }
        let tx = self.tx.as_ref().ok_or_else(broken)?;
        let n = buf.len().min(CHUNK);
        let mut chunk = buf[..n].to_vec();
        let deadline = self
            .write_timeout
            .lock()
            .expect("timeout lock")
            .map(|t| Instant::now() + t);
        loop {
            let wait = deadline
                .map_or(Duration::from_millis(50), |d| {
                    d.saturating_duration_since(Instant::now())
                })
                .min(Duration::from_millis(50));
            match tx.send_timeout(chunk, wait) {
                Ok(()) => return Ok(n),
                Err(crossbeam_channel::SendTimeoutError::Timeout(c)) => {
                    if self.closed.load(Ordering::Acquire) {
                        return Err(broken());
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "write timed out",
                        ));
                    }
                    chunk = c;
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return Err(broken()),
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for MemStream {
    fn drop(&mut self) {
        // Dropping the sender gives the peer EOF after it drains what is queued.
        self.tx.take();
    }
}

impl Stream for MemStream {
    fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        *self.timeout.lock().expect("timeout lock") = t;
        Ok(())
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        *self.write_timeout.lock().expect("timeout lock") = t;
        Ok(())
    }
    fn deadlines(&self) -> Deadlines {
        Deadlines {
            read: *self.timeout.lock().expect("timeout lock"),
            write: *self.write_timeout.lock().expect("timeout lock"),
            peer: None,
        }
    }
    fn shutdown_handle(&self) -> Box<dyn Fn() + Send + Sync> {
        let c = self.closed.clone();
        Box::new(move || c.store(true, Ordering::Release))
    }
}

/// Source side of an in-memory transport.
#[derive(Debug, Clone)]
pub struct MemConnector {
    tx: Sender<MemStream>,
}

/// Destination side of an in-memory transport.
#[derive(Debug)]
pub struct MemAcceptor {
    rx: Receiver<MemStream>,
}

/// A connected connector/acceptor pair.
pub fn pair() -> (MemConnector, MemAcceptor) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (MemConnector { tx }, MemAcceptor { rx })
}

impl Connector for MemConnector {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let (a, b) = duplex();
        self.tx.send(b).map_err(|_| TransportError::Connect {
            addr: "mem".into(),
            source: std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "in-memory acceptor is gone",
            ),
        })?;
        Ok(Box::new(a))
    }
    fn describe(&self) -> String {
        "mem".into()
    }
}

impl Acceptor for MemAcceptor {
    fn accept(&self, timeout: Duration) -> Result<Box<dyn Stream>, TransportError> {
        self.rx
            .recv_timeout(timeout)
            .map(|s| Box::new(s) as Box<dyn Stream>)
            .map_err(|_| {
                TransportError::Accept(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no in-memory connection",
                ))
            })
    }
}
