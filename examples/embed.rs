//! How a VMM embeds livemig, end to end in one process (the code docs/EMBEDDING.md
//! walks through): a running guest whose writes a dirty tracker sees, pause and
//! resume through `VmControl`, one device participant on each side, the destination
//! with an outcome log, `tracing` output, and what each error means for the VM.
//!
//! `cargo run --example embed` (add `RUST_LOG=livemig=debug` for more log lines).
//! Builds without the `bench` feature: nothing here comes from the synthetic workload.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use livemig::device::{ParticipantError, RestoreState, SaveState, Veto};
use livemig::dirty::ExplicitTracker;
use livemig::engine::{Migration, MigrationConfig, MigrationError, VmControl, VmControlError};
use livemig::memory::{DirtyBitmap, GuestMemory};
use livemig::receiver::{OutcomeLog, ReceiveError, Receiver, ReceiverConfig};
use livemig::stats::sink::TracingSink;
use livemig::transport::mem;
use livemig::PAGE_SIZE;

// ANCHOR: vm
/// The guest: one vCPU thread that writes pages and marks each one in the dirty
/// bitmap *after* the write, and stops when asked.
struct Guest {
    stop: Arc<AtomicBool>,
    /// Asked to pause.
    pause: Arc<AtomicBool>,
    /// The vCPU acknowledged: it writes nothing until `pause` is cleared.
    parked: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Guest {
    fn start(memory: Arc<GuestMemory>, bitmap: Arc<DirtyBitmap>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let parked = Arc::new(AtomicBool::new(false));
        let (s, p, k) = (stop.clone(), pause.clone(), parked.clone());
        let thread = std::thread::spawn(move || {
            let pages = memory.total_pages();
            let mut page = vec![0u8; PAGE_SIZE];
            let mut n = 0u64;
            while !s.load(Ordering::Acquire) {
                if p.load(Ordering::Acquire) {
                    k.store(true, Ordering::Release);
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                // A hot set: the first 256 pages, rewritten with a counter.
                let index = n % 256.min(pages);
                page[..8].copy_from_slice(&n.to_le_bytes());
                memory.write_pages(index, &page).expect("guest write");
                bitmap.mark(index);
                n += 1;
                std::thread::sleep(Duration::from_micros(20));
            }
        });
        Self {
            stop,
            pause,
            parked,
            thread: Some(thread),
        }
    }
    fn control(&self) -> GuestControl {
        GuestControl {
            pause: self.pause.clone(),
            parked: self.parked.clone(),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The engine's handle on the guest's execution.
struct GuestControl {
    pause: Arc<AtomicBool>,
    parked: Arc<AtomicBool>,
}

impl VmControl for GuestControl {
    fn pause(&mut self) -> Result<(), VmControlError> {
        // Stop every vCPU (and device emulation that writes guest memory) and
        // return once they are stopped. The VMM's own error converts into
        // `VmControlError` (a message, an `std::io::Error`, any error type); on an
        // error the engine calls `resume` and the migration fails.
        self.pause.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !self.parked.load(Ordering::Acquire) {
            if std::time::Instant::now() > deadline {
                return Err("the vCPU did not stop within 5 s".into());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmControlError> {
        self.parked.store(false, Ordering::Release);
        self.pause.store(false, Ordering::Release);
        Ok(())
    }
    fn throttle(&mut self, _percent: u8) -> Result<(), VmControlError> {
        Ok(()) // a VMM would time-slice its vCPUs
    }
}
// ANCHOR_END: vm

// ANCHOR: participants
/// A device with a little state (a counter), saved at brownout on the source.
struct CounterSave(u64);

impl SaveState for CounterSave {
    fn id(&self) -> &str {
        "counter0"
    }
    fn version(&self) -> u32 {
        1
    }
    fn setup_info(&self) -> Vec<u8> {
        Vec::new()
    }
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError> {
        out.extend_from_slice(&self.0.to_le_bytes());
        Ok(())
    }
    fn release(&mut self) -> Result<(), ParticipantError> {
        Ok(()) // give up host resources the destination takes over
    }
    fn committed(&mut self) {}
    fn rolled_back(&mut self) {}
}

/// The same device on the destination: validates, then restores.
struct CounterRestore(Arc<AtomicU64>);

impl RestoreState for CounterRestore {
    fn id(&self) -> &str {
        "counter0"
    }
    fn validate_setup(&mut self, _info: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn validate_state(&mut self, version: u32, blob: &[u8]) -> Result<(), Veto> {
        if version != 1 || blob.len() != 8 {
            return Err(Veto {
                participant: "counter0".into(),
                reason: format!("version {version}, {} bytes: not a counter", blob.len()),
            });
        }
        Ok(())
    }
    fn restore(&mut self, _version: u32, blob: &[u8]) -> Result<(), ParticipantError> {
        let v = u64::from_le_bytes(blob.try_into().expect("validated"));
        self.0.store(v, Ordering::Release);
        Ok(())
    }
    fn discard(&mut self) {}
}
// ANCHOR_END: participants

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // ANCHOR: tracing
    // The library never prints: it emits `tracing` spans and events. The VMM
    // installs its subscriber (here: stderr, filtered by RUST_LOG, default info).
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
        .init();
    // ANCHOR_END: tracing

    // ANCHOR: source
    // The guest's RAM. A VMM on rust-vmm builds it from its `GuestMemoryMmap`
    // instead: `GuestMemory::from_vm_memory` (feature `vm-memory`, see
    // examples/kvm_vmm).
    let memory = Arc::new(GuestMemory::anonymous(16 << 20, false)?);
    let bitmap = Arc::new(DirtyBitmap::new(memory.total_pages()));
    let guest = Guest::start(memory.clone(), bitmap.clone());

    let mut config = MigrationConfig::default();
    config.streams = 2;
    config.peer_timeout = Duration::from_secs(10);
    let migration = Migration::new(memory.clone())
        .tracker(Box::new(ExplicitTracker::new(bitmap)))
        .vm_control(Box::new(guest.control()))
        .participant(Box::new(CounterSave(42)))
        .progress(Arc::new(TracingSink::new()))
        .config(config);
    // ANCHOR_END: source

    // ANCHOR: destination
    let restored = Arc::new(AtomicU64::new(0));
    let outcomes = Arc::new(OutcomeLog::default());
    let mut receiver_config = ReceiverConfig::default();
    receiver_config.huge_pages = false;
    let receiver = Receiver::new()
        .config(receiver_config)
        .participant(Box::new(CounterRestore(restored.clone())))
        .outcome_log(outcomes.clone());
    // ANCHOR_END: destination

    // ANCHOR: run
    let (connector, acceptor) = mem::pair();
    let destination = std::thread::spawn(move || receiver.run(&acceptor));
    let source = migration.run(&connector);
    let received = destination.join().expect("receiver thread");
    match (&source, &received) {
        (Ok(report), Ok(received)) => {
            // The destination committed: the VM runs there. Discard the paused source.
            println!(
                "committed session {}: {} rounds, downtime {:.2} ms, verified {}",
                report.session, report.rounds, report.downtime_ms, report.verified
            );
            let same = memory.full_digest(2)? == received.memory.full_digest(2)?;
            println!(
                "destination memory equals the paused source: {same}; counter {}",
                restored.load(Ordering::Acquire)
            );
            if !same || restored.load(Ordering::Acquire) != 42 {
                std::process::exit(1);
            }
        }
        (Err(MigrationError::InDoubt { session, .. }), _) => {
            // The source released the VM and never learned the outcome: it stays
            // paused. Ask the destination (its outcome log answers `livemig resolve`),
            // then resume or discard; never both run.
            eprintln!("in doubt about {session:?}: the source stays paused");
            std::process::exit(3);
        }
        (Err(e), _) if e.source_running() => {
            // Every other failure: the source VM was resumed and keeps running;
            // the destination discarded what it received.
            eprintln!("migration failed, the VM keeps running here: {e}");
            if let Err(ReceiveError::Vetoed(v)) = &received {
                eprintln!("the destination vetoed: {v}");
            }
            std::process::exit(1);
        }
        (Err(e), _) => {
            // Pausing or resuming failed: the VM may be stopped; the VMM decides.
            eprintln!("migration failed and the VM is not running: {e}");
            std::process::exit(1);
        }
        (Ok(_), Err(e)) => {
            eprintln!("the source saw a commit but the destination reports: {e}");
            std::process::exit(1);
        }
    }
    // ANCHOR_END: run
    drop(guest);
    Ok(())
}
