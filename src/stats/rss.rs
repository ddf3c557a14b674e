//! The process's anonymous resident memory, sampled: how much memory a migration
//! costs on top of the guest. For a file-backed guest (`livemig send --image`),
//! every anonymous byte is the engine's own (hash table, page sets, buffers, thread
//! stacks, caches), so the peak of `RssAnon` is the sender's memory overhead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Current `RssAnon` of this process in bytes: resident less shared pages of
/// `/proc/self/statm`, which the kernel counts as exactly the anonymous ones.
///
/// Each thread keeps the file open and re-reads it in place: opening, sizing and
/// formatting `/proc/self/status` every 5 ms took 1.4 % of the CPU of a `send` on
/// this machine (`perf record -a`, thread `livemig-rss`).
pub fn anon_rss_bytes() -> Option<u64> {
    use std::os::unix::fs::FileExt;
    thread_local! {
        static STATM: std::cell::RefCell<Option<std::fs::File>> =
            const { std::cell::RefCell::new(None) };
    }
    STATM.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            *slot = std::fs::File::open("/proc/self/statm").ok();
        }
        let mut buf = [0u8; 256];
        let n = slot.as_ref()?.read_at(&mut buf, 0).ok()?;
        parse_statm(&buf[..n], crate::memory::host_page_size() as u64)
    })
}

/// `RssAnon` in bytes from `/proc/PID/statm` (`size resident shared …`, in pages).
fn parse_statm(b: &[u8], page_bytes: u64) -> Option<u64> {
    let mut fields = std::str::from_utf8(b).ok()?.split_ascii_whitespace();
    let _size = fields.next()?;
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    Some(resident.checked_sub(shared)? * page_bytes)
}

/// `RssAnon` in bytes from `/proc/PID/status` (for the tests' cross-check).
#[cfg(test)]
fn status_anon_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib(&status, "RssAnon:")
}

#[cfg(test)]
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
    /// Start sampling; `None` where `/proc/self/statm` cannot be read.
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
    fn parses_statm() {
        assert_eq!(
            parse_statm(b"1000 300 100 5 0 400 0\n", 4096),
            Some(200 * 4096)
        );
        assert_eq!(parse_statm(b"1000 300", 4096), None);
        assert_eq!(parse_statm(b"1000 100 300 5 0 400 0\n", 4096), None);
        assert_eq!(parse_statm(b"x y z", 4096), None);
    }

    /// statm's resident less shared is the kernel's anonymous count, the one
    /// `/proc/self/status` prints as `RssAnon`, not the whole resident set (which
    /// includes this binary's mapped file pages). Other tests of this process
    /// allocate meanwhile, so a pair of reads may straddle a change: one of a few
    /// pairs must agree within 1 MiB.
    #[test]
    fn statm_reads_anonymous_pages_as_status_does() {
        let agree = || {
            (0..20).any(|_| {
                let m = anon_rss_bytes().unwrap();
                let s = status_anon_rss_bytes().unwrap();
                m.abs_diff(s) <= 1 << 20
            })
        };
        assert!(agree());
        let big = std::hint::black_box(vec![1u8; 64 << 20]);
        assert!(agree());
        drop(big);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let file = parse_kib(&status, "RssFile:").unwrap();
        assert!(file > 1 << 20, "this binary's file pages: {file}");
    }

    #[test]
    fn real_rss_is_read() {
        let s = AnonRssSampler::start(Duration::from_millis(1)).expect("RssAnon on Linux");
        let seen = s.finish();
        assert!(seen.start_bytes > 0 && seen.peak_bytes >= seen.start_bytes);
    }
}
