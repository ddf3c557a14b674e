//! The sender's per-batch page path: one 256-page batch read out of guest memory,
//! zero-checked, hashed, recorded in the sent-page ledger and written as a frame to a
//! loopback TCP socket that a second thread drains (so the kernel's copy of the pages is part
//! of the cost). Memory is 64 MiB, more than the last-level cache, walked in order
//! as round 0 does; one page in eight is zero.
//!
//! Time is the sending thread's CPU time (see [`thread_cpu`]).
//!
//! `zero_copy` is the raw path (pages go to the socket straight from guest memory),
//! `copy_lz4` the copy path with a block codec. `raw_seen_stream` sends raw batches
//! through a stream wrapper that sees every byte (as TLS, shaping and fault
//! injection do), which takes the copy path.

use std::hint::black_box;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livemig::codec::CodecId;
use livemig::engine::BatchBench;
use livemig::transport::Stream;
use livemig::wire::MAX_BATCH_PAGES;
use livemig::workload::splitmix;
use livemig::{GuestMemory, PAGE_SIZE};

const MEMORY: usize = 64 << 20;

/// CPU time of the calling thread: the sender's cost (its user time and the
/// kernel's copy in `writev`), not the drain thread's, and unmoved by other
/// processes waiting for the same cores.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

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

/// A stream that passes every byte through user space (no socket descriptor).
#[derive(Debug)]
struct Seen {
    inner: Box<dyn Stream>,
}

impl std::io::Read for Seen {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::io::Write for Seen {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.inner.write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Stream for Seen {
    livemig::forward_stream!(inner);
}

/// An encoder writing to a loopback TCP socket (a stream that the zero-copy path
/// writes to straight from guest memory) drained by a second thread.
fn encoder(
    mem: &Arc<GuestMemory>,
    codec: CodecId,
    seen: bool,
) -> (BatchBench, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let tx = std::net::TcpStream::connect(listener.local_addr().expect("address"))
        .expect("connect loopback");
    let (mut rx, _) = listener.accept().expect("accept loopback");
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while matches!(rx.read(&mut buf), Ok(n) if n > 0) {}
    });
    let out: Box<dyn Stream> = if seen {
        Box::new(Seen {
            inner: Box::new(tx),
        })
    } else {
        Box::new(tx)
    };
    (BatchBench::new(mem.clone(), codec, out), drain)
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
        ("raw_seen_stream", CodecId::Raw, false),
    ] {
        let (mut enc, drain) = encoder(&mem, codec, name == "raw_seen_stream");
        let mut next = 0u64;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t0 = thread_cpu();
                for _ in 0..iters {
                    let first = next * MAX_BATCH_PAGES as u64;
                    next = (next + 1) % batches;
                    black_box(
                        enc.send(first, MAX_BATCH_PAGES as u32, quiescent)
                            .expect("batch sent"),
                    );
                }
                thread_cpu() - t0
            })
        });
        drop(enc);
        drain.join().expect("drain thread");
    }
    g.finish();
}

criterion_group!(benches, batch);
criterion_main!(benches);
