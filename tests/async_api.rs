//! The async API (feature `tokio`): a migration and a receive as futures over loopback
//! TCP under a running dirtier, progress events as a stream, cancellation by token
//! and by dropping either future. Every wait is bounded by [`GUARD`].
#![cfg(feature = "tokio")]

mod common;

use std::pin::Pin;
use std::time::{Duration, Instant};

use common::*;
use livemig::asyncapi::{self, AsyncMigration, Events, MigrationFuture, ReceiveFuture};
use livemig::codec::CodecId;
use livemig::engine::{DowntimePolicy, Migration, MigrationError, Mode, Verify};
use livemig::receiver::Receiver;
use livemig::stats::Event;
use livemig::transport::tcp::{TcpAcceptor, TcpConnector};

/// A source that will not converge on its own (200 MB/s over 16 MiB against a
/// 1 µs downtime target, no throttling and no local-minimum rule, up to 200
/// rounds): it is still in pre-copy when a test cancels it, however late a
/// loaded machine wakes the cancelling task.
fn endless_policy() -> DowntimePolicy {
    let mut p = DowntimePolicy::with_target(Duration::from_micros(1));
    p.max_rounds = 200;
    p.max_time = Duration::from_secs(60);
    p.auto_converge = false;
    p.stall_rounds = u32::MAX;
    p
}

/// Start `migration` of `src` and its receiver over loopback TCP.
fn start(src: &Source, policy: DowntimePolicy) -> (MigrationFuture, Events, ReceiveFuture) {
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").expect("bind");
    let addr = acceptor.local_addr().unwrap().to_string();
    let dest = asyncapi::receive(Receiver::new().config(receiver_config()), acceptor);
    let mut m = AsyncMigration::new(
        Migration::new(src.mem.clone())
            .tracker(src.tracker())
            .vm_control(Box::new(src.dirtier.control()))
            .policy(Box::new(policy))
            .config(config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest)),
    );
    let events = m.events();
    (m.run(TcpConnector::new(addr)), events, dest)
}

/// Await `f`, failing the test if it takes longer than [`GUARD`].
async fn guarded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not finished within {GUARD:?} (hang)"))
}

/// A 32 MiB source whose guest keeps dirtying pages (no migration converges).
fn busy_source(seed: u64) -> Source {
    Source::start(
        source_memory(32 * MIB, seed),
        TrackerKind::Explicit,
        200_000_000,
        16 << 20,
    )
}

/// Waits until the first round has been sent.
async fn first_round_finished(events: &mut Events) {
    wait_for(
        events,
        |e| matches!(e, Event::RoundFinished(r) if r.round == 0),
    )
    .await;
}

/// Read events until one matches `pred` (the stream must not end first).
async fn wait_for(events: &mut Events, pred: impl Fn(&Event) -> bool) -> Event {
    guarded("waiting for an event", async {
        loop {
            match events.next().await {
                Some(e) if pred(&e) => return e,
                Some(_) => {}
                None => panic!("event stream ended before the awaited event"),
            }
        }
    })
    .await
}

/// Every remaining event, until the stream ends (the migration thread finished).
async fn drain(events: &mut Events) -> Vec<Event> {
    guarded("draining events", async {
        let mut v = Vec::new();
        while let Some(e) = events.next().await {
            v.push(e);
        }
        v
    })
    .await
}

/// The source keeps running: not paused, and its CPUs keep writing.
fn assert_source_runs(src: &Source) {
    assert!(!src.dirtier.control().is_paused(), "source left paused");
    let before = src.dirtier.writes();
    let deadline = Instant::now() + Duration::from_secs(20);
    while src.dirtier.writes() == before {
        assert!(Instant::now() < deadline, "source dirtier made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_and_receive_as_futures_with_events() {
    let src = Source::default_running(32 * MIB, TrackerKind::Explicit);
    let (migration, mut events, dest) = start(&src, test_policy());
    // Read the events through the `Stream` trait, concurrently with the migration.
    let collect = tokio::spawn(async move {
        use futures_core::Stream;
        let mut v = Vec::new();
        while let Some(e) = std::future::poll_fn(|cx| Pin::new(&mut events).poll_next(cx)).await {
            v.push(e);
        }
        v
    });
    let (source, dest) = guarded("migration", async { tokio::join!(migration, dest) }).await;
    let (report, received) = assert_migrated(&src, Outcome { source, dest });
    assert_eq!(report.streams, 2);
    assert!(received.report.verified);
    let events = guarded("event stream", collect)
        .await
        .expect("collector task");
    assert!(
        matches!(events.first(), Some(Event::Started { .. })),
        "{events:?}"
    );
    assert!(matches!(events.last(), Some(Event::Completed(_))));
    let rounds = events
        .iter()
        .filter(|e| matches!(e, Event::RoundFinished(_)))
        .count();
    assert_eq!(
        rounds as u32 + 1,
        report.rounds,
        "one event per pre-copy round"
    );
    assert!(events.iter().any(|e| matches!(e, Event::Progress { .. })));
    assert!(events.iter().any(|e| matches!(e, Event::Brownout { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_by_token_returns_cancelled_and_the_source_keeps_running() {
    let src = busy_source(5);
    let (migration, mut events, dest) = start(&src, endless_policy());
    let token = migration.cancel_token();
    first_round_finished(&mut events).await;
    token.cancel();
    let r = guarded("cancelled migration", migration).await;
    assert!(matches!(r, Err(MigrationError::Cancelled)), "{r:?}");
    let d = guarded("receiver", dest).await;
    assert!(
        d.is_err(),
        "the destination must discard a cancelled migration"
    );
    let rest = drain(&mut events).await;
    assert!(
        matches!(
            rest.last(),
            Some(Event::Failed {
                source_running: true,
                ..
            })
        ),
        "{rest:?}"
    );
    assert_source_runs(&src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_migration_future_cancels_it() {
    let src = busy_source(6);
    let (migration, mut events, dest) = start(&src, endless_policy());
    first_round_finished(&mut events).await;
    drop(migration);
    // The stream ends once the migration thread has resumed the source and told
    // the destination; its last event says why.
    let rest = drain(&mut events).await;
    match rest.last() {
        Some(Event::Failed {
            error,
            source_running,
            ..
        }) => {
            assert!(error.contains("cancelled"), "{error}");
            assert!(*source_running);
        }
        other => panic!("expected a Failed event last, got {other:?}"),
    }
    assert!(guarded("receiver", dest).await.is_err());
    assert_source_runs(&src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_receive_future_fails_the_source_which_keeps_running() {
    let src = busy_source(8);
    let (migration, mut events, dest) = start(&src, endless_policy());
    first_round_finished(&mut events).await;
    drop(dest);
    let r = guarded("migration after the destination went away", migration).await;
    assert!(
        r.is_err(),
        "the source cannot complete without a destination"
    );
    assert!(!matches!(r, Err(MigrationError::Cancelled)), "{r:?}");
    assert_source_runs(&src);
}

#[tokio::test]
async fn cancelling_a_receive_that_waits_for_a_connection_ends_it() {
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").expect("bind");
    let mut cfg = receiver_config();
    cfg.accept_timeout = Duration::from_secs(600);
    let dest = asyncapi::receive(Receiver::new().config(cfg), acceptor);
    dest.cancel();
    let r = guarded("cancelled receive", dest).await;
    assert!(r.is_err(), "a cancelled receive cannot succeed");
}
