//! Dirty-bitmap micro-benchmarks: harvesting a bitmap into a page set and
//! iterating the set bits, at 1, 10 and 50 % density over 1 GiB worth of pages.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use livemig::memory::{DirtyBitmap, PageSet};
use livemig::workload::splitmix;
use livemig::PAGE_SIZE;

const PAGES: u64 = (1 << 30) / PAGE_SIZE as u64;

/// Deterministic page indexes at `percent` density (each page chosen independently).
fn pattern(percent: u64) -> Vec<u64> {
    let mut s = percent;
    (0..PAGES)
        .filter(|_| splitmix(&mut s) % 100 < percent)
        .collect()
}

fn bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
        // Throughput in guest bytes covered by the bitmap (1 GiB per iteration).
        .throughput(Throughput::Bytes(PAGES * PAGE_SIZE as u64));
    for percent in [1u64, 10, 50] {
        let pages = pattern(percent);
        let bm = DirtyBitmap::new(PAGES);
        let mut set = PageSet::new(PAGES);
        g.bench_function(
            BenchmarkId::new("harvest_into", format!("{percent}%")),
            |b| {
                b.iter_batched(
                    || {
                        for &p in &pages {
                            bm.mark(p);
                        }
                    },
                    |()| {
                        set.clear();
                        bm.harvest_into(&mut set);
                    },
                    BatchSize::PerIteration,
                )
            },
        );
        let mut full = PageSet::new(PAGES);
        for &p in &pages {
            full.insert(p);
        }
        g.bench_function(
            BenchmarkId::new("pageset_iter", format!("{percent}%")),
            |b| b.iter(|| black_box(&full).iter().fold(0u64, |a, p| a ^ p)),
        );
    }
    g.finish();
}

criterion_group!(benches, bitmap);
criterion_main!(benches);
