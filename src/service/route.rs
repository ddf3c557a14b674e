//! Routing connections to sessions by token, and each session's [`Acceptor`].
//!
//! A running session has one `Route`: the channel its receiver takes streams
//! from. The service pushes a connection into it only after reading (and, with
//! TLS, authenticating) the connection's first frame and finding the session's
//! token there. The receiver never sees a socket it did not ask for.

use std::sync::Mutex;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::transport::{Acceptor, Stream, TransportError};
use crate::wire::ControlMsg;

/// What binds a connection to its session: the token in `Hello` / `StreamHello`
/// / `Resume`.
pub type Token = crate::session::SessionToken;

/// The token a hello carries (`None` for any other message).
pub fn token_of(msg: &ControlMsg) -> Option<Token> {
    match msg {
        ControlMsg::Hello { session, .. }
        | ControlMsg::StreamHello { session, .. }
        | ControlMsg::Resume { session, .. } => Some(*session),
        _ => None,
    }
}

/// Why a connection was not routed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// No running session has this token.
    #[error("no running session has its token")]
    UnknownToken,
    /// A session with this token already runs (a replayed hello).
    #[error("a session with its token is already running")]
    Duplicate,
    /// The session already holds as many connections as it can take.
    #[error("its session already has all the connections it asked for")]
    Full,
}

struct Route {
    token: Token,
    tx: Sender<Box<dyn Stream>>,
    cuts: Vec<Box<dyn Fn() + Send + Sync>>,
}

/// The running sessions' routes. Lookups compare tokens one by one (the table
/// holds at most the host's session limit), each comparison in constant time, so
/// no lookup leaks how much of a guessed token matched.
#[derive(Default)]
pub struct Routes {
    routes: Mutex<Vec<Route>>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field(
                "sessions",
                &self.routes.lock().map(|r| r.len()).unwrap_or(0),
            )
            .finish()
    }
}

impl Routes {
    /// Open a route for a new session that will take at most `capacity`
    /// connections (control plus page streams); the first one, its control
    /// stream, goes in at once.
    pub fn open(
        &self,
        token: Token,
        capacity: usize,
        control: Box<dyn Stream>,
    ) -> Result<SessionAcceptor, RouteError> {
        let mut routes = self.routes.lock().expect("routes lock");
        if routes.iter().any(|r| r.token == token) {
            return Err(RouteError::Duplicate);
        }
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        let cuts = vec![control.shutdown_handle()];
        tx.try_send(control).expect("a new channel has room");
        routes.push(Route { token, tx, cuts });
        Ok(SessionAcceptor { rx })
    }

    /// Hand `stream` to the running session with `token`.
    pub fn deliver(&self, token: &Token, stream: Box<dyn Stream>) -> Result<(), RouteError> {
        let mut routes = self.routes.lock().expect("routes lock");
        let route = routes
            .iter_mut()
            .find(|r| r.token == *token)
            .ok_or(RouteError::UnknownToken)?;
        let cut = stream.shutdown_handle();
        match route.tx.try_send(stream) {
            Ok(()) => {
                route.cuts.push(cut);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(RouteError::Full),
            // The receiver is gone: its session is ending.
            Err(TrySendError::Disconnected(_)) => Err(RouteError::UnknownToken),
        }
    }

    /// Whether a session with `token` runs.
    pub fn contains(&self, token: &Token) -> bool {
        self.routes
            .lock()
            .expect("routes lock")
            .iter()
            .any(|r| r.token == *token)
    }

    /// Forget the session with `token` (it ended).
    pub fn close(&self, token: &Token) {
        self.routes
            .lock()
            .expect("routes lock")
            .retain(|r| r.token != *token);
    }

    /// Shut down every connection handed to a running session, so each receiver
    /// fails at once (the service's drain deadline passed).
    pub fn cut_all(&self) {
        for r in self.routes.lock().expect("routes lock").iter() {
            r.cuts.iter().for_each(|c| c());
        }
    }

    /// True when no session runs.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.routes.lock().expect("routes lock").is_empty()
    }
}

/// One session's [`Acceptor`]: yields the connections routed to it, control first.
#[derive(Debug)]
pub struct SessionAcceptor {
    rx: Receiver<Box<dyn Stream>>,
}

impl Acceptor for SessionAcceptor {
    fn accept(&self, timeout: Duration) -> Result<Box<dyn Stream>, TransportError> {
        self.rx.recv_timeout(timeout).map_err(|e| {
            TransportError::Accept(match e {
                RecvTimeoutError::Timeout => std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection for this session within {timeout:?}"),
                ),
                RecvTimeoutError::Disconnected => std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the service closed this session's route",
                ),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::mem;

    fn tok(n: u8) -> Token {
        Token::from_bytes([n; 16])
    }

    fn stream() -> Box<dyn Stream> {
        Box::new(mem::duplex().0)
    }

    #[test]
    fn routes_by_token_and_refuses_strangers() {
        let routes = Routes::default();
        let acc = routes.open(tok(1), 2, stream()).unwrap();
        assert_eq!(
            routes.open(tok(1), 2, stream()).unwrap_err(),
            RouteError::Duplicate
        );
        assert_eq!(
            routes.deliver(&tok(2), stream()).unwrap_err(),
            RouteError::UnknownToken
        );
        routes.deliver(&tok(1), stream()).unwrap();
        assert_eq!(
            routes.deliver(&tok(1), stream()).unwrap_err(),
            RouteError::Full
        );
        let t = Duration::from_millis(10);
        acc.accept(t).unwrap();
        acc.accept(t).unwrap();
        assert!(acc.accept(t).is_err(), "nothing else was routed");
        routes.close(&tok(1));
        assert!(routes.is_empty());
        assert_eq!(
            routes.deliver(&tok(1), stream()).unwrap_err(),
            RouteError::UnknownToken
        );
    }
}
