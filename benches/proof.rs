//! The proof's per-page cost: recording a page in a `PageLedger` (swap of the table
//! entry, two XXH3-128 entries into the worker's delta) as the send and apply paths
//! do for every page, and the brownout cost of reading the digest.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livemig::proof::{entry, DigestDelta, PageLedger};

/// 1 GiB of 4 KiB pages.
const PAGES: u64 = 1 << 18;
/// One batch: the delta is merged into the ledger once per batch, as workers do.
const BATCH: u64 = 256;

fn ledger(c: &mut Criterion) {
    let mut g = c.benchmark_group("proof");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    g.throughput(Throughput::Elements(1));
    g.bench_function("entry", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(entry(black_box(i), black_box(i ^ 0x5555)))
        })
    });
    // Re-sending pages in order (every entry replaces an earlier one), merging per
    // batch: the per-page cost a worker pays.
    g.throughput(Throughput::Elements(PAGES));
    let l = PageLedger::new(PAGES);
    let mut gen = 1u64;
    g.bench_function("record_per_page", |b| {
        b.iter(|| {
            gen += 1;
            let mut d = DigestDelta::default();
            for start in (0..PAGES).step_by(BATCH as usize) {
                for p in start..start + BATCH {
                    l.record(p, p ^ gen, &mut d);
                }
                l.merge(&mut d);
            }
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("digest_at_brownout", |b| b.iter(|| black_box(l.digest())));
    g.finish();
}

criterion_group!(benches, ledger);
criterion_main!(benches);
