//! Fault injection for tests: streams that corrupt or cut the byte flow.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// A connector that injects `fault` into one of the streams it opens.
#[derive(Debug)]
pub struct FaultyConnector<C> {
    inner: C,
    /// Connections (by index in opening order: 0 = control, 1.. = page streams)
    /// that may get the fault; the first of them to reach it takes it.
    candidates: std::ops::RangeInclusive<usize>,
    fault: Fault,
    opened: AtomicUsize,
    fired: Arc<AtomicBool>,
}

impl<C: Connector> FaultyConnector<C> {
    /// Wrap `inner`, injecting `fault` into the `nth` stream opened.
    pub fn new(inner: C, nth: usize, fault: Fault) -> Self {
        Self::among(inner, nth..=nth, fault)
    }

    /// Wrap `inner`, injecting `fault` into whichever of the first `streams` page
    /// streams (connections 1..=streams) reaches it first, and into no other.
    /// Page streams share one work queue, so how many bytes a given one carries
    /// depends on scheduling; this aims at "a page stream, N bytes in" whatever
    /// the share.
    pub fn any_page_stream(inner: C, streams: usize, fault: Fault) -> Self {
        Self::among(inner, 1..=streams, fault)
    }

    fn among(inner: C, candidates: std::ops::RangeInclusive<usize>, fault: Fault) -> Self {
        Self {
            inner,
            candidates,
            fault,
            opened: AtomicUsize::new(0),
            fired: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Set once the fault happened: a stream shorter than the fault's offset
    /// never meets it.
    pub fn fired(&self) -> Arc<AtomicBool> {
        self.fired.clone()
    }
}

impl<C: Connector> Connector for FaultyConnector<C> {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let s = self.inner.connect()?;
        if self
            .candidates
            .contains(&self.opened.fetch_add(1, Ordering::SeqCst))
        {
            Ok(Box::new(FaultyStream {
                inner: s,
                fault: Some(self.fault),
                written: 0,
                fired: self.fired.clone(),
                took: false,
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
    /// `None` once another stream took the fault (this one passes bytes on).
    fault: Option<Fault>,
    written: u64,
    /// Shared by the connector's candidate streams: the first to set it takes
    /// the fault.
    fired: Arc<AtomicBool>,
    /// This stream took the fault (a cut stays cut).
    took: bool,
}

impl FaultyStream {
    /// Whether this stream takes the fault now that it reached it (false if
    /// another stream already did; this one is then disarmed).
    fn claim(&mut self) -> bool {
        if self.took {
            return true;
        }
        let won = self
            .fired
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if !won {
            self.fault = None;
        }
        self.took = won;
        won
    }
}

impl Read for FaultyStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for FaultyStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let start = self.written;
        let n = match self.fault {
            None => self.inner.write(buf)?,
            Some(f @ (Fault::CutAfter(limit) | Fault::PanicAfter(limit))) => {
                if start >= limit && self.claim() {
                    if matches!(f, Fault::PanicAfter(_)) {
                        panic!("fault: stream panicked after {limit} bytes");
                    }
                    self.inner.shutdown();
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "fault: stream cut",
                    ));
                }
                // While armed, never past the limit in one write, so the fault
                // lands exactly there.
                let n = if self.fault.is_some() {
                    buf.len().min((limit - start) as usize)
                } else {
                    buf.len()
                };
                self.inner.write(&buf[..n])?
            }
            Some(Fault::FlipByteAt(at)) => {
                let end = start + buf.len() as u64;
                if (start..end).contains(&at) && self.claim() {
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
                    done
                } else {
                    self.inner.write(buf)?
                }
            }
        };
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Stream for FaultyStream {
    crate::forward_stream!(inner);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{mem, Acceptor};
    use std::time::Duration;

    #[test]
    fn among_page_streams_only_the_first_to_reach_the_cut_takes_it() {
        let (c, a) = mem::pair();
        let fc = FaultyConnector::any_page_stream(c, 2, Fault::CutAfter(100));
        let mut control = fc.connect().unwrap();
        let mut p1 = fc.connect().unwrap();
        let mut p2 = fc.connect().unwrap();
        let _ends: Vec<_> = (0..3)
            .map(|_| a.accept(Duration::from_secs(5)).unwrap())
            .collect();
        // The control stream is not a candidate.
        control.write_all(&[0; 300]).unwrap();
        p1.write_all(&[0; 60]).unwrap();
        // Stream 2 reaches byte 100 first: it is cut there, and stays cut.
        assert!(p2.write_all(&[0; 150]).is_err());
        assert!(p2.write_all(&[0; 1]).is_err());
        assert!(fc.fired().load(Ordering::SeqCst));
        // Stream 1 passes byte 100 unharmed.
        p1.write_all(&[0; 200]).unwrap();
    }

    #[test]
    fn the_nth_stream_is_the_only_candidate() {
        let (c, a) = mem::pair();
        let fc = FaultyConnector::new(c, 1, Fault::FlipByteAt(10));
        let mut s0 = fc.connect().unwrap();
        let mut s1 = fc.connect().unwrap();
        let mut e0 = a.accept(Duration::from_secs(5)).unwrap();
        let mut e1 = a.accept(Duration::from_secs(5)).unwrap();
        s0.write_all(&[0; 20]).unwrap();
        assert!(!fc.fired().load(Ordering::SeqCst));
        s1.write_all(&[0; 20]).unwrap();
        assert!(fc.fired().load(Ordering::SeqCst));
        let (mut b0, mut b1) = ([0u8; 20], [0u8; 20]);
        e0.read_exact(&mut b0).unwrap();
        e1.read_exact(&mut b1).unwrap();
        assert_eq!(b0, [0; 20]);
        let mut want = [0u8; 20];
        want[10] = 0x10;
        assert_eq!(b1, want);
    }
}
