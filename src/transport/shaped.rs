//! Bandwidth shaping: a token bucket shared by all page streams of a migration (or
//! of several migrations, for fair sharing), wrapped around any [`Stream`].

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Stream;

/// A token bucket in bytes. `rate` bytes/s refill, `burst` bytes capacity.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket for `bits_per_s` (decimal bits), with a burst of 10 ms of traffic
    /// (at least 64 KiB) so that the cap holds over short windows too.
    pub fn new(bits_per_s: u64) -> Arc<Self> {
        let rate = bits_per_s as f64 / 8.0;
        let burst = (rate * 0.01).max(64.0 * 1024.0);
        Arc::new(Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        })
    }

    /// Rate in bytes per second.
    pub fn bytes_per_s(&self) -> f64 {
        self.rate
    }

    /// Take up to `want` bytes of tokens, waiting as needed; returns how many were
    /// granted (at most the burst).
    ///
    /// Writers are served in the order they ask: each call reserves its tokens at
    /// once, letting the balance go negative, and sleeps until the refill has paid
    /// for them. A bucket that made waiters poll for tokens let whichever writer woke
    /// first win again and again: measured, one of two page streams sending 12
    /// batches to the other's 4, and a stream silent for over a second.
    pub fn take(&self, want: usize) -> usize {
        let want = (want as f64).min(self.burst).max(1.0);
        let wait = {
            let mut s = self.state.lock().expect("bucket lock");
            let now = Instant::now();
            let (tokens, last) = *s;
            let tokens =
                (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
            let left = tokens - want;
            *s = (left, now);
            if left < 0.0 {
                -left / self.rate
            } else {
                0.0
            }
        };
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
        want as usize
    }
}

/// A stream whose writes are paced by a shared [`TokenBucket`].
#[derive(Debug)]
pub struct ShapedStream {
    inner: Box<dyn Stream>,
    bucket: Arc<TokenBucket>,
}

impl ShapedStream {
    /// Pace `inner` with `bucket`.
    pub fn new(inner: Box<dyn Stream>, bucket: Arc<TokenBucket>) -> Self {
        Self { inner, bucket }
    }
}

impl Read for ShapedStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for ShapedStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.bucket.take(buf.len());
        self.inner.write(&buf[..n])
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let n = self.bucket.take(total);
        // Write at most the granted bytes: trim the slice list.
        let mut left = n;
        let mut trimmed: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(bufs.len());
        for b in bufs {
            if left == 0 {
                break;
            }
            let k = b.len().min(left);
            trimmed.push(std::io::IoSlice::new(&b[..k]));
            left -= k;
        }
        let written = self.inner.write_vectored(&trimmed)?;
        Ok(written)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Stream for ShapedStream {
    crate::forward_stream!(inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_sharing_a_bucket_get_equal_shares() {
        // Two writers taking 64 KiB at a time from a 40 Mbit/s (5 MB/s) bucket for
        // 1.5 s (about 115 grants): each must get close to half, none may starve.
        // The margin leaves room for ~150 ms of wake-up delays on a loaded host.
        let b = TokenBucket::new(40_000_000);
        let stop = Instant::now() + Duration::from_millis(1500);
        let got: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut got = 0;
                        while Instant::now() < stop {
                            got += b.take(64 * 1024);
                        }
                        got
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("writer")).collect()
        });
        let (lo, hi) = (got[0].min(got[1]) as f64, got[0].max(got[1]) as f64);
        assert!(lo >= 0.6 * hi, "unequal shares: {got:?}");
    }

    #[test]
    fn bucket_paces_to_its_rate() {
        // 80 Mbit/s = 10 MB/s: taking 3 MB must take at least ~0.29 s (minus the burst).
        let b = TokenBucket::new(80_000_000);
        let t = Instant::now();
        let mut got = 0;
        while got < 3_000_000 {
            got += b.take(256 * 1024);
        }
        let secs = t.elapsed().as_secs_f64();
        let min = (3_000_000.0 - b.burst) / b.bytes_per_s();
        assert!(
            secs >= min * 0.95,
            "took {secs} s, expected at least {min} s"
        );
    }
}
