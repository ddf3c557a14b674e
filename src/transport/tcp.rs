//! TCP streams.

use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::{Acceptor, Connector, Stream, TransportError};

impl Stream for TcpStream {
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, Shutdown::Both);
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn splice_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
    fn peer_addr(&self) -> Option<String> {
        TcpStream::peer_addr(self).ok().map(|a| a.to_string())
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

/// Connects TCP streams to an address (nodelay on: control messages are small and
/// latency-sensitive; page frames are large writes anyway).
#[derive(Debug, Clone)]
pub struct TcpConnector {
    addr: String,
}

impl TcpConnector {
    /// Connector to `addr` ("host:port").
    pub fn new(addr: impl Into<String>) -> Self {
        Self { addr: addr.into() }
    }
}

impl Connector for TcpConnector {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let err = |e| TransportError::Connect {
            addr: self.addr.clone(),
            source: e,
        };
        let addrs: Vec<_> = self.addr.to_socket_addrs().map_err(err)?.collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(Box::new(s));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
        })))
    }
    fn describe(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

/// Accepts TCP streams on a listener.
#[derive(Debug)]
pub struct TcpAcceptor {
    listener: TcpListener,
}

impl TcpAcceptor {
    /// Bind `addr` ("127.0.0.1:0" picks a free port).
    pub fn bind(addr: &str) -> Result<Self, TransportError> {
        let listener = TcpListener::bind(addr).map_err(TransportError::Accept)?;
        Ok(Self { listener })
    }
    /// Wrap an existing listener.
    pub fn from_listener(listener: TcpListener) -> Self {
        Self { listener }
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
        let (s, _) = super::accept_until(timeout, || self.listener.accept())?;
        s.set_nonblocking(false).map_err(TransportError::Accept)?;
        let _ = s.set_nodelay(true);
        Ok(Box::new(s))
    }
}
