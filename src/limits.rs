//! The machine's limits, measured in the same run as a migration so that results can
//! be quoted as ratios on a shared, noisy machine: page-by-page memcpy bandwidth,
//! raw loopback TCP throughput with a given number of streams, and the same TCP
//! streams moving memory: from a cold source region into a fresh destination region.
//!
//! The first TCP figure (hot 1 MiB buffers at both ends) is the kernel's socket limit.
//! The second is the floor of any raw migration on the machine: it pays what a
//! migration cannot avoid (reading cold source memory; faulting in, zeroing and
//! writing fresh destination memory) and nothing else (no hashing, no framing).

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
    /// Raw loopback TCP with `streams` streams from a cold source region into a fresh
    /// (not yet faulted-in, THP-advised) destination region (Gbit/s, median of 3).
    pub mem_tcp_gbit_per_s: f64,
    /// Streams used for the TCP measurements.
    pub streams: u16,
    /// TCP congestion control of the sending sockets, as the migration's page
    /// streams use it (the limit must be measured with the same).
    pub congestion: String,
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
pub fn loopback_tcp_gbit_per_s(
    streams: u16,
    duration: Duration,
    congestion: Option<&str>,
) -> std::io::Result<f64> {
    let mut samples = Vec::new();
    for _ in 0..3 {
        samples.push(tcp_once(streams.max(1), duration, congestion)?);
    }
    Ok(median(samples))
}

/// Connect a sending socket as the migration's page streams are: no delay, and the
/// congestion control asked for.
fn connect_sender(
    addr: std::net::SocketAddr,
    congestion: Option<&str>,
) -> std::io::Result<TcpStream> {
    let s = crate::transport::tcp::connect_with(&addr, Duration::from_secs(10), congestion)?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn tcp_once(streams: u16, duration: Duration, congestion: Option<&str>) -> std::io::Result<f64> {
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
            let congestion = congestion.map(str::to_string);
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut s = connect_sender(addr, congestion.as_deref())?;
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

/// Bytes moved per memory-to-memory TCP sample (larger than the last-level caches here).
const MEM_TCP_BYTES: usize = 512 << 20;
/// Chunk written per `write` and striped round-robin over the streams.
const MEM_TCP_CHUNK: usize = 1 << 20;

/// Raw loopback TCP moving `bytes` of cold, non-zero memory into a fresh anonymous
/// THP-advised region with `streams` streams, Gbit/s, median of 3.
pub fn memory_tcp_gbit_per_s(
    streams: u16,
    bytes: usize,
    congestion: Option<&str>,
) -> std::io::Result<f64> {
    let bytes = bytes.max(MEM_TCP_CHUNK).next_multiple_of(MEM_TCP_CHUNK);
    let mut src = memmap2::MmapMut::map_anon(bytes)?;
    let _ = src.advise(memmap2::Advice::HugePage);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in src.chunks_exact_mut(8) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        w.copy_from_slice(&x.to_le_bytes());
    }
    let mut samples = Vec::new();
    for _ in 0..3 {
        samples.push(memory_tcp_once(streams.max(1), &src, congestion)?);
    }
    Ok(median(samples))
}

fn memory_tcp_once(streams: u16, src: &[u8], congestion: Option<&str>) -> std::io::Result<f64> {
    let n = streams as usize;
    let mut dst = memmap2::MmapMut::map_anon(src.len())?;
    let _ = dst.advise(memmap2::Advice::HugePage);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    // Chunk j travels on stream j % n; each receiver owns its chunks of `dst`.
    let mut parts: Vec<Vec<&mut [u8]>> = (0..n).map(|_| Vec::new()).collect();
    for (j, c) in dst.chunks_mut(MEM_TCP_CHUNK).enumerate() {
        parts[j % n].push(c);
    }
    let start = Instant::now();
    std::thread::scope(|s| -> std::io::Result<()> {
        let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
        let senders: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || -> std::io::Result<()> {
                    let mut st = connect_sender(addr, congestion)?;
                    st.write_all(&[i as u8])?;
                    for c in src.chunks(MEM_TCP_CHUNK).skip(i).step_by(n) {
                        st.write_all(c)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for _ in 0..n {
            let (mut st, _) = listener.accept()?;
            let mut id = [0u8; 1];
            st.read_exact(&mut id)?;
            let slot = conns
                .get_mut(id[0] as usize)
                .ok_or_else(|| std::io::Error::other("bad stream id"))?;
            *slot = Some(st);
        }
        let receivers: Vec<_> = conns
            .into_iter()
            .zip(parts)
            .map(|(st, chunks)| {
                s.spawn(move || -> std::io::Result<()> {
                    let mut st = st.ok_or_else(|| std::io::Error::other("stream missing"))?;
                    for c in chunks {
                        st.read_exact(c)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in senders.into_iter().chain(receivers) {
            h.join()
                .map_err(|_| std::io::Error::other("limit thread panicked"))??;
        }
        Ok(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    // Prove the bytes arrived (and keep the copy from being optimised away).
    if dst[..] != src[..] {
        return Err(std::io::Error::other("memory-to-memory TCP: data differs"));
    }
    Ok(src.len() as f64 * 8.0 / secs / 1e9)
}

/// Measure all limits (about 2 s in total), the TCP ones with `congestion` on the
/// sending sockets (None: the system's default), as the migration will use.
pub fn measure(streams: u16, congestion: Option<&str>) -> std::io::Result<Limits> {
    Ok(Limits {
        memcpy_gb_per_s: memcpy_gb_per_s(256 << 20)?,
        tcp_gbit_per_s: loopback_tcp_gbit_per_s(streams, Duration::from_millis(300), congestion)?,
        mem_tcp_gbit_per_s: memory_tcp_gbit_per_s(streams, MEM_TCP_BYTES, congestion)?,
        streams,
        congestion: congestion
            .map(str::to_string)
            .or_else(crate::transport::tcp::default_congestion)
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory-to-memory measurement moves real bytes: it returns a rate only
    /// after the destination region compared equal to the source.
    #[test]
    fn memory_tcp_moves_the_region_intact() {
        for streams in [1, 3] {
            let g = memory_tcp_gbit_per_s(streams, 8 << 20, Some("reno")).expect("memory TCP");
            assert!(g.is_finite() && g > 0.0, "{streams} streams: {g}");
        }
    }
}
