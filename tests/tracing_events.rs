//! The tracing output of a migration: the events of one small migration reach a
//! subscriber inside a span that carries the session id, and a failure is logged
//! at WARN with the reason.

use std::io::Write;
use std::sync::{Arc, Mutex};

use livemig::engine::{CancelToken, Migration};
use livemig::receiver::Receiver;
use livemig::stats::sink::TracingSink;
use livemig::transport::mem;
use livemig::{GuestMemory, PAGE_SIZE};

/// Everything the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn guest(bytes: usize) -> Arc<GuestMemory> {
    let m = GuestMemory::anonymous(bytes, false).expect("guest memory");
    let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 251) as u8).collect();
    for p in (0..m.total_pages()).step_by(3) {
        m.write_pages(p, &page).expect("write page");
    }
    Arc::new(m)
}

#[test]
fn a_migration_logs_its_phases_with_the_session_id_and_a_failure_at_warn() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Global: the engine emits from its own threads.
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    // One small migration of a stopped guest over the in-memory transport.
    let (connector, acceptor) = mem::pair();
    let receiver = std::thread::spawn(move || Receiver::new().run(&acceptor));
    let report = Migration::new(guest(4 << 20))
        .progress(Arc::new(TracingSink::new()))
        .run(&connector)
        .expect("migration");
    receiver.join().unwrap().expect("received");
    let log = captured.text();
    let span = format!("migration{{session={}}}", report.session);
    for message in [
        "migration started",
        "round finished",
        "brownout: VM paused",
        "migration committed",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("no {message:?} event in:\n{log}"));
        assert!(line.contains(" INFO "), "{message:?} not at INFO: {line}");
        assert!(
            line.contains(&span),
            "{message:?} not in the span {span}: {line}"
        );
    }
    assert!(!log.contains(" WARN "), "a clean migration warned:\n{log}");

    // A cancelled migration: a WARN naming the failure (the VM keeps running).
    let before = log.len();
    let cancel = CancelToken::new();
    cancel.cancel();
    let (connector, _acceptor) = mem::pair();
    let err = Migration::new(guest(1 << 20))
        .progress(Arc::new(TracingSink::new()))
        .cancel_token(cancel)
        .run(&connector)
        .expect_err("cancelled before it began");
    let log = captured.text();
    let failure = log[before..]
        .lines()
        .find(|l| l.contains("migration failed"))
        .unwrap_or_else(|| panic!("no failure event in:\n{}", &log[before..]));
    assert!(failure.contains(" WARN "), "{failure}");
    assert!(failure.contains("source_running=true"), "{failure}");
    assert!(failure.contains(&err.to_string()), "{failure} lacks {err}");
}
