//! The process's anonymous resident memory, sampled: how much memory a migration
//! costs on top of the guest. For a file-backed guest (`livemig send --image`),
//! every anonymous byte is the engine's own (hash table, page sets, buffers, thread
//! stacks, caches), so the peak of `RssAnon` is the sender's memory overhead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Current `RssAnon` of this process in bytes (Linux `/proc/self/status`).
pub fn anon_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib(&status, "RssAnon:")
}

fn parse_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Samples `RssAnon` every `period` on a thread until stopped; keeps the maximum.
#[derive(Debug)]
pub struct AnonRssSampler {
    read: fn() -> Option<u64>,
    start: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What a sampler saw.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct AnonRss {
    /// `RssAnon` when sampling started.
    pub start_bytes: u64,
    /// The largest `RssAnon` sampled (start and end included).
    pub peak_bytes: u64,
}

impl AnonRssSampler {
    /// Start sampling; `None` where `/proc/self/status` has no `RssAnon`.
    pub fn start(period: Duration) -> Option<Self> {
        Self::start_with(period, anon_rss_bytes)
    }

    /// Start sampling values from `read` (the process's `RssAnon` in production).
    fn start_with(period: Duration, read: fn() -> Option<u64>) -> Option<Self> {
        let start = read()?;
        let peak = Arc::new(AtomicU64::new(start));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("livemig-rss".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(v) = read() {
                        p.fetch_max(v, Ordering::Relaxed);
                    }
                    std::thread::sleep(period);
                }
            })
            .ok()?;
        Some(Self {
            read,
            start,
            peak,
            stop,
            thread: Some(thread),
        })
    }

    /// Stop sampling (taking one last sample) and return what was seen.
    pub fn finish(mut self) -> AnonRss {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(v) = (self.read)() {
            self.peak.fetch_max(v, Ordering::Relaxed);
        }
        AnonRss {
            start_bytes: self.start,
            peak_bytes: self.peak.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        let s = "Name:\tx\nRssAnon:\t   12345 kB\nRssFile:\t 7 kB\n";
        assert_eq!(parse_kib(s, "RssAnon:"), Some(12345 * 1024));
        assert_eq!(parse_kib(s, "RssShmem:"), None);
        assert_eq!(parse_kib("RssAnon: lots", "RssAnon:"), None);
    }

    /// A rise and fall between start and finish is kept as the peak. (The process's
    /// real RssAnon cannot be used for this: parallel tests in the same process
    /// allocate and free memory at any time.)
    #[test]
    fn sampler_keeps_a_peak_it_outlived() {
        use std::sync::atomic::AtomicU64;
        static VALUE: AtomicU64 = AtomicU64::new(10);
        fn read() -> Option<u64> {
            Some(VALUE.load(Ordering::Relaxed))
        }
        let s = AnonRssSampler::start_with(Duration::from_millis(1), read).unwrap();
        VALUE.store(500, Ordering::Relaxed);
        // Wait (bounded) until the sampling thread has seen the high value.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.peak.load(Ordering::Relaxed) < 500 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        VALUE.store(20, Ordering::Relaxed);
        let seen = s.finish();
        assert_eq!(seen.start_bytes, 10);
        assert_eq!(seen.peak_bytes, 500);
    }

    #[test]
    fn real_rss_is_read() {
        let s = AnonRssSampler::start(Duration::from_millis(1)).expect("RssAnon on Linux");
        let seen = s.finish();
        assert!(seen.start_bytes > 0 && seen.peak_bytes >= seen.start_bytes);
    }
}
