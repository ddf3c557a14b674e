//! Byte streams between source and destination: TCP, Unix socket, in-memory.
//!
//! A migration uses one **control** stream plus N **page** streams, all opened by the
//! source through a [`Connector`] and taken by the destination from an [`Acceptor`].
//! Frames (see [`crate::wire`]) are written and read by [`framed`].

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
    Accept(std::io::Error),
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

/// A bidirectional byte stream.
pub trait Stream: Read + Write + Send + std::fmt::Debug {
    /// Shut both directions down, unblocking any reader or writer (cancel/abort).
    fn shutdown(&self);
    /// Read timeout (None = block forever).
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// A handle that can shut this stream down from another thread.
    fn shutdown_handle(&self) -> Box<dyn Fn() + Send + Sync>;
    /// A socket descriptor that guest pages may be spliced into (zero-copy send),
    /// or `None` for streams that must see every byte they carry (bandwidth shaping,
    /// fault injection, in-memory pipes).
    fn splice_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// The peer's address, for messages (`None` where the stream has none).
    fn peer_addr(&self) -> Option<String> {
        None
    }
}

/// Opens streams to a destination (source side).
pub trait Connector: Send + Sync {
    /// Open one new stream.
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError>;
    /// Where (for messages).
    fn describe(&self) -> String;
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
    mut try_accept: impl FnMut() -> std::io::Result<T>,
) -> Result<T, TransportError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match try_accept() {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(TransportError::Accept(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {timeout:?}"),
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(TransportError::Accept(e)),
        }
    }
}
