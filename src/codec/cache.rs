//! The sender's bounded cache of previously sent page contents, for delta encoding.
//!
//! Keyed by page index; each entry holds the exact bytes the sender put on the wire
//! for that page (from its copy buffer, never from live guest memory), which is what
//! the receiver holds after applying it. A page found in the cache is sent as a
//! [`delta`] against that entry.
//!
//! **Budget and layout.** All slots are allocated once (`budget / PAGE_SIZE` of
//! them); the hot path copies into an existing slot and never allocates. Entries
//! are evicted by CLOCK (second chance), per shard.
//!
//! **Concurrency.** Several sender workers encode at once. Within a round each page
//! is in exactly one batch, so workers never race on one entry; they only share
//! shards. Pages map to `SHARDS` shards by index, each behind its own mutex, so two
//! workers rarely wait on each other (a lock is held for one page's diff and copy,
//! about a microsecond).
//!
//! **Policy.** Round 0 sends every page once; most are never written again, so
//! caching them would churn the cache through all of memory and evict the pages
//! that matter. Pages are cached from round 1 on: a page re-sent there is one the
//! guest writes during the migration, the likeliest to be re-sent again (QEMU's
//! XBZRLE makes the same choice by skipping its bulk stage). Measured (512 MiB mix
//! guest, 32 MiB hot set at 200 MB/s, cache 1/16 of memory, 3 runs each): caching
//! round 0 as well left the bytes sent after round 0 unchanged in compress mode
//! (11.9 vs 11.7 MB, median), because round 0 cycles all of memory through the
//! cache and evicts the hot set, and in multichannel mode it made the whole
//! migration 2.6× slower (793 vs 308 ms) for deltas in 1 run of 3.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use super::delta;
use crate::memory::PAGE_SIZE;

/// Shards (power of two). 64 keeps the chance that two workers want the same shard
/// at once low for any stream count this machine can drive, at 64 mutexes' cost.
const SHARDS: usize = 64;

/// Record kinds of a delta record stream (the payload of a `FLAG_DELTA` batch).
pub const RECORD_FULL: u8 = 1;
/// A delta record: `len u32` then `len` delta bytes.
pub const RECORD_DELTA: u8 = 2;

/// Would a page sent in `round` be cached? (See the policy above.)
#[inline]
pub fn caches_round(round: u32) -> bool {
    round >= 1
}

/// Default cache budget for a guest of `memory_bytes`: 1/16 of guest memory, at
/// least 1 MiB and at most 1 GiB.
pub fn default_budget(memory_bytes: u64) -> u64 {
    (memory_bytes / 16).clamp(1 << 20, 1 << 30)
}

/// Hashes a page-index key with one multiply (keys are small integers; SipHash
/// would cost more than the rest of the lookup).
#[derive(Debug, Default)]
struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

const EMPTY: u64 = u64::MAX;

#[derive(Debug)]
struct Shard {
    data: Box<[u8]>,
    owner: Box<[u64]>,
    referenced: Box<[bool]>,
    map: HashMap<u64, u32, BuildHasherDefault<IndexHasher>>,
    hand: usize,
}

impl Shard {
    fn new(slots: usize) -> Self {
        Self {
            data: vec![0u8; slots * PAGE_SIZE].into_boxed_slice(),
            owner: vec![EMPTY; slots].into_boxed_slice(),
            referenced: vec![false; slots].into_boxed_slice(),
            // Never holds more than `slots` entries: no rehash after this.
            map: HashMap::with_capacity_and_hasher(slots, Default::default()),
            hand: 0,
        }
    }

    /// CLOCK: the first free slot, or the first unreferenced one, clearing
    /// reference bits on the way (at most two sweeps).
    fn victim(&mut self) -> usize {
        let n = self.owner.len();
        loop {
            let s = self.hand;
            self.hand = (self.hand + 1) % n;
            if self.owner[s] == EMPTY {
                return s;
            }
            if self.referenced[s] {
                self.referenced[s] = false;
            } else {
                return s;
            }
        }
    }

    fn slot(&mut self, s: usize) -> &mut [u8] {
        &mut self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE]
    }
}

/// What [`DeltaCache::diff_and_update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The page was cached: a delta of this many bytes was appended to `out`.
    Delta(usize),
    /// The page was cached but the delta would be too large: send the full page.
    TooLarge,
    /// Not cached (now inserted if `insert` was set): send the full page.
    Miss,
}

/// Sharded, bounded page cache (see the module docs).
#[derive(Debug)]
pub struct DeltaCache {
    shards: Box<[Mutex<Shard>]>,
    mask: u64,
    slots: usize,
}

impl DeltaCache {
    /// A cache holding up to `budget_bytes / PAGE_SIZE` pages (at least one).
    pub fn new(budget_bytes: u64) -> Self {
        let slots = ((budget_bytes / PAGE_SIZE as u64) as usize).max(1);
        let mut shards = SHARDS;
        while shards > slots {
            shards /= 2;
        }
        let per = slots / shards;
        Self {
            shards: (0..shards).map(|_| Mutex::new(Shard::new(per))).collect(),
            mask: shards as u64 - 1,
            slots: per * shards,
        }
    }

    /// Pages the cache can hold.
    pub fn capacity_pages(&self) -> usize {
        self.slots
    }

    /// Pages cached now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("cache shard").map.len())
            .sum()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, index: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(index & self.mask) as usize]
            .lock()
            .expect("cache shard")
    }

    /// `new` (one page) is about to be sent for page `index`. If the page is
    /// cached, append its delta against the cached version to `out` (when at most
    /// `limit` bytes); either way the cached version becomes `new`, which is what
    /// the receiver will hold. If not cached and `insert`, cache it (evicting).
    pub fn diff_and_update(
        &self,
        index: u64,
        new: &[u8],
        insert: bool,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Lookup {
        let mut sh = self.shard(index);
        if let Some(&s) = sh.map.get(&index) {
            let s = s as usize;
            sh.referenced[s] = true;
            let slot = sh.slot(s);
            let r = delta::encode(slot, new, out, limit);
            slot.copy_from_slice(new);
            return match r {
                Some(n) => Lookup::Delta(n),
                None => Lookup::TooLarge,
            };
        }
        if insert {
            let s = sh.victim();
            let old = sh.owner[s];
            if old != EMPTY {
                sh.map.remove(&old);
            }
            sh.owner[s] = index;
            sh.referenced[s] = false;
            sh.slot(s).copy_from_slice(new);
            sh.map.insert(index, s as u32);
        }
        Lookup::Miss
    }

    /// Forget page `index` (it was sent in a form whose bytes were not cached: as a
    /// zero page, or zero-copy from guest memory).
    pub fn invalidate(&self, index: u64) {
        let mut sh = self.shard(index);
        if let Some(s) = sh.map.remove(&index) {
            sh.owner[s as usize] = EMPTY;
            sh.referenced[s as usize] = false;
        }
    }

    /// Build the delta record stream for a batch's non-zero pages (`pages`,
    /// concatenated, with their page `indexes`) sent in `round`, into `out`
    /// (cleared first). Returns (delta records, bytes saved against full records).
    pub fn encode_records(
        &self,
        round: u32,
        pages: &[u8],
        indexes: &[u64],
        out: &mut Vec<u8>,
    ) -> (u64, u64) {
        debug_assert_eq!(pages.len(), indexes.len() * PAGE_SIZE);
        out.clear();
        let insert = caches_round(round);
        let (mut deltas, mut saved) = (0u64, 0u64);
        for (page, &index) in pages.chunks_exact(PAGE_SIZE).zip(indexes) {
            let at = out.len();
            out.push(RECORD_DELTA);
            out.extend_from_slice(&[0; 4]);
            match self.diff_and_update(index, page, insert, delta::MAX_DELTA_LEN, out) {
                Lookup::Delta(n) => {
                    out[at + 1..at + 5].copy_from_slice(&(n as u32).to_le_bytes());
                    deltas += 1;
                    saved += (PAGE_SIZE - 4 - n) as u64;
                }
                Lookup::TooLarge | Lookup::Miss => {
                    out.truncate(at);
                    out.push(RECORD_FULL);
                    out.extend_from_slice(page);
                }
            }
        }
        (deltas, saved)
    }
}

/// One record of a delta record stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// The full page (exactly `PAGE_SIZE` bytes).
    Full(&'a [u8]),
    /// A delta to apply onto the destination's current page.
    Delta(&'a [u8]),
}

/// Why a record stream is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The stream ended before the record's kind.
    #[error("record stream ends early")]
    Missing,
    /// Unknown kind byte.
    #[error("unknown record kind {0}")]
    Kind(u8),
    /// The record's body is cut short.
    #[error("{0} record is truncated")]
    Truncated(&'static str),
    /// Bytes remain after the last record.
    #[error("{0} bytes left over after the last record")]
    Trailing(usize),
}

/// Walks a decoded record stream, bounds-checking every length; never panics.
#[derive(Debug)]
pub struct RecordReader<'a> {
    buf: &'a [u8],
    off: usize,
}

impl<'a> RecordReader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, off: 0 }
    }

    /// The next record.
    pub fn next_record(&mut self) -> Result<Record<'a>, RecordError> {
        let rest = &self.buf[self.off..];
        let (&kind, body) = rest.split_first().ok_or(RecordError::Missing)?;
        match kind {
            RECORD_FULL => {
                let page = body
                    .get(..PAGE_SIZE)
                    .ok_or(RecordError::Truncated("full-page"))?;
                self.off += 1 + PAGE_SIZE;
                Ok(Record::Full(page))
            }
            RECORD_DELTA => {
                let len = body
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or(RecordError::Truncated("delta"))?;
                let delta = body[4..]
                    .get(..len)
                    .ok_or(RecordError::Truncated("delta"))?;
                self.off += 1 + 4 + len;
                Ok(Record::Delta(delta))
            }
            other => Err(RecordError::Kind(other)),
        }
    }

    /// Check that the whole stream was consumed.
    pub fn finish(self) -> Result<(), RecordError> {
        match self.buf.len() - self.off {
            0 => Ok(()),
            n => Err(RecordError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8) -> Vec<u8> {
        vec![v; PAGE_SIZE]
    }

    #[test]
    fn hit_gives_delta_and_tracks_the_last_version() {
        let c = DeltaCache::new(16 * PAGE_SIZE as u64);
        let mut out = Vec::new();
        assert_eq!(
            c.diff_and_update(5, &page(1), true, 4096, &mut out),
            Lookup::Miss
        );
        assert!(out.is_empty());
        let mut p2 = page(1);
        p2[100] = 9;
        assert_eq!(
            c.diff_and_update(5, &p2, true, 4096, &mut out),
            Lookup::Delta(3)
        );
        let mut base = page(1);
        delta::apply(&out, &mut base).unwrap();
        assert_eq!(base, p2);
        // The cache now holds p2: the same page again is an empty delta.
        out.clear();
        assert_eq!(
            c.diff_and_update(5, &p2, true, 4096, &mut out),
            Lookup::Delta(0)
        );
        // Too large: full page, but the cache still follows the sent version.
        assert_eq!(
            c.diff_and_update(5, &page(7), true, 16, &mut out),
            Lookup::TooLarge
        );
        assert_eq!(
            c.diff_and_update(5, &page(7), true, 16, &mut out),
            Lookup::Delta(0)
        );
        // Invalidation: next send is full.
        c.invalidate(5);
        assert_eq!(
            c.diff_and_update(5, &page(7), false, 16, &mut out),
            Lookup::Miss
        );
        assert!(c.is_empty(), "insert=false must not cache");
    }

    #[test]
    fn eviction_stays_within_budget() {
        let budget = 100 * PAGE_SIZE as u64;
        let c = DeltaCache::new(budget);
        assert!(c.capacity_pages() as u64 * PAGE_SIZE as u64 <= budget);
        assert!(c.capacity_pages() >= 64);
        let mut out = Vec::new();
        for i in 0..10_000u64 {
            c.diff_and_update(i, &page(i as u8), true, 4096, &mut out);
            assert!(c.len() <= c.capacity_pages());
        }
        assert_eq!(c.len(), c.capacity_pages());
        // Recently inserted pages are present, early ones were evicted.
        let mut hits = 0;
        for i in 10_000 - 32..10_000u64 {
            hits += matches!(
                c.diff_and_update(i, &page(i as u8), false, 4096, &mut out),
                Lookup::Delta(0)
            ) as u32;
        }
        assert_eq!(hits, 32);
        assert_eq!(
            c.diff_and_update(0, &page(0), false, 4096, &mut out),
            Lookup::Miss
        );
        // Small budgets shrink the shard count rather than exceed the budget.
        let tiny = DeltaCache::new(4 * PAGE_SIZE as u64); // 4 shards of 1 slot
        assert_eq!(tiny.capacity_pages(), 4);
        let one_shard = DeltaCache::new(PAGE_SIZE as u64 * 3 / 2);
        assert_eq!(one_shard.capacity_pages(), 1);
        assert_eq!(
            one_shard.diff_and_update(1, &page(1), true, 4096, &mut out),
            Lookup::Miss
        );
        assert_eq!(
            one_shard.diff_and_update(2, &page(2), true, 4096, &mut out),
            Lookup::Miss
        );
        assert_eq!(one_shard.len(), 1);
    }

    #[test]
    fn second_chance_keeps_referenced_pages() {
        // One shard of 4 slots (budget 4 pages → 4 shards; use 2 shard-aligned keys).
        let c = DeltaCache::new(4 * PAGE_SIZE as u64);
        let mut out = Vec::new();
        // Shard of key k is k & 3: keys 0, 4, 8 share shard 0 (1 slot each shard).
        c.diff_and_update(0, &page(1), true, 4096, &mut out);
        c.diff_and_update(4, &page(2), true, 4096, &mut out);
        assert_eq!(
            c.diff_and_update(0, &page(1), false, 4096, &mut out),
            Lookup::Miss
        );
        assert_eq!(
            c.diff_and_update(4, &page(2), false, 4096, &mut out),
            Lookup::Delta(0)
        );
        // Larger shard: 64 shards × 2 slots; keys 0, 64, 128 share shard 0.
        let c = DeltaCache::new(128 * PAGE_SIZE as u64);
        c.diff_and_update(0, &page(1), true, 4096, &mut out);
        c.diff_and_update(64, &page(2), true, 4096, &mut out);
        // Reference 0, then insert 128: the unreferenced 64 is evicted.
        assert_eq!(
            c.diff_and_update(0, &page(1), true, 4096, &mut out),
            Lookup::Delta(0)
        );
        c.diff_and_update(128, &page(3), true, 4096, &mut out);
        assert_eq!(
            c.diff_and_update(0, &page(1), false, 4096, &mut out),
            Lookup::Delta(0)
        );
        assert_eq!(
            c.diff_and_update(64, &page(2), false, 4096, &mut out),
            Lookup::Miss
        );
    }

    #[test]
    fn records_decode_to_the_sent_pages() {
        let c = DeltaCache::new(1 << 20);
        let mut pages = Vec::new();
        for v in 1..=3u8 {
            pages.extend_from_slice(&page(v));
        }
        let idx = [10u64, 11, 12];
        let mut out = Vec::new();
        assert_eq!(c.encode_records(0, &pages, &idx, &mut out), (0, 0));
        assert!(c.is_empty(), "round 0 does not populate");
        assert_eq!(out.len(), 3 * (1 + PAGE_SIZE));
        assert_eq!(c.encode_records(1, &pages, &idx, &mut out), (0, 0));
        assert_eq!(c.len(), 3);
        let mut next = pages.clone();
        next[5] = 0xEE; // page 10: small change
        next[PAGE_SIZE * 2..].fill(0x55); // page 12: all changed
        let (d, saved) = c.encode_records(2, &next, &idx, &mut out);
        assert_eq!(d, 2);
        assert_eq!(saved, (PAGE_SIZE - 4 - 3) as u64 + (PAGE_SIZE - 4) as u64);
        assert_eq!(out[0], RECORD_DELTA);
        assert_eq!(u32::from_le_bytes(out[1..5].try_into().unwrap()), 3);
        assert_eq!(out[8], RECORD_DELTA);
        assert_eq!(out[13], RECORD_FULL);
        assert_eq!(out.len(), 8 + 5 + 1 + PAGE_SIZE);
        // Reading them back and applying onto the previous versions gives `next`.
        let mut rd = RecordReader::new(&out);
        for (k, prev) in pages.chunks_exact(PAGE_SIZE).enumerate() {
            let mut p = prev.to_vec();
            match rd.next_record().unwrap() {
                Record::Full(f) => p.copy_from_slice(f),
                Record::Delta(d) => delta::apply(d, &mut p).unwrap(),
            }
            assert_eq!(p, &next[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
        }
        rd.finish().unwrap();
    }

    #[test]
    fn hostile_record_streams_are_rejected_without_panic() {
        fn next_of(b: &[u8]) -> Result<Record<'_>, RecordError> {
            RecordReader::new(b).next_record()
        }
        assert_eq!(next_of(&[]), Err(RecordError::Missing));
        assert_eq!(next_of(&[0]), Err(RecordError::Kind(0)));
        assert_eq!(next_of(&[3, 0, 0]), Err(RecordError::Kind(3)));
        assert_eq!(
            next_of(&[RECORD_FULL, 1, 2]),
            Err(RecordError::Truncated("full-page"))
        );
        assert_eq!(
            next_of(&[RECORD_DELTA, 1, 0]),
            Err(RecordError::Truncated("delta"))
        );
        // Length past the end, including lengths that would overflow an offset.
        assert_eq!(
            next_of(&[RECORD_DELTA, 5, 0, 0, 0, 1, 2]),
            Err(RecordError::Truncated("delta"))
        );
        assert_eq!(
            next_of(&[RECORD_DELTA, 0xff, 0xff, 0xff, 0xff, 1]),
            Err(RecordError::Truncated("delta"))
        );
        // Trailing bytes after a valid record.
        let mut rd = RecordReader::new(&[RECORD_DELTA, 1, 0, 0, 0, 9, 7]);
        assert_eq!(rd.next_record(), Ok(Record::Delta(&[9])));
        assert_eq!(rd.finish(), Err(RecordError::Trailing(1)));
        // Every truncation and random bytes: errors, never panics.
        let c = DeltaCache::new(1 << 20);
        let mut pages = vec![3u8; 4 * PAGE_SIZE];
        let idx = [1u64, 2, 3, 4];
        let mut out = Vec::new();
        c.encode_records(1, &pages, &idx, &mut out);
        pages[10] = 4;
        pages[PAGE_SIZE * 3 + 7] = 1;
        c.encode_records(2, &pages, &idx, &mut out);
        for cut in 0..out.len() {
            let mut rd = RecordReader::new(&out[..cut]);
            let mut n = 0;
            while let Ok(r) = rd.next_record() {
                if let Record::Delta(d) = r {
                    let mut p = vec![3u8; PAGE_SIZE];
                    let _ = delta::apply(d, &mut p);
                }
                n += 1;
            }
            assert!(n < 4, "a truncated stream cannot yield all 4 records");
        }
        let mut s = 17u64;
        for len in 0..200 {
            let junk: Vec<u8> = (0..len)
                .map(|_| crate::rng::splitmix(&mut s) as u8 % 4)
                .collect();
            let mut rd = RecordReader::new(&junk);
            while rd.next_record().is_ok() {}
        }
    }
}
