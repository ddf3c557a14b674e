//! Futures over the blocking engine, for VMM daemons built on tokio (feature `tokio`).
//!
//! The engine stays blocking: a migration (or a receive) runs on a dedicated OS
//! thread, as it does under the blocking API, and this module only hands its outcome
//! and its events to async code. No runtime is needed to drive the work itself; the
//! futures and the event stream use tokio's runtime-agnostic channels, so they can be
//! awaited on any executor. (A dedicated thread rather than `spawn_blocking`: a
//! migration runs for seconds to minutes, longer than tokio's blocking pool is meant
//! for, and must not queue behind other blocking tasks.)
//!
//! - [`AsyncMigration::run`] → [`MigrationFuture`]: resolves to the same
//!   `Result<MigrationReport, MigrationError>` as [`Migration::run`].
//! - [`AsyncMigration::events`] → [`Events`]: the progress events as a
//!   [`futures_core::Stream`] (also `Events::next().await`).
//! - [`receive`] → [`ReceiveFuture`]: the destination side.
//!
//! **Cancellation.** [`MigrationFuture::cancel`] (or the [`CancelToken`] from
//! [`AsyncMigration::cancel_token`]) asks the engine to stop; the future then resolves
//! to `Err(MigrationError::Cancelled)` once the source VM has been resumed and the
//! destination told. **Dropping** an unfinished `MigrationFuture` cancels the same
//! way; the thread finishes the clean-up on its own, and the [`Events`] stream (if
//! taken) ends when it has. The engine honours cancellation until the destination
//! commits; a migration past that point completes, and the VM then runs on the
//! destination. Dropping a [`ReceiveFuture`] (or [`ReceiveFuture::cancel`]) stops
//! accepting and closes every stream of the migration: the destination discards
//! what it received, and the source, seeing its streams closed, fails and resumes.
//!
//! ```no_run
//! # async fn demo(memory: std::sync::Arc<livemig::GuestMemory>) {
//! use livemig::asyncapi::AsyncMigration;
//! use livemig::engine::Migration;
//! use livemig::stats::Event;
//! use livemig::transport::tcp::TcpConnector;
//!
//! let mut migration = AsyncMigration::new(Migration::new(memory));
//! let mut events = migration.events();
//! let outcome = migration.run(TcpConnector::new("desthost:7070"));
//! tokio::spawn(async move {
//!     while let Some(event) = events.next().await {
//!         if let Event::Progress { fraction, .. } = event {
//!             println!("{:.0} %", fraction * 100.0);
//!         }
//!     }
//! });
//! match outcome.await {
//!     Ok(report) => println!("downtime {:.1} ms", report.downtime_ms),
//!     Err(e) => println!("failed, the source keeps running: {e}"),
//! }
//! # }
//! ```
//!
//! Both sides in one process over the in-memory transport:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use livemig::asyncapi::{receive, AsyncMigration};
//! use livemig::engine::Migration;
//! use livemig::receiver::Receiver;
//! use livemig::stats::Event;
//! use livemig::transport::mem;
//!
//! let memory = Arc::new(livemig::GuestMemory::anonymous(2 << 20, false)?);
//! let (connector, acceptor) = mem::pair();
//! let destination = receive(Receiver::new(), acceptor);
//! let mut migration = AsyncMigration::new(Migration::new(memory));
//! let mut events = migration.events();
//! let report = migration.run(connector).await?;
//! let received = destination.await?;
//! assert_eq!(report.session, received.report.session);
//!
//! let mut seen = Vec::new();
//! while let Some(event) = events.next().await {
//!     seen.push(event);
//! }
//! assert!(matches!(seen.first(), Some(Event::Started { .. })));
//! assert!(matches!(seen.last(), Some(Event::Completed(_))));
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::engine::{CancelToken, Migration, MigrationError};
use crate::receiver::{ReceiveError, Received, Receiver};
use crate::stats::sink::{receive_span, trace_receive_outcome, Tee, TracingSink};
use crate::stats::{Event, MigrationReport, ProgressSink};
use crate::transport::{Acceptor, Connector, Stream, TransportError};

/// Most `Progress` events queued for a slow consumer. Progress events are frequent
/// (one per 16384 pages) and each supersedes the previous one, so beyond this many
/// unread ones the newest are dropped; every other event (a handful per round) is
/// always queued. The engine never waits for the consumer.
const MAX_QUEUED_PROGRESS: usize = 256;

/// A thread's outcome: the value, or the payload of its panic (re-raised in the
/// task that awaits it, as a blocking call would have panicked in its caller).
type Outcome<T> = std::thread::Result<T>;

/// A migration to be run as a future. Wraps a configured [`Migration`].
#[derive(Debug)]
pub struct AsyncMigration {
    migration: Migration,
}

impl AsyncMigration {
    /// Wrap a configured migration (tracker, VM control, policy, participants…).
    pub fn new(migration: Migration) -> Self {
        Self { migration }
    }

    /// The migration's progress events as a stream. Events also go to any sink the
    /// migration already had. Call before [`AsyncMigration::run`]; each call gives an
    /// independent stream with every event from then on.
    pub fn events(&mut self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let sink: Arc<dyn ProgressSink> = Arc::new(ChannelSink {
            tx,
            queued_progress: queued.clone(),
        });
        self.migration.progress = Some(match self.migration.progress.take() {
            Some(existing) => Arc::new(Tee(vec![existing, sink])),
            None => sink,
        });
        Events {
            rx,
            queued_progress: queued,
        }
    }

    /// The token that cancels this migration (the migration's own, shared).
    pub fn cancel_token(&self) -> CancelToken {
        self.migration.cancel.clone()
    }

    /// Start the migration over `connector` on its own thread. Its events also go
    /// to `tracing` (a [`TracingSink`]), and the migration runs in its span.
    pub fn run<C: Connector + 'static>(self, connector: C) -> MigrationFuture {
        let cancel = self.migration.cancel.clone();
        let mut migration = self.migration;
        let tracing_sink = Arc::new(TracingSink::new());
        let span = tracing_sink.span().clone();
        let tracing_sink: Arc<dyn ProgressSink> = tracing_sink;
        migration.progress = Some(match migration.progress.take() {
            Some(existing) => Arc::new(Tee(vec![tracing_sink, existing])),
            None => tracing_sink,
        });
        let (outcome, thread) = spawn_outcome("livemig-migration", move || {
            span.in_scope(|| migration.run(&connector))
        });
        MigrationFuture {
            outcome,
            cancel,
            _thread: thread,
            done: false,
        }
    }
}

/// Run `f` on a named thread; its outcome (or panic) arrives on the receiver.
fn spawn_outcome<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> (oneshot::Receiver<Outcome<T>>, JoinHandle<()>) {
    let (tx, rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            // The awaiting side may be gone (dropped future): nothing to tell.
            let _ = tx.send(r);
        })
        .expect("spawn migration thread");
    (rx, thread)
}

/// Poll a thread's outcome channel. The thread always sends before it ends (its
/// work runs under `catch_unwind`), so a closed channel cannot happen.
fn poll_outcome<T>(rx: &mut oneshot::Receiver<Outcome<T>>, cx: &mut Context<'_>) -> Poll<T> {
    match Pin::new(rx).poll(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(Ok(v))) => Poll::Ready(v),
        Poll::Ready(Ok(Err(panic))) => std::panic::resume_unwind(panic),
        Poll::Ready(Err(_)) => unreachable!("the worker thread always reports its outcome"),
    }
}

/// A running migration; resolves to its report or error. Dropping it before it
/// resolves cancels the migration (see the [module docs](self)).
#[derive(Debug)]
#[must_use = "dropping a MigrationFuture cancels the migration"]
pub struct MigrationFuture {
    outcome: oneshot::Receiver<Outcome<Result<MigrationReport, MigrationError>>>,
    cancel: CancelToken,
    _thread: JoinHandle<()>,
    done: bool,
}

impl MigrationFuture {
    /// Ask the migration to stop; awaiting the future then yields
    /// `Err(MigrationError::Cancelled)` unless the destination had already committed.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The migration's cancel token (clone it to cancel from elsewhere).
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }
}

impl Future for MigrationFuture {
    type Output = Result<MigrationReport, MigrationError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let r = poll_outcome(&mut self.outcome, cx);
        if r.is_ready() {
            self.done = true;
        }
        r
    }
}

impl Drop for MigrationFuture {
    fn drop(&mut self) {
        if !self.done {
            // The thread resumes the source VM and tells the destination; it is not
            // joined here (that would block an async task).
            self.cancel.cancel();
        }
    }
}

/// Forwards events into an unbounded channel, dropping surplus `Progress` events.
struct ChannelSink {
    tx: mpsc::UnboundedSender<Event>,
    queued_progress: Arc<AtomicUsize>,
}

impl ProgressSink for ChannelSink {
    fn on_event(&self, event: &Event) {
        if matches!(event, Event::Progress { .. }) {
            if self.queued_progress.load(Ordering::Relaxed) >= MAX_QUEUED_PROGRESS {
                return;
            }
            self.queued_progress.fetch_add(1, Ordering::Relaxed);
        }
        // A closed stream (the consumer dropped it) is not the migration's problem.
        let _ = self.tx.send(event.clone());
    }
}

/// A migration's progress events, in order. Ends (yields `None`) once the migration
/// thread has finished, after its `Completed` or `Failed` event.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
    queued_progress: Arc<AtomicUsize>,
}

impl Events {
    /// The next event, or `None` when the migration has finished.
    pub async fn next(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let r = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(Event::Progress { .. })) = &r {
            self.queued_progress.fetch_sub(1, Ordering::Relaxed);
        }
        r
    }
}

impl futures_core::Stream for Events {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().poll_event(cx)
    }
}

/// Receive one migration with `receiver` over `acceptor`, on its own thread.
pub fn receive<A: Acceptor + 'static>(receiver: Receiver, acceptor: A) -> ReceiveFuture {
    let acceptor = Arc::new(CancellableAcceptor {
        inner: acceptor,
        cancelled: AtomicBool::new(false),
        shutdowns: Mutex::new(Vec::new()),
    });
    let handle = acceptor.clone();
    let span = receive_span();
    let (outcome, thread) = spawn_outcome("livemig-receive", move || {
        let result = span.in_scope(|| receiver.run(&*acceptor));
        trace_receive_outcome(&span, &result);
        result
    });
    ReceiveFuture {
        outcome,
        acceptor: handle,
        _thread: thread,
        done: false,
    }
}

/// A running receive; resolves to the received VM or the reason it was discarded.
/// Dropping it before it resolves discards the migration (see the
/// [module docs](self)).
#[must_use = "dropping a ReceiveFuture discards the incoming migration"]
pub struct ReceiveFuture {
    outcome: oneshot::Receiver<Outcome<Result<Received, ReceiveError>>>,
    acceptor: Arc<dyn Cancel>,
    _thread: JoinHandle<()>,
    done: bool,
}

impl std::fmt::Debug for ReceiveFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveFuture")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl ReceiveFuture {
    /// Stop accepting and close the migration's streams: the receive then fails
    /// (the destination discards everything) and the source resumes its VM.
    pub fn cancel(&self) {
        self.acceptor.cancel();
    }
}

impl Future for ReceiveFuture {
    type Output = Result<Received, ReceiveError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let r = poll_outcome(&mut self.outcome, cx);
        if r.is_ready() {
            self.done = true;
        }
        r
    }
}

impl Drop for ReceiveFuture {
    fn drop(&mut self) {
        if !self.done {
            self.acceptor.cancel();
        }
    }
}

/// Something whose work can be cut short.
trait Cancel: Send + Sync {
    fn cancel(&self);
}

/// An acceptor that can be cancelled from another thread: it stops accepting and
/// shuts down every stream it handed out, which unblocks the receiver wherever it
/// waits. Accept waits are cut into short slices so cancellation is seen promptly.
struct CancellableAcceptor<A> {
    inner: A,
    cancelled: AtomicBool,
    shutdowns: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

/// Longest single wait on the inner acceptor (how late a cancel may be noticed
/// while waiting for a connection).
const ACCEPT_SLICE: Duration = Duration::from_millis(50);

impl<A: Acceptor> CancellableAcceptor<A> {
    fn cancelled_error() -> TransportError {
        TransportError::Accept(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "receive cancelled",
        ))
    }
}

impl<A: Acceptor> Acceptor for CancellableAcceptor<A> {
    fn accept(&self, timeout: Duration) -> Result<Box<dyn Stream>, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.cancelled.load(Ordering::SeqCst) {
                return Err(Self::cancelled_error());
            }
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(ACCEPT_SLICE);
            let asked = Instant::now();
            match self.inner.accept(slice) {
                Ok(stream) => {
                    let mut shutdowns = self.shutdowns.lock().expect("shutdown list lock");
                    if self.cancelled.load(Ordering::SeqCst) {
                        stream.shutdown();
                        return Err(Self::cancelled_error());
                    }
                    shutdowns.push(stream.shutdown_handle());
                    return Ok(stream);
                }
                // The inner wait ran its whole slice: a timeout of the slice, not a
                // failure, unless the caller's own deadline has now passed. (Told
                // apart by elapsed time, whatever error type the transport uses for
                // a timeout.)
                Err(_) if asked.elapsed() >= slice && Instant::now() < deadline => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl<A: Acceptor> Cancel for CancellableAcceptor<A> {
    fn cancel(&self) {
        let shutdowns = self.shutdowns.lock().expect("shutdown list lock");
        self.cancelled.store(true, Ordering::SeqCst);
        for shutdown in shutdowns.iter() {
            shutdown();
        }
    }
}
