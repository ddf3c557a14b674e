//! Wire micro-benchmarks: frame header emit/parse, and batch meta encode/decode of
//! a full 256-page batch.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livemig::codec::CodecId;
use livemig::wire::{BatchMeta, Extent, FrameHeader, FrameKind, MAX_BATCH_PAGES};
use livemig::PAGE_SIZE;

fn batch_meta() -> BatchMeta {
    let n = MAX_BATCH_PAGES;
    // 256 pages in 16 extents of 16, every 4th page zero.
    let extents = (0..16)
        .map(|e| Extent {
            gfn: 0x1000 + e * 100,
            count: 16,
        })
        .collect();
    let mut zero_map = vec![0u8; n / 8];
    for i in (0..n).step_by(4) {
        zero_map[i / 8] |= 1 << (i % 8);
    }
    let nonzero = n - n / 4;
    BatchMeta {
        round: 3,
        codec: Some(CodecId::Lz4),
        flags: 0,
        payload_len: (nonzero * PAGE_SIZE) as u32,
        extents,
        zero_map,
        hashes: (0..n as u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect(),
    }
}

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    let meta = batch_meta();
    let mut meta_bytes = Vec::new();
    meta.encode_into(&mut meta_bytes);
    let h = FrameHeader::seal(FrameKind::Batch, 0, &meta_bytes, &[]);
    let hb = h.encode();
    g.throughput(Throughput::Elements(1));
    g.bench_function("frame_header_encode", |b| b.iter(|| black_box(&h).encode()));
    g.bench_function("frame_header_decode", |b| {
        b.iter(|| FrameHeader::decode(black_box(&hb)).expect("header"))
    });
    g.bench_function("frame_header_seal_crc", |b| {
        b.iter(|| FrameHeader::seal(FrameKind::Batch, 0, black_box(&meta_bytes), &[]))
    });
    g.throughput(Throughput::Bytes(meta_bytes.len() as u64));
    let mut out = Vec::with_capacity(meta_bytes.len());
    g.bench_function("batch_meta_encode_256", |b| {
        b.iter(|| black_box(&meta).encode_into(&mut out))
    });
    let mut decoded = BatchMeta::default();
    g.bench_function("batch_meta_decode_256", |b| {
        b.iter(|| decoded.decode_from(black_box(&meta_bytes)).expect("meta"))
    });
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
