//! Codec micro-benchmarks: each block codec and the delta codec × content class,
//! encode and decode, in input bytes per second; and zero-page detection.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use livemig::codec::zero::is_zero_page;
use livemig::codec::{delta, Lz4Codec, PageCodec, RawCodec, ZstdCodec};
use livemig::workload::{self, splitmix, Content};
use livemig::{GuestMemory, PAGE_SIZE};

/// Pages per block: a quarter of a full batch (256 KiB), cache-resident like a
/// worker's copy buffer.
const PAGES: usize = 64;

/// `PAGES` pages of one content class, from the workload generator.
fn pages_of(class: &str) -> Vec<u8> {
    let mut out = vec![0u8; PAGES * PAGE_SIZE];
    let content = match class {
        "mix" => Content::Mix,
        "text" => Content::Text,
        "random" => Content::Random,
        "zero" => Content::Zero,
        "sparse" => {
            // Zero pages with 1-8 non-zero words (the mix's sparse class).
            let mut s = 7u64;
            for p in out.chunks_exact_mut(PAGE_SIZE) {
                for _ in 0..1 + splitmix(&mut s) % 8 {
                    let off = (splitmix(&mut s) % (PAGE_SIZE as u64 / 8)) as usize * 8;
                    p[off..off + 8].copy_from_slice(&(splitmix(&mut s) | 1).to_le_bytes());
                }
            }
            return out;
        }
        other => panic!("unknown class {other}"),
    };
    let mem = GuestMemory::anonymous(PAGES * PAGE_SIZE, false).expect("memory");
    workload::fill(&mem, content, 42, 1).expect("fill");
    mem.read_pages(0, &mut out).expect("read");
    out
}

/// The same pages after a dirtier-like write: a counter stored into 4 words of each page.
fn dirtied(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    let mut s = 99u64;
    for p in new.chunks_exact_mut(PAGE_SIZE) {
        for _ in 0..4 {
            let off = (splitmix(&mut s) % (PAGE_SIZE as u64 / 8)) as usize * 8;
            p[off..off + 8].copy_from_slice(&(splitmix(&mut s) | 1 << 63).to_le_bytes());
        }
    }
    new
}

const CLASSES: [&str; 5] = ["mix", "text", "random", "sparse", "zero"];

fn block_codecs(c: &mut Criterion) {
    let make = |name: &str| -> Box<dyn PageCodec> {
        match name {
            "raw" => Box::new(RawCodec),
            "lz4" => Box::new(Lz4Codec),
            "zstd-1" => Box::new(ZstdCodec::new(1)),
            _ => Box::new(ZstdCodec::new(3)),
        }
    };
    for dir in ["encode", "decode"] {
        let mut g = c.benchmark_group(format!("codec-{dir}"));
        g.measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(500))
            .sample_size(20)
            .throughput(Throughput::Bytes((PAGES * PAGE_SIZE) as u64));
        for class in CLASSES {
            let input = pages_of(class);
            for name in ["raw", "lz4", "zstd-1", "zstd-3"] {
                let mut codec = make(name);
                let mut enc = Vec::with_capacity(2 * input.len());
                codec.encode(&input, &mut enc).expect("encode");
                let mut out = vec![0u8; input.len()];
                let id = BenchmarkId::new(name, class);
                if dir == "encode" {
                    g.bench_function(id, |b| {
                        b.iter(|| codec.encode(black_box(&input), &mut enc).expect("encode"))
                    });
                } else {
                    g.bench_function(id, |b| {
                        b.iter(|| codec.decode(black_box(&enc), &mut out).expect("decode"))
                    });
                }
            }
            // Delta: each page against its version before a 4-word write.
            let new = dirtied(&input);
            let mut d = Vec::with_capacity(input.len());
            let mut offs = Vec::new();
            for (o, n) in input
                .chunks_exact(PAGE_SIZE)
                .zip(new.chunks_exact(PAGE_SIZE))
            {
                let at = d.len();
                delta::encode(o, n, &mut d, delta::MAX_DELTA_LEN).expect("small delta");
                offs.push((at, d.len()));
            }
            let id = BenchmarkId::new("delta", class);
            if dir == "encode" {
                g.bench_function(id, |b| {
                    b.iter(|| {
                        d.clear();
                        for (o, n) in input
                            .chunks_exact(PAGE_SIZE)
                            .zip(new.chunks_exact(PAGE_SIZE))
                        {
                            black_box(delta::encode(o, n, &mut d, delta::MAX_DELTA_LEN));
                        }
                    })
                });
            } else {
                let mut page = input.clone();
                g.bench_function(id, |b| {
                    b.iter(|| {
                        for (p, &(s, e)) in page.chunks_exact_mut(PAGE_SIZE).zip(&offs) {
                            delta::apply(black_box(&d[s..e]), p).expect("apply");
                        }
                    })
                });
            }
        }
        g.finish();
    }
}

fn zero_detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero-detect");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
        .throughput(Throughput::Bytes((PAGES * PAGE_SIZE) as u64));
    for class in ["zero", "mix", "random"] {
        let input = pages_of(class);
        g.bench_function(class, |b| {
            b.iter(|| {
                input
                    .chunks_exact(PAGE_SIZE)
                    .filter(|p| is_zero_page(black_box(p)))
                    .count()
            })
        });
    }
    g.finish();
}

/// The per-page integrity hash (XXH3-64, run-time SIMD dispatch) over cache-resident
/// pages and over a region larger than the last-level cache (cold, as the sender
/// meets guest memory in round 0).
fn page_hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("page-hash");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    let hot = pages_of("random");
    g.throughput(Throughput::Bytes(hot.len() as u64));
    g.bench_function("cache-resident", |b| {
        b.iter(|| {
            hot.chunks_exact(PAGE_SIZE)
                .fold(0u64, |a, p| a ^ livemig::memory::page_hash(black_box(p)))
        })
    });
    // The crate's loop alone (what `page_hash` uses without AVX-512).
    g.bench_function("cache-resident-crate", |b| {
        b.iter(|| {
            hot.chunks_exact(PAGE_SIZE).fold(0u64, |a, p| {
                a ^ twox_hash::XxHash3_64::oneshot(black_box(p))
            })
        })
    });
    // The same value from the sender's loop (`memory::page_pass`), which first
    // loads the page into L1 with independent loads, then hashes it.
    g.bench_function("cache-resident-page-pass", |b| {
        b.iter(|| {
            hot.chunks_exact(PAGE_SIZE).fold(0u64, |a, p| {
                // SAFETY: `p` is a whole page of a buffer nothing else writes.
                a ^ unsafe { livemig::memory::page_pass::hash_page(black_box(p).as_ptr()) }.hash
            })
        })
    });
    // 256 MiB: above this machine's 105 MiB L3, so each pass reads memory.
    let cold: Vec<u8> = (0..256usize << 20)
        .map(|i| (i * 31 + i / 4096) as u8)
        .collect();
    g.throughput(Throughput::Bytes(cold.len() as u64));
    g.bench_function("memory-resident-256MiB", |b| {
        b.iter(|| {
            cold.chunks_exact(PAGE_SIZE)
                .fold(0u64, |a, p| a ^ livemig::memory::page_hash(black_box(p)))
        })
    });
    g.bench_function("memory-resident-256MiB-page-pass", |b| {
        b.iter(|| {
            cold.chunks_exact(PAGE_SIZE).fold(0u64, |a, p| {
                // SAFETY: `p` is a whole page of a buffer nothing else writes.
                a ^ unsafe { livemig::memory::page_pass::hash_page(black_box(p).as_ptr()) }.hash
            })
        })
    });
    g.finish();
}

/// Copying each page out of guest memory into a scratch page and telling whether it
/// is zero, as the sender's batch walk does, over 256 MiB of `mix` guest memory
/// (above the L3, so each pass reads memory): the fused copy of
/// `RacyPages::copy_page` against a plain `memcpy` followed by `is_zero_page`.
fn page_copy_out(c: &mut Criterion) {
    let mut g = c.benchmark_group("page-copy-out");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    let mem = GuestMemory::anonymous(256 << 20, true).expect("guest memory");
    workload::fill(&mem, Content::Mix, 1, 2).expect("fill");
    mem.prefault(2).expect("prefault");
    let region = &mem.regions()[0];
    let pages = region.pages();
    let view = region.racy_pages(0, pages).expect("view");
    g.throughput(Throughput::Bytes(pages * PAGE_SIZE as u64));
    let mut scratch = [0u8; PAGE_SIZE];
    g.bench_function("fused-copy-and-zero-check", |b| {
        b.iter(|| {
            (0..pages as usize)
                .filter(|&p| view.copy_page(p, black_box(&mut scratch)).expect("page"))
                .count()
        })
    });
    // What each send path does per page: the copy path copies into an L1 page,
    // checking for zero as it copies, then hashes the copy; the zero-copy path
    // hashes and checks where the page lies (`memory::page_pass`).
    g.bench_function("copy-path-copy-and-zero-check-then-hash", |b| {
        b.iter(|| {
            (0..pages as usize)
                .filter(|&p| {
                    view.copy_page(p, black_box(&mut scratch)).expect("page")
                        && livemig::memory::page_hash(&scratch) != 0
                })
                .count()
        })
    });
    g.bench_function("zero-copy-path-hash-zero-one-pass", |b| {
        b.iter(|| {
            (0..pages as usize)
                .filter(|&p| view.hash_page(p).expect("page").nonzero)
                .count()
        })
    });
    let mut whole = vec![0u8; PAGE_SIZE];
    g.bench_function("memcpy-then-zero-check", |b| {
        b.iter(|| {
            (0..pages)
                .filter(|&p| {
                    mem.read_pages(p, black_box(&mut whole)).expect("page");
                    !is_zero_page(&whole)
                })
                .count()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    block_codecs,
    zero_detection,
    page_hashing,
    page_copy_out
);
criterion_main!(benches);
