//! The campaign's guest: memory whose every page is a known function of (page,
//! version), a dirtier thread that writes new versions while rounds run, and
//! the `VmControl` that pauses it and tells the [`Ledger`].
//!
//! The version of each page is recorded after the page is written, and the
//! dirtier stops between two writes when paused, so a paused guest's memory is
//! exactly [`page_content`] of the recorded versions: [`Guest::model_mismatches`]
//! finds any page the engine damaged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ledger::Ledger;
use super::ChaosError;
use crate::engine::{VmControl, VmControlError};
use crate::memory::{DirtyBitmap, GuestMemory, MemoryError, PAGE_SIZE};
use crate::rng::splitmix;

/// How long `pause` waits for the dirtier to stop.
const PAUSE_WAIT: Duration = Duration::from_secs(2);

/// The content of `page` at `version` for a guest seeded with `seed`: version 0
/// of every fourth page is zero (the zero-page path), anything else 512 words
/// drawn from (seed, page, version).
pub fn page_content(seed: u64, page: u64, version: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), PAGE_SIZE);
    if version == 0 && page.is_multiple_of(4) {
        out.fill(0);
        return;
    }
    let mut s = seed ^ page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.rotate_left(32);
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&splitmix(&mut s).to_le_bytes());
    }
}

#[derive(Debug)]
struct GuestState {
    stop: AtomicBool,
    pause: AtomicBool,
    paused: AtomicBool,
    writes: AtomicU64,
}

/// A running guest with a shadow model of its memory.
#[derive(Debug)]
pub struct Guest {
    /// Its memory.
    pub memory: Arc<GuestMemory>,
    /// The dirty bitmap the dirtier marks (for an `ExplicitTracker`).
    pub bitmap: Arc<DirtyBitmap>,
    versions: Arc<Vec<AtomicU64>>,
    seed: u64,
    ctl: Arc<GuestState>,
    thread: Option<JoinHandle<()>>,
}

impl Guest {
    /// `pages` of memory at version 0, and a dirtier writing `rate` pages per
    /// second among the first `hot` pages (80 % of writes to the first fifth).
    pub fn start(pages: u64, hot: u64, rate: u64, seed: u64) -> Result<Self, ChaosError> {
        let memory = Arc::new(GuestMemory::anonymous(pages as usize * PAGE_SIZE, false)?);
        let mut buf = vec![0u8; PAGE_SIZE];
        for p in 0..pages {
            page_content(seed, p, 0, &mut buf);
            memory.write_pages(p, &buf)?;
        }
        let bitmap = Arc::new(DirtyBitmap::new(pages));
        let versions: Arc<Vec<AtomicU64>> =
            Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect());
        let ctl = Arc::new(GuestState {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            writes: AtomicU64::new(0),
        });
        let thread = {
            let (memory, bitmap, versions, ctl) = (
                memory.clone(),
                bitmap.clone(),
                versions.clone(),
                ctl.clone(),
            );
            let hot = hot.clamp(1, pages);
            std::thread::Builder::new()
                .name("chaos-guest".into())
                .spawn(move || dirty(&memory, &bitmap, &versions, &ctl, seed, hot, rate))
                .map_err(|source| ChaosError::Spawn {
                    what: "guest",
                    source,
                })?
        };
        Ok(Self {
            memory,
            bitmap,
            versions,
            seed,
            ctl,
            thread: Some(thread),
        })
    }

    /// A `VmControl` for the engine (or the operator) that reports to `ledger`.
    pub fn control(&self, ledger: Arc<Ledger>) -> GuestVm {
        GuestVm {
            ctl: self.ctl.clone(),
            ledger,
        }
    }

    /// Writes so far.
    pub fn writes(&self) -> u64 {
        self.ctl.writes.load(Ordering::Relaxed)
    }

    /// Whether the guest writes: its write count moves within `wait`.
    pub fn makes_progress(&self, wait: Duration) -> bool {
        let w0 = self.writes();
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if self.writes() != w0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Stop the dirtier for good (end of run), so memory can be checked.
    pub fn halt(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Pages whose content differs from the model of their recorded version
    /// (call with the dirtier paused or halted).
    pub fn model_mismatches(&self) -> Result<Vec<u64>, MemoryError> {
        let mut want = vec![0u8; PAGE_SIZE];
        let mut have = vec![0u8; PAGE_SIZE];
        let mut bad = Vec::new();
        for (p, v) in self.versions.iter().enumerate() {
            let p = p as u64;
            page_content(self.seed, p, v.load(Ordering::Acquire), &mut want);
            self.memory.read_pages(p, &mut have)?;
            if want != have {
                bad.push(p);
            }
        }
        Ok(bad)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.halt();
    }
}

fn dirty(
    memory: &GuestMemory,
    bitmap: &DirtyBitmap,
    versions: &[AtomicU64],
    ctl: &GuestState,
    seed: u64,
    hot: u64,
    rate: u64,
) {
    let mut rng = seed ^ 0xD1B5_4A32_D192_ED03;
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut window = Instant::now();
    let mut done = 0u64;
    while !ctl.stop.load(Ordering::Relaxed) {
        if ctl.pause.load(Ordering::Acquire) {
            ctl.paused.store(true, Ordering::Release);
            while ctl.pause.load(Ordering::Acquire) && !ctl.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(200));
            }
            ctl.paused.store(false, Ordering::Release);
            window = Instant::now();
            done = 0;
            continue;
        }
        let allowed = (rate as f64 * window.elapsed().as_secs_f64()) as u64;
        if done >= allowed {
            std::thread::sleep(Duration::from_micros(500));
            if window.elapsed() > Duration::from_secs(1) {
                window = Instant::now();
                done = 0;
            }
            continue;
        }
        let r = splitmix(&mut rng);
        let page = if r % 10 < 8 {
            (r >> 8) % (hot / 5).max(1)
        } else {
            (r >> 8) % hot
        };
        let v = versions[page as usize].load(Ordering::Relaxed) + 1;
        page_content(seed, page, v, &mut buf);
        if memory.write_pages(page, &buf).is_err() {
            continue;
        }
        versions[page as usize].store(v, Ordering::Release);
        bitmap.mark(page);
        done += 1;
        ctl.writes.fetch_add(1, Ordering::Relaxed);
    }
    ctl.paused.store(true, Ordering::Release);
}

/// The guest's `VmControl`: pauses and resumes the dirtier and tells the ledger.
#[derive(Debug, Clone)]
pub struct GuestVm {
    ctl: Arc<GuestState>,
    ledger: Arc<Ledger>,
}

impl GuestVm {
    /// Pause without telling the ledger (the harness looking at memory after
    /// the run, not the VM changing hands).
    pub fn freeze(&self) -> bool {
        pause(&self.ctl)
    }
}

fn pause(ctl: &GuestState) -> bool {
    ctl.pause.store(true, Ordering::SeqCst);
    let until = Instant::now() + PAUSE_WAIT;
    while !ctl.paused.load(Ordering::Acquire) {
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    true
}

impl VmControl for GuestVm {
    fn pause(&mut self) -> Result<(), VmControlError> {
        if pause(&self.ctl) {
            self.ledger.source(false, "pause");
            Ok(())
        } else {
            Err(format!("the guest did not pause within {PAUSE_WAIT:?}").into())
        }
    }
    fn resume(&mut self) -> Result<(), VmControlError> {
        // Running from the instant the resume starts (strict for the ledger).
        self.ledger.source(true, "resume");
        self.ctl.pause.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn throttle(&mut self, _percent: u8) -> Result<(), VmControlError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_guest_matches_its_model_and_damage_is_found() {
        let mut g = Guest::start(64, 16, 20_000, 5).unwrap();
        assert!(g.makes_progress(Duration::from_secs(2)));
        let vm = g.control(Arc::new(Ledger::new()));
        assert!(vm.freeze());
        assert!(g.model_mismatches().unwrap().is_empty());
        g.halt();
        // Damage one byte of page 3.
        let mut buf = vec![0u8; PAGE_SIZE];
        g.memory.read_pages(3, &mut buf).unwrap();
        buf[100] ^= 1;
        g.memory.write_pages(3, &buf).unwrap();
        assert_eq!(g.model_mismatches().unwrap(), vec![3]);
    }
}
