//! The machine's limits, measured in the same run as a migration so that results can
//! be quoted as ratios on a shared, noisy machine: page-by-page memcpy bandwidth and
//! raw loopback TCP throughput with a given number of streams.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::memory::{GuestMemory, PAGE_SIZE};

/// Measured limits.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// memcpy of 4 KiB pages between prefaulted buffers, one thread (GB/s, median of 3).
    pub memcpy_gb_per_s: f64,
    /// Raw loopback TCP with `streams` streams (Gbit/s, median of 3).
    pub tcp_gbit_per_s: f64,
    /// Streams used for the TCP measurement.
    pub streams: u16,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// memcpy bandwidth of page-by-page copies of `bytes` (prefaulted), GB/s, median of 3.
pub fn memcpy_gb_per_s(bytes: usize) -> std::io::Result<f64> {
    let bytes = bytes.max(PAGE_SIZE).next_multiple_of(PAGE_SIZE);
    let src = GuestMemory::anonymous(bytes, true).map_err(std::io::Error::other)?;
    src.prefault(1).map_err(std::io::Error::other)?;
    let mut dst = vec![1u8; bytes]; // touched: prefaulted
    let mut samples = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        for (i, chunk) in dst.chunks_exact_mut(PAGE_SIZE).enumerate() {
            src.read_pages(i as u64, chunk)
                .map_err(std::io::Error::other)?;
        }
        samples.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&dst);
    Ok(median(samples))
}

/// Raw loopback TCP throughput with `streams` streams for `duration`, Gbit/s, median of 3.
pub fn loopback_tcp_gbit_per_s(streams: u16, duration: Duration) -> std::io::Result<f64> {
    let mut samples = Vec::new();
    for _ in 0..3 {
        samples.push(tcp_once(streams.max(1), duration)?);
    }
    Ok(median(samples))
}

fn tcp_once(streams: u16, duration: Duration) -> std::io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receivers = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut hs = Vec::new();
        for _ in 0..streams {
            let (mut s, _) = listener.accept()?;
            hs.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                total
            }));
        }
        Ok(hs.into_iter().map(|h| h.join().unwrap_or(0)).sum())
    });
    let start = Instant::now();
    let senders: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                let buf = vec![0x5au8; 1 << 20];
                while start.elapsed() < duration {
                    s.write_all(&buf)?;
                }
                Ok(())
            })
        })
        .collect();
    for s in senders {
        s.join()
            .map_err(|_| std::io::Error::other("sender panicked"))??;
    }
    let bytes = receivers
        .join()
        .map_err(|_| std::io::Error::other("receiver panicked"))??;
    Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
}

/// Measure both limits (about 1 s in total).
pub fn measure(streams: u16) -> std::io::Result<Limits> {
    Ok(Limits {
        memcpy_gb_per_s: memcpy_gb_per_s(256 << 20)?,
        tcp_gbit_per_s: loopback_tcp_gbit_per_s(streams, Duration::from_millis(300))?,
        streams,
    })
}
