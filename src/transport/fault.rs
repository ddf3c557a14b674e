//! Fault injection for tests: streams that corrupt or cut the byte flow.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Connector, Stream, TransportError};

/// What to do to the bytes written by the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip one bit of the byte at this offset of a stream's output.
    FlipByteAt(u64),
    /// Close the stream after this many bytes (truncation).
    CutAfter(u64),
    /// Panic in `write` once this many bytes were written (a buggy stream or
    /// worker: the engine must turn it into a clean failure).
    PanicAfter(u64),
}

/// A connector whose `nth` stream (0 = control, 1.. = page streams) gets `fault`.
#[derive(Debug)]
pub struct FaultyConnector<C> {
    inner: C,
    nth: usize,
    fault: Fault,
    opened: AtomicUsize,
    fired: Arc<AtomicBool>,
}

impl<C: Connector> FaultyConnector<C> {
    /// Wrap `inner`, injecting `fault` into the `nth` stream opened.
    pub fn new(inner: C, nth: usize, fault: Fault) -> Self {
        Self {
            inner,
            nth,
            fault,
            opened: AtomicUsize::new(0),
            fired: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Set once the fault happened: a stream shorter than the fault's offset
    /// never meets it (page streams share one work queue, so how many bytes each
    /// carries depends on scheduling).
    pub fn fired(&self) -> Arc<AtomicBool> {
        self.fired.clone()
    }
}

impl<C: Connector> Connector for FaultyConnector<C> {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let s = self.inner.connect()?;
        if self.opened.fetch_add(1, Ordering::SeqCst) == self.nth {
            Ok(Box::new(FaultyStream {
                inner: s,
                fault: self.fault,
                written: Arc::new(AtomicU64::new(0)),
                fired: self.fired.clone(),
            }))
        } else {
            Ok(s)
        }
    }
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }
}

/// A stream that applies a [`Fault`] to what is written through it.
#[derive(Debug)]
pub struct FaultyStream {
    inner: Box<dyn Stream>,
    fault: Fault,
    written: Arc<AtomicU64>,
    fired: Arc<AtomicBool>,
}

impl Read for FaultyStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for FaultyStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let start = self.written.load(Ordering::Relaxed);
        match self.fault {
            Fault::CutAfter(limit) => {
                if start >= limit {
                    self.fired.store(true, Ordering::SeqCst);
                    self.inner.shutdown();
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "fault: stream cut",
                    ));
                }
                let n = buf.len().min((limit - start) as usize);
                let n = self.inner.write(&buf[..n])?;
                self.written.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Fault::PanicAfter(limit) => {
                if start >= limit {
                    self.fired.store(true, Ordering::SeqCst);
                    panic!("fault: stream panicked after {limit} bytes");
                }
                let n = buf.len().min((limit - start) as usize);
                let n = self.inner.write(&buf[..n])?;
                self.written.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Fault::FlipByteAt(at) => {
                let end = start + buf.len() as u64;
                let n = if (start..end).contains(&at) {
                    // Up to and including the flipped byte, all of it, so that a
                    // short write cannot leave the original byte to go next.
                    let i = (at - start) as usize;
                    let mut copy = buf[..=i].to_vec();
                    copy[i] ^= 0x10;
                    let mut done = 0;
                    while done < copy.len() {
                        match self.inner.write(&copy[done..])? {
                            0 => return Err(std::io::ErrorKind::WriteZero.into()),
                            k => done += k,
                        }
                    }
                    self.fired.store(true, Ordering::SeqCst);
                    done
                } else {
                    self.inner.write(buf)?
                };
                self.written.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Stream for FaultyStream {
    crate::forward_stream!(inner);
}
