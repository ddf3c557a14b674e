//! The smallest embedding: migrate a running (simulated) guest between two
//! `GuestMemory`s in one process over the in-memory transport.
//!
//! `cargo run --release --example mem_migrate`

use std::sync::Arc;

use livemig::dirty::ExplicitTracker;
use livemig::engine::Migration;
use livemig::memory::{DirtyBitmap, GuestMemory};
use livemig::receiver::Receiver;
use livemig::transport::mem;
use livemig::workload::{self, Content, Dirtier, DirtierConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The "VM": 64 MiB of mixed content, written at 50 MB/s over an 8 MiB hot set.
    let memory = Arc::new(GuestMemory::anonymous(64 << 20, false)?);
    workload::fill(&memory, Content::Mix, 1, 2)?;
    let bitmap = Arc::new(DirtyBitmap::new(memory.total_pages()));
    let guest = Dirtier::start(
        memory.clone(),
        Some(bitmap.clone()),
        DirtierConfig {
            rate_bytes_per_s: 50_000_000,
            hot_set_bytes: 8 << 20,
            ..Default::default()
        },
    );

    // Destination: allocates its memory from the source's layout at setup.
    let (connector, acceptor) = mem::pair();
    let destination = std::thread::spawn(move || Receiver::new().run(&acceptor));

    // Source: explicit dirty tracking fed by the guest, pause/resume through VmControl.
    let report = Migration::new(memory.clone())
        .tracker(Box::new(ExplicitTracker::new(bitmap)))
        .vm_control(Box::new(guest.control()))
        .run(&connector)?;
    let received = destination.join().expect("receiver thread")?;
    drop(guest);

    println!(
        "{} rounds, downtime {:.2} ms, {} pages sent ({} zero), digest {}",
        report.rounds, report.downtime_ms, report.pages_sent, report.zero_pages, report.digest
    );
    let same = memory.full_digest(2)? == received.memory.full_digest(2)?;
    println!("destination memory equals source: {same}");
    if !same {
        std::process::exit(1);
    }
    Ok(())
}
