//! The sender's per-batch page path: one 256-page batch read out of guest memory,
//! zero-checked, hashed, recorded in the sent-page ledger and written as a frame to a
//! Unix socket that a second thread drains (so the kernel's copy of the pages is part
//! of the cost). Memory is 64 MiB, more than the last-level cache, walked in order
//! as round 0 does; one page in eight is zero.
//!
//! `zero_copy` is the raw path (pages go to the socket straight from guest memory),
//! `copy_lz4` the copy path with a block codec.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livemig::codec::CodecId;
use livemig::engine::BatchBench;
use livemig::wire::MAX_BATCH_PAGES;
use livemig::workload::splitmix;
use livemig::{GuestMemory, PAGE_SIZE};

const MEMORY: usize = 64 << 20;

fn memory() -> Arc<GuestMemory> {
    let mem = GuestMemory::anonymous(MEMORY, false).expect("anonymous memory");
    let mut seed = 7u64;
    let mut page = vec![0u8; PAGE_SIZE];
    for i in 0..(MEMORY / PAGE_SIZE) as u64 {
        if i % 8 == 3 {
            page.fill(0);
        } else {
            // Half random words, half a repeated word: compressible, like real memory.
            for (k, w) in page.chunks_exact_mut(8).enumerate() {
                let v = if k % 2 == 0 { splitmix(&mut seed) } else { i };
                w.copy_from_slice(&v.to_le_bytes());
            }
        }
        mem.write_pages(i, &page).expect("write page");
    }
    Arc::new(mem)
}

fn encoder(mem: &Arc<GuestMemory>, codec: CodecId) -> (BatchBench, std::thread::JoinHandle<()>) {
    let (tx, mut rx) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while matches!(rx.read(&mut buf), Ok(n) if n > 0) {}
    });
    (BatchBench::new(mem.clone(), codec, Box::new(tx)), drain)
}

fn batch(c: &mut Criterion) {
    let mem = memory();
    let batches = (MEMORY / PAGE_SIZE / MAX_BATCH_PAGES) as u64;
    let mut g = c.benchmark_group("batch");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30)
        .throughput(Throughput::Bytes((MAX_BATCH_PAGES * PAGE_SIZE) as u64));
    for (name, codec, quiescent) in [
        ("zero_copy", CodecId::Raw, false),
        ("zero_copy_quiescent", CodecId::Raw, true),
        ("copy_lz4", CodecId::Lz4, false),
    ] {
        let (mut enc, drain) = encoder(&mem, codec);
        let mut next = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                let first = next * MAX_BATCH_PAGES as u64;
                next = (next + 1) % batches;
                enc.send(first, MAX_BATCH_PAGES as u32, quiescent)
                    .expect("batch sent")
            })
        });
        drop(enc);
        drain.join().expect("drain thread");
    }
    g.finish();
}

criterion_group!(benches, batch);
criterion_main!(benches);
