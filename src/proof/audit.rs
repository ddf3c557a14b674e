//! Audits of the source's memory against what was sent: they catch a dirty tracker
//! that missed a write, which the digest cannot (the digest compares what was sent
//! with what was applied).
//!
//! - [`SampledAudit`], during the rounds: after each harvest, re-hash a random sample
//!   of the pages the tracker calls clean and compare them with the ledger of what was
//!   sent. A page that differs is re-sent at once (a *suspect*). It is a tracker miss
//!   when the next harvest does not report it either: a write that landed between the
//!   harvest and the audit's read is reported by that next harvest, so only a write
//!   the tracker lost can leave a suspect unreported. On a miss the engine switches to
//!   a safe tracker ([`safe_tracker`]) for the rest of the migration.
//! - [`stale_pages`], after switchover: every page of the paused source against the
//!   ledger, outside the downtime. A stale page there is a page the destination holds
//!   in an older version.

use std::sync::Arc;

use crate::dirty::{DirtyTracker, HashScanTracker, TrackError, UnionTracker};
use crate::memory::{GuestMemory, MemoryError, PageSet};
use crate::proof::PageLedger;

/// How many clean pages the sampled audit checks after each harvest (policy).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditConfig {
    /// Most pages checked per round; 0 turns the sampled audit off.
    pub sample_pages: u32,
    /// Pages checked per page the round sent (before the cap). Re-hashing a page
    /// (a copy and an xxh3) costs less than sending it (the same copy and hash, then
    /// the socket and the destination), so checking 1/50 of the round's pages costs
    /// under 2 % of the round's time.
    pub round_share: f64,
    /// Pages checked per round at least (a round of a few pages costs far more in
    /// its fixed steps than 64 page reads).
    pub min_pages: u32,
    /// Seed of the page sampler (`None`: random per migration).
    pub seed: Option<u64>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            sample_pages: 4096,
            round_share: 0.02,
            min_pages: 64,
            seed: None,
        }
    }
}

impl AuditConfig {
    /// Pages to check after a round that sent `round_pages` pages.
    pub fn sample_size(&self, round_pages: u64) -> u64 {
        if self.sample_pages == 0 {
            return 0;
        }
        let share = (round_pages as f64 * self.round_share).ceil() as u64;
        share
            .max(self.min_pages as u64)
            .min(self.sample_pages as u64)
    }
}

/// The sampled audit's state across rounds.
#[derive(Debug)]
pub struct SampledAudit {
    cfg: AuditConfig,
    rng: u64,
    enabled: bool,
    /// Every page some harvest reported: writes the tracker lost are most likely
    /// among pages the guest writes, so half of each sample is drawn here.
    reported: PageSet,
    candidates: PageSet,
    suspects: Vec<u64>,
    picks: Vec<u64>,
    /// Pages re-hashed so far.
    pub checked: u64,
    /// Tracker misses confirmed so far.
    pub misses: u64,
    /// Time spent sampling and re-hashing so far.
    pub elapsed: std::time::Duration,
}

impl SampledAudit {
    /// An audit over `pages` pages.
    pub fn new(pages: u64, cfg: AuditConfig) -> Self {
        let seed = cfg.seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            // RandomState is seeded from the OS's random source once per process and
            // varied per instance: enough to make the sample unpredictable to a guest.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(pages);
            h.finish()
        });
        Self {
            cfg,
            rng: seed,
            enabled: cfg.sample_pages > 0,
            reported: PageSet::new(pages),
            candidates: PageSet::new(pages),
            suspects: Vec::new(),
            picks: Vec::new(),
            checked: 0,
            misses: 0,
            elapsed: std::time::Duration::ZERO,
        }
    }

    /// Is the audit still sampling?
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Stop sampling (the tracker now compares every page with what was sent at
    /// each harvest, which is a full audit). Pending suspects are still confirmed.
    pub fn disable(&mut self) {
        self.enabled = false;
    }

    /// Confirm the previous step's suspects against a new harvest: a suspect the
    /// harvest did not report is a tracker miss. Call it with every harvest,
    /// including the final one.
    pub fn confirm(&mut self, harvested: &PageSet) -> Vec<u64> {
        let missed: Vec<u64> = self
            .suspects
            .drain(..)
            .filter(|&p| !harvested.contains(p))
            .collect();
        self.misses += missed.len() as u64;
        self.reported.union_with(harvested);
        missed
    }

    /// After a harvest (and [`SampledAudit::confirm`]): check a sample of the pages
    /// not in `owed` (the tracker calls them clean and nothing is pending for them)
    /// against `sent`. Returns the pages to re-send now.
    pub fn sample(
        &mut self,
        mem: &GuestMemory,
        sent: &PageLedger,
        owed: &PageSet,
        round_pages: u64,
    ) -> Result<&[u64], MemoryError> {
        if !self.enabled {
            return Ok(&[]);
        }
        let started = std::time::Instant::now();
        let k = self.cfg.sample_size(round_pages);
        self.picks.clear();
        // Half among pages some harvest reported, the rest among all clean pages.
        self.candidates.clear();
        self.candidates.union_with(&self.reported);
        self.candidates.subtract(owed);
        let recent = k / 2;
        pick(&self.candidates, recent, &mut self.rng, &mut self.picks);
        let words = self.candidates.words_mut();
        words.iter_mut().for_each(|w| *w = !0);
        let pages = owed.capacity();
        if !pages.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        self.candidates.subtract(owed);
        let rest = k - self.picks.len() as u64;
        pick(&self.candidates, rest, &mut self.rng, &mut self.picks);
        self.picks.sort_unstable();
        self.picks.dedup();
        for &p in &self.picks {
            if mem.page_hash(p)? != sent.hash(p) {
                self.suspects.push(p);
            }
        }
        self.checked += self.picks.len() as u64;
        self.elapsed += started.elapsed();
        Ok(&self.suspects)
    }
}

/// Append up to `k` members of `set`, drawn uniformly with replacement (duplicates
/// are removed by the caller), to `out`: ranks are drawn, sorted, and found in one
/// pass over the words.
fn pick(set: &PageSet, k: u64, rng: &mut u64, out: &mut Vec<u64>) {
    let n = set.count();
    if n == 0 || k == 0 {
        return;
    }
    if n <= k {
        out.extend(set.iter());
        return;
    }
    let start = out.len();
    for _ in 0..k {
        // Lemire's multiply-shift: uniform enough in [0, n) for n ≪ 2^64.
        let r = ((crate::rng::splitmix(rng) as u128 * n as u128) >> 64) as u64;
        out.push(r);
    }
    out[start..].sort_unstable();
    let mut before = 0u64; // members in earlier words
    let mut wi = 0usize;
    let words = set.words();
    for slot in out[start..].iter_mut() {
        let rank = *slot;
        while before + words[wi].count_ones() as u64 <= rank {
            before += words[wi].count_ones() as u64;
            wi += 1;
        }
        let mut w = words[wi];
        for _ in 0..rank - before {
            w &= w - 1;
        }
        *slot = wi as u64 * 64 + w.trailing_zeros() as u64;
    }
}

/// Every page of `mem` whose content differs from `sent` (page indexes, ascending),
/// hashed by `threads` threads. Run on the paused source after switchover.
pub fn stale_pages(
    mem: &GuestMemory,
    sent: &PageLedger,
    threads: usize,
) -> Result<Vec<u64>, MemoryError> {
    let n = mem.total_pages();
    let threads = threads.max(1) as u64;
    let chunk = n.div_ceil(threads).max(1);
    let parts: Vec<Result<Vec<u64>, MemoryError>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut stale = Vec::new();
                    for p in t * chunk..((t + 1) * chunk).min(n) {
                        if mem.page_hash(p)? != sent.hash(p) {
                            stale.push(p);
                        }
                    }
                    Ok(stale)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("audit thread panicked"))
            .collect()
    });
    let mut all = Vec::new();
    for p in parts {
        all.extend(p?);
    }
    Ok(all)
}

/// The tracker to continue with after a miss: the old one united with a
/// [`HashScanTracker`] that compares every page with what was sent at each harvest.
/// A harvest then costs one hash of all memory, and nothing stale can stay
/// unreported.
pub fn safe_tracker(
    old: Box<dyn DirtyTracker>,
    sent: &Arc<PageLedger>,
    mem: &GuestMemory,
    threads: usize,
) -> Result<Box<dyn DirtyTracker>, TrackError> {
    let mut scan = HashScanTracker::new(threads);
    scan.follow_sent(sent);
    scan.start(mem)?;
    Ok(Box::new(UnionTracker::new(vec![old, Box::new(scan)])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE;

    #[test]
    fn pick_returns_members_only_and_all_when_few() {
        let mut s = PageSet::new(1000);
        for p in [3u64, 64, 65, 500, 999] {
            s.insert(p);
        }
        let mut rng = 7;
        let mut out = Vec::new();
        pick(&s, 10, &mut rng, &mut out);
        assert_eq!(out, vec![3, 64, 65, 500, 999]);
        let mut big = PageSet::new(10_000);
        for p in (0..10_000).step_by(3) {
            big.insert(p);
        }
        out.clear();
        pick(&big, 500, &mut rng, &mut out);
        assert_eq!(out.len(), 500);
        assert!(out.iter().all(|&p| big.contains(p)), "{out:?}");
        // Spread: both halves of the range are drawn from.
        assert!(out.iter().any(|&p| p < 5000) && out.iter().any(|&p| p >= 5000));
    }

    #[test]
    fn sample_size_follows_the_round_and_the_caps() {
        let c = AuditConfig::default();
        assert_eq!(c.sample_size(10), 64);
        assert_eq!(c.sample_size(100_000), 2000);
        assert_eq!(c.sample_size(10_000_000), 4096);
        let off = AuditConfig {
            sample_pages: 0,
            ..c
        };
        assert_eq!(off.sample_size(100_000), 0);
    }

    #[test]
    fn a_lost_write_is_a_suspect_then_a_miss_and_a_reported_one_is_not() {
        let mem = GuestMemory::anonymous(64 * PAGE_SIZE, false).unwrap();
        let sent = PageLedger::new(64);
        let mut d = crate::proof::DigestDelta::default();
        for p in 0..64 {
            sent.record(p, mem.page_hash(p).unwrap(), &mut d);
        }
        // Two pages written after they were sent: 5 (the tracker lost the write)
        // and 9 (written after the harvest: the next harvest reports it).
        mem.write_pages(5, &[1u8; PAGE_SIZE]).unwrap();
        mem.write_pages(9, &[2u8; PAGE_SIZE]).unwrap();
        let mut a = SampledAudit::new(
            64,
            AuditConfig {
                sample_pages: 64,
                round_share: 1.0,
                min_pages: 64,
                seed: Some(1),
            },
        );
        let owed = PageSet::new(64);
        assert!(a.confirm(&owed).is_empty());
        let suspects = a.sample(&mem, &sent, &owed, 64).unwrap().to_vec();
        assert_eq!(suspects, vec![5, 9]);
        assert_eq!(a.checked, 64);
        let mut next = PageSet::new(64);
        next.insert(9);
        assert_eq!(a.confirm(&next), vec![5]);
        assert_eq!(a.misses, 1);
        // Owed pages are never sampled.
        let mut owed = PageSet::full(64);
        owed.remove(1);
        assert!(a.sample(&mem, &sent, &owed, 64).unwrap().is_empty());
        assert_eq!(a.checked, 65);
        assert_eq!(stale_pages(&mem, &sent, 3).unwrap(), vec![5, 9]);
    }
}
