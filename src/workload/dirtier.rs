//! Dirtier threads: the simulated guest's CPUs writing memory at a target rate.
//!
//! Each write stores a counter into one 8-byte word of a page of the hot set, then
//! marks the page in an optional explicit bitmap (after the write, as the explicit
//! tracker's contract requires). The dirtier implements [`VmControl`]: `pause`
//! returns only when every thread has stopped writing, `throttle` slows the rate.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::splitmix;
use crate::engine::VmControl;
use crate::memory::{DirtyBitmap, GuestMemory, PAGE_SIZE};

/// How writes spread over the hot set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Skew {
    /// Every page equally likely.
    Uniform,
    /// 80 % of writes go to the first 20 % of the hot set.
    Hot80_20,
}

/// Dirtier settings.
#[derive(Debug, Clone)]
pub struct DirtierConfig {
    /// Target rate in bytes of pages dirtied per second (pages × 4 KiB).
    pub rate_bytes_per_s: u64,
    /// Hot-set size in bytes.
    pub hot_set_bytes: u64,
    /// First byte of the hot set.
    pub hot_set_offset: u64,
    /// Spread.
    pub skew: Skew,
    /// Threads.
    pub threads: usize,
    /// Move the hot set by its own size after this long (phase change), if set.
    pub phase_change_after: Option<Duration>,
    /// Seed.
    pub seed: u64,
}

impl Default for DirtierConfig {
    fn default() -> Self {
        Self {
            rate_bytes_per_s: 100_000_000,
            hot_set_bytes: 64 << 20,
            hot_set_offset: 0,
            skew: Skew::Uniform,
            threads: 1,
            phase_change_after: None,
            seed: 1,
        }
    }
}

#[derive(Debug)]
struct DirtierState {
    stop: AtomicBool,
    pause: AtomicBool,
    paused_threads: AtomicUsize,
    throttle: AtomicU8,
    writes: AtomicU64,
}

/// Running dirtier threads.
#[derive(Debug)]
pub struct Dirtier {
    ctl: Arc<DirtierState>,
    threads: Vec<JoinHandle<()>>,
    n: usize,
}

impl Dirtier {
    /// Start dirtying `mem`; marks go to `bitmap` when given.
    pub fn start(
        mem: Arc<GuestMemory>,
        bitmap: Option<Arc<DirtyBitmap>>,
        cfg: DirtierConfig,
    ) -> Self {
        let ctl = Arc::new(DirtierState {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            paused_threads: AtomicUsize::new(0),
            throttle: AtomicU8::new(0),
            writes: AtomicU64::new(0),
        });
        let n = if cfg.rate_bytes_per_s == 0 {
            0
        } else {
            cfg.threads.max(1)
        };
        let threads = (0..n)
            .map(|t| {
                let (mem, bitmap, cfg, ctl) =
                    (mem.clone(), bitmap.clone(), cfg.clone(), ctl.clone());
                std::thread::Builder::new()
                    .name(format!("dirtier{t}"))
                    .spawn(move || run(t, n, &mem, bitmap.as_deref(), &cfg, &ctl))
                    .expect("spawn dirtier")
            })
            .collect();
        Self { ctl, threads, n }
    }

    /// Total writes so far.
    pub fn writes(&self) -> u64 {
        self.ctl.writes.load(Ordering::Relaxed)
    }

    /// Stop and join the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }

    /// A cloneable [`VmControl`] handle for the engine.
    pub fn control(&self) -> DirtierControl {
        DirtierControl {
            ctl: self.ctl.clone(),
            n: self.n,
        }
    }
}

impl Drop for Dirtier {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// [`VmControl`] for a [`Dirtier`].
#[derive(Debug, Clone)]
pub struct DirtierControl {
    ctl: Arc<DirtierState>,
    n: usize,
}

impl DirtierControl {
    /// Is the simulated guest paused?
    pub fn is_paused(&self) -> bool {
        self.ctl.pause.load(Ordering::SeqCst)
    }
}

impl VmControl for DirtierControl {
    fn pause(&mut self) -> Result<(), crate::engine::VmControlError> {
        self.ctl.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.ctl.paused_threads.load(Ordering::SeqCst) < self.n {
            if self.ctl.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("dirtier threads did not pause within 5 s".into());
            }
            std::thread::yield_now();
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), crate::engine::VmControlError> {
        self.ctl.pause.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn throttle(&mut self, percent: u8) -> Result<(), crate::engine::VmControlError> {
        self.ctl.throttle.store(percent.min(99), Ordering::SeqCst);
        Ok(())
    }
}

fn run(
    t: usize,
    n: usize,
    mem: &GuestMemory,
    bitmap: Option<&DirtyBitmap>,
    cfg: &DirtierConfig,
    ctl: &DirtierState,
) {
    let total = mem.total_pages();
    let hot_pages = (cfg.hot_set_bytes / PAGE_SIZE as u64).clamp(1, total);
    let mut base = (cfg.hot_set_offset / PAGE_SIZE as u64).min(total - hot_pages);
    let mut rng = cfg.seed ^ (t as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let per_thread_rate = cfg.rate_bytes_per_s as f64 / PAGE_SIZE as f64 / n as f64; // pages/s
    let start = Instant::now();
    let mut budget_start = Instant::now();
    let mut done_in_window = 0u64;
    let mut counter = 0u64;
    let mut phase_changed = false;
    while !ctl.stop.load(Ordering::Relaxed) {
        if ctl.pause.load(Ordering::Acquire) {
            ctl.paused_threads.fetch_add(1, Ordering::SeqCst);
            while ctl.pause.load(Ordering::Acquire) && !ctl.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(200));
            }
            ctl.paused_threads.fetch_sub(1, Ordering::SeqCst);
            budget_start = Instant::now();
            done_in_window = 0;
            continue;
        }
        if let Some(after) = cfg.phase_change_after {
            if !phase_changed && start.elapsed() >= after {
                phase_changed = true;
                base = (base + hot_pages) % (total - hot_pages + 1);
            }
        }
        // Rate control in 1 ms windows, scaled down by the throttle.
        let throttle = ctl.throttle.load(Ordering::Relaxed) as f64 / 100.0;
        let rate = per_thread_rate * (1.0 - throttle);
        let elapsed = budget_start.elapsed().as_secs_f64();
        let allowed = (rate * elapsed) as u64;
        if done_in_window >= allowed {
            std::thread::sleep(Duration::from_micros(500));
            if elapsed > 1.0 {
                budget_start = Instant::now();
                done_in_window = 0;
            }
            continue;
        }
        for _ in 0..(allowed - done_in_window).min(256) {
            let r = splitmix(&mut rng);
            let page = match cfg.skew {
                Skew::Uniform => r % hot_pages,
                Skew::Hot80_20 => {
                    let hot = (hot_pages / 5).max(1);
                    if r % 10 < 8 {
                        (r >> 8) % hot
                    } else {
                        (r >> 8) % hot_pages
                    }
                }
            };
            let index = base + page;
            let word = ((r >> 40) % (PAGE_SIZE as u64 / 8)) as usize;
            counter = counter.wrapping_add(1);
            let (region, rp) = match mem.locate(index) {
                Ok(x) => x,
                Err(_) => continue,
            };
            let _ = mem.regions()[region]
                .write_u64(rp as usize * PAGE_SIZE + word * 8, counter | 1 << 63);
            if let Some(b) = bitmap {
                b.mark(index);
            }
            done_in_window += 1;
            ctl.writes.fetch_add(1, Ordering::Relaxed);
        }
    }
}
