//! Unix-domain socket streams (same host).

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::{Acceptor, Connector, Deadlines, Stream, TransportError};

impl Stream for UnixStream {
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
    fn deadlines(&self) -> Deadlines {
        Deadlines {
            read: self.read_timeout().ok().flatten(),
            write: self.write_timeout().ok().flatten(),
            peer: None,
        }
    }
    fn shutdown_handle(&self) -> Box<dyn Fn() + Send + Sync> {
        match self.try_clone() {
            Ok(s) => Box::new(move || {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }),
            Err(_) => Box::new(|| {}),
        }
    }
    fn wait_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

/// Connects to a Unix socket path.
#[derive(Debug, Clone)]
pub struct UnixConnector {
    path: PathBuf,
}

impl UnixConnector {
    /// Connector to `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl Connector for UnixConnector {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let s = UnixStream::connect(&self.path).map_err(|e| TransportError::Connect {
            addr: self.path.display().to_string(),
            source: e,
        })?;
        Ok(Box::new(s))
    }
    fn describe(&self) -> String {
        format!("unix://{}", self.path.display())
    }
}

/// Accepts Unix-socket streams.
#[derive(Debug)]
pub struct UnixAcceptor {
    listener: UnixListener,
}

impl UnixAcceptor {
    /// Bind a new socket at `path` (removing a stale one).
    pub fn bind(path: impl Into<PathBuf>) -> Result<Self, TransportError> {
        let path = path.into();
        let _ = std::fs::remove_file(&path);
        Ok(Self {
            listener: UnixListener::bind(&path).map_err(TransportError::Accept)?,
        })
    }
}

impl Acceptor for UnixAcceptor {
    fn accept(&self, timeout: Duration) -> Result<Box<dyn Stream>, TransportError> {
        self.listener
            .set_nonblocking(true)
            .map_err(TransportError::Accept)?;
        let (s, _) =
            super::accept_until(timeout, self.listener.as_fd(), || self.listener.accept())?;
        s.set_nonblocking(false).map_err(TransportError::Accept)?;
        Ok(Box::new(s))
    }
}
