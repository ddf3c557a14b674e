//! The destination as a service: one listener for many migrations
//! (`livemig recv --serve`), one after another and at once.
//!
//! Why over 600 lines: the listener, the opening exchange's routing (new session,
//! resume, setup restart, outcome query) and the session tasks share one state
//! (`ServiceState`) and one shutdown; the opening frame and the queue are already
//! their own modules.
//!
//! ```text
//!  listener ──accept──▶ connection task (tokio)
//!                        │ first frame, under a deadline and a 4 KiB bound
//!                        ├─ Hello ──▶ slot free? ──yes──▶ session thread: Receiver::run
//!                        │              │                   (blocking, its own threads)
//!                        │              no ──▶ FIFO queue, silent, until a slot frees
//!                        │                     or the queue deadline (then HostBusy)
//!                        ├─ StreamHello, Resume, Hello of a running session
//!                        │     ──▶ route by token ──▶ that session's acceptor
//!                        └─ anything else, silence, unknown token ──▶ dropped, reported
//! ```
//!
//! The service owns connections; the receiver owns memory. Tokio runs only the
//! accept / first-frame / routing plane on one thread. A session's receiver is the
//! ordinary blocking [`Receiver`] on a dedicated thread, fed by a
//! `route::SessionAcceptor`: a channel into which the service pushes the
//! connections routed to it, each replaying the first frame the service read
//! (`prefixed::Prefixed`). Page application stays on the receiver's blocking
//! threads, one per page stream.
//!
//! **Queueing.** At most [`ServiceConfig::max_sessions`] sessions run; later
//! hellos wait in FIFO order (tokio's semaphore is fair), and the receiver sends
//! `Welcome` when the session starts. A source gives up when an answer takes longer
//! than its reply timeout (60 s by default), so:
//! - a source that offers the `queue-notice` capability (every livemig source of
//!   this protocol) is answered `Queued` at once and again every
//!   [`ServiceConfig::queue_notice_interval`] (20 s), and waits up to
//!   [`ServiceConfig::queue_deadline`] (30 min);
//! - any other source hears nothing and is answered `Refuse(HostBusy)` after
//!   [`ServiceConfig::silent_queue_deadline`] (50 s), before its timeout fires, so it
//!   fails with a clear "host busy" rather than a timeout.
//!
//! A source that closes its connection while queued leaves the queue at once.
//!
//! **TLS.** With [`ServiceConfig::tls`], every connection first completes the mutual
//! TLS handshake (client certificate required, chained to the CA, optionally valid
//! for one name) and receives the confirmation byte, all within the opening
//! deadline, before a byte of its first frame is read. A connection that fails the
//! handshake is a refused stray, reported with the TLS reason; running sessions do
//! not notice.
//!
//! Why one file of over 600 lines: the accept loop, the FIFO queue of hellos and the
//! session threads share one runtime and its state; the first frame, routing and
//! frame replay are already in their own files.

pub mod opening;
pub(crate) mod prefixed;
pub(crate) mod route;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::receiver::{ReceiveError, Received, Receiver};
use crate::transport::framed::write_frame;
use crate::transport::tls::{TlsError, TlsStream, AUTHENTICATED};
use crate::transport::Stream;
use crate::wire::control::RefuseCode;
use crate::wire::{ControlMsg, FrameKind};
use opening::{read_opening, Opening};
use prefixed::Prefixed;
use route::{Routes, SessionAcceptor, Token};

/// Hyper-V's default number of simultaneous incoming migrations per host.
pub const DEFAULT_MAX_SESSIONS: usize = crate::receiver::limiter::DEFAULT_MAX_INCOMING;

/// How long a queued source that hears no `Queued` notices waits for a slot before
/// it is refused: 10 s below the source's default reply timeout
/// (`MigrationConfig::reply_timeout`, 60 s), so it reads a refusal, not a timeout.
pub const DEFAULT_SILENT_QUEUE_DEADLINE: Duration = Duration::from_secs(50);

/// Interval of `Queued` notices: a third of the source's default reply timeout,
/// so two notices may be lost to a slow network before the source gives up.
pub const DEFAULT_QUEUE_NOTICE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a queued source that hears `Queued` notices may wait: long enough for
/// the two migrations ahead of it to move tens of GiB each over a 1 Gbit/s link.
pub const DEFAULT_QUEUE_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// The capability a source offers when it understands `Queued` notices.
pub const QUEUE_NOTICE: &str = "queue-notice";

/// Service settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Sessions running at once; later ones queue.
    pub max_sessions: usize,
    /// Sessions waiting at once; beyond, a hello is refused at once (`HostBusy`).
    pub max_queued: usize,
    /// How long a queued source that understands `Queued` notices waits for a slot.
    pub queue_deadline: Duration,
    /// How long a queued source that does not understand them waits (see the
    /// module docs: below the source's reply timeout).
    pub silent_queue_deadline: Duration,
    /// Interval of `Queued` notices.
    pub queue_notice_interval: Duration,
    /// How long a new connection may take to deliver its first frame.
    pub opening_timeout: Duration,
    /// After a stop request, how long running sessions may take to finish before
    /// their connections are cut.
    pub drain_timeout: Duration,
    /// Stop on SIGINT or SIGTERM.
    pub stop_on_signals: bool,
    /// Peer deadline put on every connection handed to a session (see
    /// [`crate::transport::tcp`]); zero turns it off.
    pub peer_timeout: Duration,
    /// Mutual TLS on every connection ([`crate::transport::tls::server_config`]):
    /// the handshake, and the confirmation byte, complete within
    /// `opening_timeout` before the first frame is read. `None`: plaintext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_queued: 16,
            queue_deadline: DEFAULT_QUEUE_DEADLINE,
            silent_queue_deadline: DEFAULT_SILENT_QUEUE_DEADLINE,
            queue_notice_interval: DEFAULT_QUEUE_NOTICE_INTERVAL,
            opening_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(120),
            stop_on_signals: false,
            peer_timeout: crate::transport::tcp::DEFAULT_PEER_TIMEOUT,
            tls: None,
        }
    }
}

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The runtime, the listener or the signal handlers could not be set up.
    #[error("cannot start the service: {0}")]
    Start(#[source] std::io::Error),
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Memory verified, devices restored: the guest is here.
    Committed,
    /// This side refused or vetoed (the source was told why), or the host was busy.
    Refused,
    /// Anything else: transport, protocol, verification or keeping the guest failed.
    Failed,
}

/// The end of one session, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct SessionEnd {
    /// Session token.
    pub session: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Why, unless committed.
    pub error: Option<String>,
    /// Guest memory size (0 if setup did not complete).
    pub memory_bytes: u64,
    /// Bytes received on all of its streams (0 unless committed).
    pub bytes: u64,
    /// From taking its slot to its end (ms).
    pub ms: f64,
    /// Time spent queued before that (ms).
    pub waited_ms: f64,
    /// Whether the memory digest matched.
    pub verified: bool,
    /// The verified digest.
    pub digest: Option<String>,
    /// When, since the service started (ms).
    pub at_ms: f64,
}

impl SessionEnd {
    /// A session that moved nothing yet: failed unless filled in.
    fn before_start(session: String, waited_ms: f64) -> Self {
        Self {
            session,
            outcome: Outcome::Failed,
            error: None,
            memory_bytes: 0,
            bytes: 0,
            ms: 0.0,
            waited_ms,
            verified: false,
            digest: None,
            at_ms: 0.0,
        }
    }
}

/// What the service reports while it runs (`--json` prints one line per event).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServiceEvent {
    /// Accepting connections.
    Listening {
        /// Bound address.
        addr: String,
        /// Sessions that may run at once.
        max_sessions: usize,
    },
    /// A hello arrived while every slot was taken.
    Queued {
        /// Session token.
        session: String,
        /// 1 = next to run.
        position: usize,
        /// Whether the source hears `Queued` notices while it waits.
        notified: bool,
        /// When, since the service started (ms).
        at_ms: f64,
    },
    /// A session took a slot; its receiver runs.
    SessionStart {
        /// Session token.
        session: String,
        /// Page streams it asked for.
        streams: u16,
        /// Time spent queued (ms).
        waited_ms: f64,
        /// When, since the service started (ms).
        at_ms: f64,
    },
    /// A session ended.
    SessionEnd(SessionEnd),
    /// A connection that opened nothing was dropped; running sessions did not
    /// notice.
    Refused {
        /// Its address.
        peer: String,
        /// Why.
        reason: String,
        /// When, since the service started (ms).
        at_ms: f64,
    },
    /// The service stopped.
    Stopped(ServiceSummary),
}

/// Totals over the service's life.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceSummary {
    /// Sessions that ended, whatever the outcome.
    pub sessions: u64,
    /// Committed sessions.
    pub committed: u64,
    /// Refused sessions.
    pub refused: u64,
    /// Failed sessions.
    pub failed: u64,
    /// Stray connections dropped.
    pub refused_connections: u64,
    /// Sessions still running when the service gave up waiting for them.
    pub abandoned: u64,
}

/// Boxed error from a [`SessionHandler`].
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// What the embedding program decides per session.
pub trait SessionHandler: Send + Sync + 'static {
    /// The receiver for a session that is about to start (its configuration,
    /// participants, setup checks, destination memory).
    fn receiver(&self, session: &str) -> Receiver;
    /// A session committed: keep the guest (an error makes the outcome `failed`).
    fn committed(&self, session: &str, received: Received) -> Result<(), HandlerError>;
    /// Something to report.
    fn event(&self, event: &ServiceEvent);
}

/// Asks a running [`Service`] to stop (from any thread).
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<watch::Sender<bool>>);

impl StopHandle {
    /// Stop accepting new sessions; running ones finish within the drain timeout.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// The serving destination: a bound listener, ready to [`Service::run`].
#[derive(Debug)]
pub struct Service {
    listener: std::net::TcpListener,
    config: ServiceConfig,
    stop: Arc<watch::Sender<bool>>,
}

impl Service {
    /// Bind `addr` ("host:port"; port 0 picks a free one).
    pub fn bind(addr: &str, config: ServiceConfig) -> Result<Self, ServiceError> {
        let listener = std::net::TcpListener::bind(addr).map_err(|source| ServiceError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        Ok(Self {
            listener,
            config,
            stop: Arc::new(watch::channel(false).0),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that stops the service.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Serve until stopped, then let running sessions finish (up to the drain
    /// timeout). Blocks the calling thread.
    pub fn run(self, handler: Arc<dyn SessionHandler>) -> Result<ServiceSummary, ServiceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServiceError::Start)?;
        rt.block_on(self.serve(handler))
    }

    async fn serve(self, handler: Arc<dyn SessionHandler>) -> Result<ServiceSummary, ServiceError> {
        self.listener
            .set_nonblocking(true)
            .map_err(ServiceError::Start)?;
        let addr = self.listener.local_addr().map_err(ServiceError::Start)?;
        let listener =
            tokio::net::TcpListener::from_std(self.listener).map_err(ServiceError::Start)?;
        if self.config.stop_on_signals {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).map_err(ServiceError::Start)?;
            let mut int = signal(SignalKind::interrupt()).map_err(ServiceError::Start)?;
            let stop = self.stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                stop.send_replace(true);
            });
        }
        let sh = Arc::new(ServiceState {
            slots: Arc::new(Semaphore::new(self.config.max_sessions)),
            config: self.config,
            handler,
            routes: Arc::new(Routes::default()),
            stop: self.stop.subscribe(),
            active: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            ended: Notify::new(),
            t0: Instant::now(),
            counts: Counts::default(),
        });
        sh.handler.event(&ServiceEvent::Listening {
            addr: addr.to_string(),
            max_sessions: sh.config.max_sessions,
        });

        let mut stop = self.stop.subscribe();
        let mut stopping = false;
        let mut cut = false;
        let mut deadline = tokio::time::Instant::now();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((sock, peer)) => {
                        tokio::spawn(connection(sh.clone(), sock, peer));
                    }
                    Err(e) => {
                        // Out of descriptors, or a connection reset before accept:
                        // report, breathe, go on.
                        sh.stray("(unaccepted)".into(), format!("accept failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stopped(&mut stop), if !stopping => {
                    stopping = true;
                    deadline = tokio::time::Instant::now() + sh.config.drain_timeout;
                }
                _ = sh.ended.notified(), if stopping => {}
                _ = tokio::time::sleep_until(deadline), if stopping => {
                    if cut {
                        break;
                    }
                    // Running sessions overran the drain timeout: cut their
                    // connections so each receiver fails and reports.
                    sh.routes.cut_all();
                    cut = true;
                    deadline = tokio::time::Instant::now() + CUT_GRACE;
                }
            }
            if stopping && sh.active.load(Ordering::Acquire) == 0 {
                break;
            }
        }
        let mut summary = sh.counts.summary();
        summary.abandoned = sh.active.load(Ordering::Acquire) as u64;
        sh.handler.event(&ServiceEvent::Stopped(summary.clone()));
        Ok(summary)
    }
}

/// After cutting overrunning sessions' connections, how long their receivers get
/// to notice and report.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// Most page streams routed to one session: a hello asks for at most `u16::MAX`,
/// receivers take far fewer (`ReceiverConfig::max_streams`, 64 by default), and each
/// route's channel is allocated up front.
const MAX_ROUTED_STREAMS: usize = 1024;

/// How long the service tries to deliver a queue notice or a refusal.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[derive(Debug, Default)]
struct Counts {
    sessions: AtomicU64,
    committed: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    strays: AtomicU64,
}

impl Counts {
    fn summary(&self) -> ServiceSummary {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServiceSummary {
            sessions: g(&self.sessions),
            committed: g(&self.committed),
            refused: g(&self.refused),
            failed: g(&self.failed),
            refused_connections: g(&self.strays),
            abandoned: 0,
        }
    }
}

struct ServiceState {
    config: ServiceConfig,
    handler: Arc<dyn SessionHandler>,
    routes: Arc<Routes>,
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    /// Sessions queued or running (a stop waits for them).
    active: AtomicUsize,
    /// Sessions queued.
    queued: AtomicUsize,
    /// Signalled whenever a session ends.
    ended: Notify,
    t0: Instant,
    counts: Counts,
}

impl ServiceState {
    fn at_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1e3
    }

    fn stray(&self, peer: String, reason: String) {
        self.counts.strays.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            peer = peer.as_str(),
            reason = reason.as_str(),
            "stray connection dropped"
        );
        self.handler.event(&ServiceEvent::Refused {
            peer,
            reason,
            at_ms: self.at_ms(),
        });
    }

    /// Report a session's end and let a stop proceed.
    fn end(&self, mut end: SessionEnd) {
        end.at_ms = self.at_ms();
        self.counts.sessions.fetch_add(1, Ordering::Relaxed);
        match end.outcome {
            Outcome::Committed => &self.counts.committed,
            Outcome::Refused => &self.counts.refused,
            Outcome::Failed => &self.counts.failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        match (&end.outcome, &end.error) {
            (Outcome::Committed, _) => tracing::info!(
                session = end.session.as_str(),
                bytes = end.bytes,
                verified = end.verified,
                ms = end.ms,
                "session committed"
            ),
            (outcome, error) => tracing::warn!(
                session = end.session.as_str(),
                outcome = ?outcome,
                error = error.as_deref().unwrap_or(""),
                "session ended without a commit"
            ),
        }
        self.handler.event(&ServiceEvent::SessionEnd(end));
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.ended.notify_one();
    }

    /// Wait in the FIFO queue for a slot, telling the source so every
    /// `queue_notice_interval` if it understands `Queued`.
    async fn wait_for_slot(
        &self,
        sock: &mut impl Conn,
        notify: bool,
    ) -> Result<OwnedSemaphorePermit, String> {
        let deadline = if notify {
            self.config.queue_deadline
        } else {
            self.config.silent_queue_deadline
        };
        let give_up = tokio::time::sleep(deadline);
        tokio::pin!(give_up);
        let acquire = self.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        let mut stop = self.stop.clone();
        let mut notices = tokio::time::interval(self.config.queue_notice_interval);
        let mut probe = [0u8; 1];
        loop {
            tokio::select! {
                p = &mut acquire => {
                    return p.map_err(|_| "the destination is shutting down".to_string())
                }
                _ = &mut give_up => return Err(format!(
                    "this host runs {} incoming migration(s), its limit, and none \
                     finished within {deadline:?} while this one was queued; retry later",
                    self.config.max_sessions
                )),
                _ = stopped(&mut stop) => return Err("the destination is shutting down".into()),
                r = sock.read(&mut probe) => return Err(match r {
                    Ok(0) => "the source closed its connection while queued".into(),
                    Ok(_) => "the source sent data before it was welcomed".into(),
                    Err(e) => format!("the source's connection failed while queued: {e}"),
                }),
                _ = notices.tick(), if notify => {
                    let msg = ControlMsg::Queued {
                        limit: self.config.max_sessions as u32,
                        waiting: self.queued.load(Ordering::Acquire) as u32,
                    };
                    if let Err(e) = send_msg(sock, &msg).await {
                        return Err(format!("telling the source it is queued failed: {e}"));
                    }
                }
            }
        }
    }
}

/// A tokio socket as a blocking stream for a receiver thread, with the peer
/// deadline a plain `recv`'s acceptor would put on it.
fn blocking(sock: TcpStream, peer_timeout: Duration) -> std::io::Result<Box<dyn Stream>> {
    let s = sock.into_std()?;
    s.set_nonblocking(false)?;
    crate::transport::tcp::apply_peer_timeout(&s, peer_timeout)?;
    Ok(Box::new(s))
}

/// A connection as the service holds it until a session takes it: plain TCP or
/// TLS over TCP, both async, both convertible to the receiver's blocking stream.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The blocking stream a receiver thread reads, with the peer deadline set.
    fn into_blocking(self, peer_timeout: Duration) -> std::io::Result<Box<dyn Stream>>;
}

impl Conn for TcpStream {
    fn into_blocking(self, peer_timeout: Duration) -> std::io::Result<Box<dyn Stream>> {
        blocking(self, peer_timeout)
    }
}

impl Conn for tokio_rustls::server::TlsStream<TcpStream> {
    fn into_blocking(self, peer_timeout: Duration) -> std::io::Result<Box<dyn Stream>> {
        // rustls's connection holds every byte read from the socket, so nothing
        // is lost in the handover.
        let (sock, conn) = self.into_inner();
        let s = blocking(sock, peer_timeout)?;
        Ok(Box::new(TlsStream::from_established(conn, s)))
    }
}

/// The TLS server handshake, then the confirmation byte the source waits for
/// ([`AUTHENTICATED`]), within `limit`.
async fn tls_accept(
    config: Arc<rustls::ServerConfig>,
    sock: TcpStream,
    limit: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, TlsError> {
    let handshake = async {
        let mut s = tokio_rustls::TlsAcceptor::from(config).accept(sock).await?;
        s.write_all(&[AUTHENTICATED]).await?;
        s.flush().await?;
        Ok::<_, std::io::Error>(s)
    };
    match tokio::time::timeout(limit, handshake).await {
        Ok(r) => r.map_err(|e| TlsError::of_io(e, limit)),
        Err(_) => Err(TlsError::TimedOut { after: limit }),
    }
}

/// One accepted connection: the TLS handshake if configured, then its first frame.
async fn connection(sh: Arc<ServiceState>, sock: TcpStream, peer: SocketAddr) {
    let _ = sock.set_nodelay(true);
    let limit = sh.config.opening_timeout;
    match sh.config.tls.clone() {
        None => opened(sh, sock, peer, limit).await,
        Some(config) => {
            let started = Instant::now();
            match tls_accept(config, sock, limit).await {
                Ok(s) => {
                    let left = limit.saturating_sub(started.elapsed());
                    opened(sh, s, peer, left).await
                }
                Err(e) => sh.stray(peer.to_string(), format!("TLS handshake failed: {e}")),
            }
        }
    }
}

/// Read a connection's first frame within `limit`, then open a session or join one.
async fn opened(sh: Arc<ServiceState>, mut sock: impl Conn, peer: SocketAddr, limit: Duration) {
    let opening = match read_opening(&mut sock, limit).await {
        Ok(o) => o,
        Err(e) => return sh.stray(peer.to_string(), e.to_string()),
    };
    match opening {
        Opening::Resume { token, bytes } => {
            if let Err(e) = route(&sh, sock, &token, bytes) {
                sh.stray(peer.to_string(), format!("resume refused: {e}"));
            }
        }
        Opening::Stream {
            token,
            index,
            bytes,
        } => {
            if let Err(e) = route(&sh, sock, &token, bytes) {
                sh.stray(
                    peer.to_string(),
                    format!("page stream {index} refused: {e}"),
                );
            }
        }
        // A hello of a running session: its source starts the setup over
        // (docs/PROTOCOL.md, "Setup restart"); the session's receiver decides.
        Opening::Session { token, bytes, .. } if sh.routes.contains(&token) => {
            if let Err(e) = route(&sh, sock, &token, bytes) {
                sh.stray(peer.to_string(), format!("setup restart refused: {e}"));
            }
        }
        Opening::Session {
            token,
            streams,
            capabilities,
            bytes,
        } => {
            let notify = capabilities.iter().any(|c| c == QUEUE_NOTICE);
            session(sh, sock, token, streams, notify, bytes).await
        }
    }
}

/// A hello: queue for a slot, then run the session's receiver on its own thread.
/// Hand `sock`, its first frame `bytes` replayed, to the session with `token`.
fn route(sh: &ServiceState, sock: impl Conn, token: &Token, bytes: Vec<u8>) -> Result<(), String> {
    let s = sock
        .into_blocking(sh.config.peer_timeout)
        .map_err(|e| e.to_string())?;
    sh.routes
        .deliver(token, Box::new(Prefixed::new(bytes, s)))
        .map_err(|e| e.to_string())
}

async fn session(
    sh: Arc<ServiceState>,
    mut sock: impl Conn,
    token: Token,
    streams: u16,
    notify: bool,
    hello: Vec<u8>,
) {
    sh.active.fetch_add(1, Ordering::AcqRel);
    let name = token.to_string();
    let queued_at = Instant::now();
    let waited = |at: Instant| at.elapsed().as_secs_f64() * 1e3;
    let permit = if *sh.stop.borrow() {
        Err("the destination is shutting down".to_string())
    } else {
        match sh.slots.clone().try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(_) if sh.queued.load(Ordering::Acquire) >= sh.config.max_queued => Err(format!(
                "this host runs {} incoming migration(s), its limit, and {} more are queued; \
                 retry later",
                sh.config.max_sessions, sh.config.max_queued
            )),
            Err(_) => {
                let position = sh.queued.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::info!(
                    session = name.as_str(),
                    position,
                    "session queued for a slot"
                );
                sh.handler.event(&ServiceEvent::Queued {
                    session: name.clone(),
                    position,
                    notified: notify,
                    at_ms: sh.at_ms(),
                });
                let r = sh.wait_for_slot(&mut sock, notify).await;
                sh.queued.fetch_sub(1, Ordering::AcqRel);
                r
            }
        }
    };
    let waited_ms = waited(queued_at);
    let end = |outcome, error: String| SessionEnd {
        outcome,
        error: Some(error),
        ..SessionEnd::before_start(name.clone(), waited_ms)
    };
    let permit = match permit {
        Ok(p) => p,
        Err(reason) => {
            refuse(&mut sock, RefuseCode::HostBusy, &reason).await;
            return sh.end(end(Outcome::Refused, reason));
        }
    };
    if sh.routes.contains(&token) {
        let reason = "a session with this token is already running".to_string();
        refuse(&mut sock, RefuseCode::Other, &reason).await;
        return sh.end(end(Outcome::Refused, reason));
    }
    let acceptor = match sock
        .into_blocking(sh.config.peer_timeout)
        .map_err(|e| format!("cannot hand the control connection over: {e}"))
        .and_then(|s| {
            sh.routes
                .open(
                    token,
                    1 + (streams as usize).min(MAX_ROUTED_STREAMS),
                    Box::new(Prefixed::new(hello, s)),
                )
                .map_err(|e| e.to_string())
        }) {
        Ok(a) => a,
        Err(e) => return sh.end(end(Outcome::Failed, e)),
    };
    tracing::info!(
        session = name.as_str(),
        streams,
        waited_ms,
        "session started"
    );
    sh.handler.event(&ServiceEvent::SessionStart {
        session: name.clone(),
        streams,
        waited_ms,
        at_ms: sh.at_ms(),
    });
    let sh2 = sh.clone();
    let spawned = std::thread::Builder::new()
        .name("livemig-session".into())
        .spawn(move || run_session(sh2, token, acceptor, permit, waited_ms));
    if let Err(e) = spawned {
        sh.routes.close(&token);
        sh.end(end(
            Outcome::Failed,
            format!("cannot start the session's thread: {e}"),
        ));
    }
}

/// The session thread: the blocking receiver, then the report.
fn run_session(
    sh: Arc<ServiceState>,
    token: Token,
    acceptor: SessionAcceptor,
    permit: OwnedSemaphorePermit,
    waited_ms: f64,
) {
    let name = token.to_string();
    let started = Instant::now();
    let span = tracing::info_span!("service_session", session = %name);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        span.in_scope(|| sh.handler.receiver(&name).run(&acceptor))
    }));
    sh.routes.close(&token);
    drop(acceptor);
    let mut end = SessionEnd::before_start(name.clone(), waited_ms);
    match result {
        Ok(Ok(received)) => {
            let r = &received.report;
            end.memory_bytes = r.memory_bytes;
            end.bytes = r.bytes_received;
            end.verified = r.verified;
            end.digest = Some(r.digest.clone());
            match sh.handler.committed(&name, received) {
                Ok(()) => end.outcome = Outcome::Committed,
                Err(e) => end.error = Some(format!("keeping the received guest failed: {e}")),
            }
        }
        Ok(Err(e)) => {
            if matches!(e, ReceiveError::Refused { .. } | ReceiveError::Vetoed(_)) {
                end.outcome = Outcome::Refused;
            }
            end.error = Some(e.to_string());
        }
        Err(_) => end.error = Some("the session's receiver panicked".into()),
    }
    end.ms = started.elapsed().as_secs_f64() * 1e3;
    // Report before freeing the slot, so reports never show more sessions
    // running at once than the limit.
    sh.end(end);
    drop(permit);
}

/// Tell a source it is turned away (best effort: it may already be gone).
async fn refuse(sock: &mut impl Conn, code: RefuseCode, message: &str) {
    let msg = ControlMsg::Refuse {
        code,
        message: message.to_string(),
    };
    let _ = send_msg(sock, &msg).await;
}

/// Write one control message, within [`CONTROL_WRITE_TIMEOUT`].
async fn send_msg(sock: &mut impl Conn, msg: &ControlMsg) -> std::io::Result<()> {
    let mut frame = Vec::new();
    write_frame(&mut frame, FrameKind::Control, 0, &msg.encode(), &[])?;
    tokio::time::timeout(CONTROL_WRITE_TIMEOUT, sock.write_all(&frame))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the source read nothing for {CONTROL_WRITE_TIMEOUT:?}"),
            )
        })?
}
