//! Byte streams between source and destination: TCP, Unix socket, in-memory.
//!
//! A migration uses one **control** stream plus N **page** streams, all opened by the
//! source through a [`Connector`] and taken by the destination from an [`Acceptor`].
//! Frames (see [`crate::wire`]) are written and read by [`framed`].
//!
//! **Deadlines live here.** Every stream carries a read and a write timeout, and the
//! TCP streams made by [`tcp::TcpConnector`] / [`tcp::TcpAcceptor`] also a *peer
//! timeout* (keepalive and `TCP_USER_TIMEOUT`), so a peer that stops reading, stops
//! writing, or vanishes from the network is noticed within a bounded time. The
//! engine and the receiver then see [`TransportError::TimedOut`], never an
//! `io::Error` meaning EAGAIN.

pub mod fault;
pub mod framed;
pub mod mem;
pub mod shaped;
pub mod splice;
pub mod tcp;
pub mod tls;
pub mod unix;

use std::io::{Read, Write};
use std::time::Duration;

/// Transport failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Connecting failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Accepting failed or timed out.
    #[error("accepting a connection failed: {0}")]
    Accept(#[source] std::io::Error),
    /// The peer closed the stream early.
    #[error("the peer closed the {0} stream unexpectedly (truncated stream)")]
    Closed(&'static str),
    /// I/O error on an open stream.
    #[error("I/O error on the {what} stream: {source}")]
    Io {
        /// Which stream.
        what: &'static str,
        /// Error.
        source: std::io::Error,
    },
    /// A deadline ran out on an open stream: the peer sent nothing (reads), took
    /// nothing (writes), or stopped answering at the TCP level for `after`.
    #[error("the {what} stream timed out: no data from the peer for {} (the peer is stalled, unreachable or gone)", human(*after))]
    TimedOut {
        /// Which stream.
        what: &'static str,
        /// The deadline that ran out.
        after: Duration,
    },
    /// Malformed frame.
    #[error("malformed frame on the {what} stream: {source}")]
    Wire {
        /// Which stream.
        what: &'static str,
        /// Decoder's error.
        source: crate::wire::WireError,
    },
    /// A TLS handshake failed: the peer was not authenticated, or refused us.
    #[error("TLS handshake with {peer} failed: {source}")]
    Tls {
        /// The peer's address.
        peer: String,
        /// Why.
        source: tls::TlsError,
    },
}

impl TransportError {
    /// Whether the connection itself was lost (refused, closed, reset, or silent
    /// past a deadline), as opposed to a peer that sent something malformed or
    /// failed authentication. A session can resume after a lost connection.
    pub fn is_link_loss(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Closed(_) | Self::Io { .. } | Self::TimedOut { .. } => {
                true
            }
            Self::Accept(_) | Self::Wire { .. } | Self::Tls { .. } => false,
        }
    }
}

/// Which way bytes were moving when an I/O error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reading from the peer.
    Read,
    /// Writing to the peer.
    Write,
}

/// The deadlines in force on a stream (what a timeout error reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deadlines {
    /// Longest wait for a read to return data (`None`: forever).
    pub read: Option<Duration>,
    /// Longest wait for a write to make progress (`None`: forever).
    pub write: Option<Duration>,
    /// How long the kernel keeps a connection whose peer stopped answering
    /// (`TCP_USER_TIMEOUT`; `None` for streams without one).
    pub peer: Option<Duration>,
}

impl TransportError {
    /// Classify an I/O error of `stream` (named `what`) moving bytes in `dir`:
    /// a deadline (EAGAIN/EWOULDBLOCK from a socket timeout, ETIMEDOUT from the
    /// kernel giving up on the peer) becomes [`TransportError::TimedOut`] with the
    /// deadline that ran out, an early EOF on a read [`TransportError::Closed`], and
    /// anything else [`TransportError::Io`].
    pub fn from_io(
        what: &'static str,
        stream: &dyn Stream,
        dir: Direction,
        e: std::io::Error,
    ) -> Self {
        use std::io::ErrorKind;
        let own = |d: Deadlines| match dir {
            Direction::Read => d.read,
            Direction::Write => d.write,
        };
        let after = match e.kind() {
            ErrorKind::WouldBlock => {
                let d = stream.deadlines();
                Some(own(d).or(d.peer))
            }
            ErrorKind::TimedOut => {
                let d = stream.deadlines();
                Some(d.peer.or(own(d)))
            }
            ErrorKind::UnexpectedEof if dir == Direction::Read => return Self::Closed(what),
            _ => None,
        };
        match after {
            // A stream that reports a timeout without a deadline set still timed
            // out; the message then says "0 ms" rather than leaking EAGAIN.
            Some(after) => Self::TimedOut {
                what,
                after: after.unwrap_or_default(),
            },
            None => Self::Io { what, source: e },
        }
    }

    /// Whether this is a deadline running out ([`TransportError::TimedOut`]).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::TimedOut { .. })
    }
}

/// `20 s`, `1.5 s`, `250 ms`: a deadline as people write it.
fn human(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// A bidirectional byte stream.
pub trait Stream: Read + Write + Send + std::fmt::Debug {
    /// Shut both directions down, unblocking any reader or writer (cancel/abort).
    fn shutdown(&self);
    /// Read timeout: a read that gets no data for this long fails with a timeout
    /// (None = block forever).
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// Write timeout: a write that makes no progress for this long (the peer takes
    /// no data) fails with a timeout (None = block forever).
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// The deadlines in force, for error messages ([`TransportError::from_io`]).
    fn deadlines(&self) -> Deadlines;
    /// A handle that can shut this stream down from another thread.
    fn shutdown_handle(&self) -> Box<dyn Fn() + Send + Sync>;
    /// A socket descriptor that guest pages may be spliced into (zero-copy send),
    /// or `None` for streams that must see every byte they carry (bandwidth shaping,
    /// fault injection, in-memory pipes).
    fn splice_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// A kernel descriptor that is readable exactly when a read of this stream
    /// would not block: the stream buffers nothing of its own above it. A reader
    /// that must also react to something other than data (a stop request) waits
    /// on it with `poll`, whose timeout is as precise as the kernel's timers, rather
    /// than on the read timeout, which the kernel rounds up to its tick (4 ms at
    /// `HZ=250`). `None` while the stream holds bytes of its own above the socket
    /// (a TLS stream with decrypted bytes not yet read), and for streams that
    /// transform what they read or have no socket (replayed prefixes, fault
    /// injection, in-memory pipes).
    fn wait_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// The peer's address, for messages (`None` where the stream has none).
    fn peer_addr(&self) -> Option<String> {
        None
    }
    /// Fill all of `bufs`, failing on EOF: a frame's payload, whose length the
    /// header gave. A stream that can wait for a long payload with fewer wake-ups
    /// than one per arriving segment does so (TCP: the receive low-water mark).
    /// Wrappers keep this default, which reads through their own `Read`.
    fn read_payload(&mut self, bufs: &mut [std::io::IoSliceMut<'_>]) -> std::io::Result<()> {
        framed::read_exact_vectored(self, bufs)
    }
}

/// Writes, inside an `impl Stream for Wrapper { .. }`, the [`Stream`] methods that a
/// wrapper around another stream (the field named first, e.g. a `Box<dyn Stream>`)
/// passes through unchanged. `forward_stream!(inner)` forwards the five control
/// methods (`shutdown`, `set_read_timeout`, `set_write_timeout`, `deadlines`,
/// `shutdown_handle`) and keeps the defaults of `splice_fd` and `peer_addr`;
/// `forward_stream!(inner: shutdown, splice_fd, ..)` forwards exactly those named,
/// leaving the rest to be written by hand next to it.
#[macro_export]
macro_rules! forward_stream {
    ($inner:ident) => {
        $crate::forward_stream!(
            $inner: shutdown,
            set_read_timeout,
            set_write_timeout,
            deadlines,
            shutdown_handle
        );
    };
    ($inner:ident : $($method:ident),+ $(,)?) => {
        $($crate::forward_stream!(@one $inner $method);)+
    };
    (@one $inner:ident shutdown) => {
        fn shutdown(&self) {
            self.$inner.shutdown()
        }
    };
    (@one $inner:ident set_read_timeout) => {
        fn set_read_timeout(
            &self,
            t: ::std::option::Option<::std::time::Duration>,
        ) -> ::std::io::Result<()> {
            self.$inner.set_read_timeout(t)
        }
    };
    (@one $inner:ident set_write_timeout) => {
        fn set_write_timeout(
            &self,
            t: ::std::option::Option<::std::time::Duration>,
        ) -> ::std::io::Result<()> {
            self.$inner.set_write_timeout(t)
        }
    };
    (@one $inner:ident deadlines) => {
        fn deadlines(&self) -> $crate::transport::Deadlines {
            self.$inner.deadlines()
        }
    };
    (@one $inner:ident shutdown_handle) => {
        fn shutdown_handle(&self) -> ::std::boxed::Box<dyn Fn() + Send + Sync> {
            self.$inner.shutdown_handle()
        }
    };
    (@one $inner:ident splice_fd) => {
        fn splice_fd(&self) -> ::std::option::Option<::std::os::fd::BorrowedFd<'_>> {
            self.$inner.splice_fd()
        }
    };
    (@one $inner:ident wait_fd) => {
        fn wait_fd(&self) -> ::std::option::Option<::std::os::fd::BorrowedFd<'_>> {
            self.$inner.wait_fd()
        }
    };
    (@one $inner:ident peer_addr) => {
        fn peer_addr(&self) -> ::std::option::Option<::std::string::String> {
            self.$inner.peer_addr()
        }
    };
}

/// Opens streams to a destination (source side).
pub trait Connector: Send + Sync {
    /// Open one new stream.
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError>;
    /// Where (for messages).
    fn describe(&self) -> String;
}

/// A shared connector (e.g. one whose chosen address the caller reads afterwards,
/// while a wrapper such as TLS opens the streams through it).
impl<C: Connector + ?Sized> Connector for std::sync::Arc<C> {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        (**self).connect()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Accepts streams from a source (destination side).
pub trait Acceptor: Send + Sync {
    /// Wait up to `timeout` for the next stream.
    fn accept(&self, timeout: Duration) -> Result<Box<dyn Stream>, TransportError>;
}

/// Poll a non-blocking `try_accept` until it yields a connection or `timeout` passes
/// (shared by the TCP and Unix acceptors).
pub(crate) fn accept_until<T>(
    timeout: Duration,
    listener: std::os::fd::BorrowedFd<'_>,
    mut try_accept: impl FnMut() -> std::io::Result<T>,
) -> Result<T, TransportError> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match try_accept() {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(TransportError::Accept(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {timeout:?}"),
                    )));
                }
                // Wait for the next connection (the listener turns readable), not
                // for a fixed sleep: a connection is taken as soon as it is queued.
                // Readable yet nothing to accept (the peer already left) just
                // loops; the deadline still bounds the wait.
                let wait = left.min(Duration::from_millis(100));
                let ts = Timespec {
                    tv_sec: 0,
                    tv_nsec: wait.as_nanos().max(1) as i64,
                };
                let mut p = [PollFd::new(&listener, PollFlags::IN)];
                match rustix::event::poll(&mut p, Some(&ts)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(TransportError::Accept(e.into())),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransportError::Accept(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    #[test]
    fn deadline_errors_become_timed_out_with_the_deadline() {
        let (a, _b) = mem::duplex();
        a.set_read_timeout(Some(Duration::from_millis(250)))
            .unwrap();
        a.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let eagain = || std::io::Error::from_raw_os_error(libc::EAGAIN);
        let e = TransportError::from_io("control", &a, Direction::Read, eagain());
        assert!(
            matches!(e, TransportError::TimedOut { what: "control", after } if after == Duration::from_millis(250)),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("control stream timed out"), "{msg}");
        assert!(msg.contains("250 ms"), "{msg}");
        assert!(!msg.contains("os error"), "{msg}");
        let e = TransportError::from_io("page", &a, Direction::Write, eagain());
        assert_eq!(
            e.to_string(),
            "the page stream timed out: no data from the peer for 20 s \
             (the peer is stalled, unreachable or gone)"
        );
        assert!(e.is_timeout());
        let e = TransportError::from_io("page", &a, Direction::Write, ErrorKind::TimedOut.into());
        assert!(e.is_timeout());
        let e =
            TransportError::from_io("page", &a, Direction::Read, ErrorKind::UnexpectedEof.into());
        assert!(matches!(e, TransportError::Closed("page")), "{e:?}");
        let e = TransportError::from_io("page", &a, Direction::Write, ErrorKind::BrokenPipe.into());
        assert!(
            matches!(e, TransportError::Io { what: "page", .. }),
            "{e:?}"
        );
    }

    #[test]
    fn deadlines_read_as_people_write_them() {
        assert_eq!(human(Duration::from_secs(20)), "20 s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(human(Duration::from_millis(250)), "250 ms");
    }
}
