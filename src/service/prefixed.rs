//! A stream that first replays bytes the service already read from it.
//!
//! The service reads a connection's first frame to decide where it goes; the
//! receiver then reads the same frame again, as if nobody had touched the stream.
//! That keeps [`crate::receiver::Receiver`] unaware of whether it is served.

use std::io::{IoSlice, IoSliceMut, Read, Write};

use crate::transport::Stream;

/// `prefix`, then whatever `inner` carries next. Writes go straight to `inner`.
#[derive(Debug)]
pub struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: Box<dyn Stream>,
}

impl Prefixed {
    /// Replay `prefix` before reading from `inner`.
    pub fn new(prefix: Vec<u8>, inner: Box<dyn Stream>) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }

    fn rest(&self) -> &[u8] {
        &self.prefix[self.pos..]
    }
}

impl Read for Prefixed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.rest().is_empty() {
            return self.inner.read(buf);
        }
        let n = self.rest().len().min(buf.len());
        buf[..n].copy_from_slice(&self.prefix[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        if self.rest().is_empty() {
            // The page path reads payloads straight into guest memory: keep it vectored.
            return self.inner.read_vectored(bufs);
        }
        match bufs.iter_mut().find(|b| !b.is_empty()) {
            Some(b) => self.read(b),
            None => Ok(0),
        }
    }
}

impl Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.inner.write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Stream for Prefixed {
    crate::forward_stream!(inner);
    fn splice_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        // Splicing writes around this wrapper is fine (writes are not prefixed),
        // but only once the replayed bytes are gone would reads be; the receiver
        // never splices, so say no rather than reason about it.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::mem;

    #[test]
    fn replays_the_prefix_then_reads_on() {
        let (mut a, b) = mem::duplex();
        a.write_all(b"world").unwrap();
        let mut p = Prefixed::new(b"hello ".to_vec(), Box::new(b));
        let mut got = [0u8; 11];
        p.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello world");
        // Writes are not affected by the prefix.
        p.write_all(b"back").unwrap();
        let mut back = [0u8; 4];
        a.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"back");
    }

    #[test]
    fn vectored_reads_cross_the_prefix_boundary() {
        let (mut a, b) = mem::duplex();
        a.write_all(b"cdef").unwrap();
        let mut p = Prefixed::new(b"ab".to_vec(), Box::new(b));
        let (mut x, mut y) = ([0u8; 3], [0u8; 3]);
        crate::transport::framed::read_exact_vectored(
            &mut p,
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
        )
        .unwrap();
        assert_eq!((&x, &y), (b"abc", b"def"));
    }
}
