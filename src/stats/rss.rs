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
        let start = anon_rss_bytes()?;
        let peak = Arc::new(AtomicU64::new(start));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("livemig-rss".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(v) = anon_rss_bytes() {
                        p.fetch_max(v, Ordering::Relaxed);
                    }
                    std::thread::sleep(period);
                }
            })
            .ok()?;
        Some(Self {
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
        if let Some(v) = anon_rss_bytes() {
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

    #[test]
    fn sampler_sees_an_allocation_it_outlived() {
        let s = AnonRssSampler::start(Duration::from_millis(1)).expect("RssAnon on Linux");
        let mut v = vec![0u8; 64 << 20];
        for page in v.chunks_mut(4096) {
            page[0] = 1; // make it resident
        }
        std::thread::sleep(Duration::from_millis(20));
        drop(std::hint::black_box(v));
        let seen = s.finish();
        assert!(
            seen.peak_bytes >= seen.start_bytes + (60 << 20),
            "peak {} vs start {}",
            seen.peak_bytes,
            seen.start_bytes
        );
    }
}
