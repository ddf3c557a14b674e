//! The incremental memory digest: a multiset hash over (page index, page hash).
//!
//! Each side keeps a [`PageLedger`]: the per-page table of the last hash it sent (or
//! applied), 0 meaning "nothing recorded", and a running [`MemoryDigest`]. Recording
//! page `i` with hash `h` replaces the table entry `old` and adds `E(i, h) − E(i, old)`
//! to the digest (a 0 contributes nothing), so at any time
//!
//! ```text
//! digest = Σ_{i : table[i] ≠ 0} E(i, table[i])        (per 64-bit lane, mod 2^64)
//! ```
//!
//! where `E` is XXH3-128 of the 16 bytes `index_le ‖ hash_le` under a fixed seed, its
//! two halves being two independent lanes. The source's and the destination's
//! digests are equal exactly when these sums over what was sent and what was applied
//! are equal in both lanes. Brownout compares two 16-byte values whatever the guest
//! size. docs/PROTOCOL.md gives the construction and its collision bound. (A page
//! whose xxh3-64 is 0, probability 2^−64, counts as not recorded on both sides.)
//!
//! The hot path is per page and lock-free: a worker swaps the table entry (one atomic
//! exchange on the page's own slot) and adds the difference to its own
//! [`DigestDelta`], which it folds into the shared lanes once per batch (two relaxed
//! `fetch_add`s). Additions commute and the exchange hands each update the value it
//! replaced, so the result does not depend on which thread recorded which page, or in
//! which order.

use crate::memory::zeroed::ZeroedAtomics;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Seed of the entry hash: a protocol constant (both sides must use the same one).
/// It separates this use of XXH3-128 from any other; it is not a secret.
pub const ENTRY_SEED: u64 = 0x6c69_7665_6d69_6731; // "livemig1"

/// `E(index, hash)`: the two 64-bit lanes of one ledger entry.
#[inline]
pub fn entry(index: u64, hash: u64) -> [u64; 2] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&index.to_le_bytes());
    b[8..].copy_from_slice(&hash.to_le_bytes());
    let v = twox_hash::XxHash3_128::oneshot_with_seed(ENTRY_SEED, &b);
    [v as u64, (v >> 64) as u64]
}

/// The fixed-size memory digest: two independent 64-bit lanes of a multiset hash.
/// On the wire (`Commit.digest`) and in reports it is 32 lowercase hex digits, lane 0
/// first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MemoryDigest(pub [u64; 2]);

impl MemoryDigest {
    /// The digest of a whole table, computed from scratch (tests and audits; the
    /// engine never needs it at brownout).
    pub fn of_table(table: &[u64]) -> Self {
        let mut d = DigestDelta::default();
        for (i, &h) in table.iter().enumerate() {
            d.replace(i as u64, 0, h);
        }
        Self(d.lanes)
    }
}

impl std::fmt::Display for MemoryDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.0[0], self.0[1])
    }
}

/// A digest string that is not 32 hex digits (the text as received, sanitized).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("memory digest must be 32 hex digits, got {0:?}")]
pub struct BadDigest(pub crate::wire::PeerText);

impl std::str::FromStr for MemoryDigest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, BadDigest> {
        let bad = || {
            BadDigest(crate::wire::PeerText::new(
                s.chars().take(40).collect::<String>(),
            ))
        };
        if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let lane = |r: std::ops::Range<usize>| u64::from_str_radix(&s[r], 16).map_err(|_| bad());
        Ok(Self([lane(0..16)?, lane(16..32)?]))
    }
}

impl Serialize for MemoryDigest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MemoryDigest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A worker's private share of digest updates, folded into a [`PageLedger`] with
/// [`PageLedger::merge`] (once per batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DigestDelta {
    lanes: [u64; 2],
}

impl DigestDelta {
    /// Account for page `index` changing from hash `old` to hash `new` (0: not
    /// recorded; round 0 pays for one entry per page, a re-send for two).
    #[inline]
    pub fn replace(&mut self, index: u64, old: u64, new: u64) {
        if old == new {
            return;
        }
        if new != 0 {
            let a = entry(index, new);
            self.lanes[0] = self.lanes[0].wrapping_add(a[0]);
            self.lanes[1] = self.lanes[1].wrapping_add(a[1]);
        }
        if old != 0 {
            let b = entry(index, old);
            self.lanes[0] = self.lanes[0].wrapping_sub(b[0]);
            self.lanes[1] = self.lanes[1].wrapping_sub(b[1]);
        }
    }
}

/// Per-page hashes of the last version sent (source) or applied (destination), with
/// the running digest over them.
#[derive(Debug)]
pub struct PageLedger {
    hashes: ZeroedAtomics<AtomicU64>,
    lanes: [AtomicU64; 2],
}

impl PageLedger {
    /// A ledger of `pages` pages, every entry 0 (nothing recorded), digest 0.
    pub fn new(pages: u64) -> Self {
        Self {
            hashes: ZeroedAtomics::new(pages as usize),
            lanes: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Record that page `index` now holds content with hash `hash`; the digest change
    /// goes into `delta` (merge it before reading the digest).
    ///
    /// # Panics
    /// If `index` is out of range (callers resolve indexes against the same memory).
    #[inline]
    pub fn record(&self, index: u64, hash: u64, delta: &mut DigestDelta) {
        let old = self.hashes[index as usize].swap(hash, Ordering::AcqRel);
        delta.replace(index, old, hash);
    }

    /// Fold a worker's delta into the shared digest and reset it.
    #[inline]
    pub fn merge(&self, delta: &mut DigestDelta) {
        if delta.lanes != [0, 0] {
            self.lanes[0].fetch_add(delta.lanes[0], Ordering::AcqRel);
            self.lanes[1].fetch_add(delta.lanes[1], Ordering::AcqRel);
        }
        *delta = DigestDelta::default();
    }

    /// The digest of everything recorded and merged so far.
    pub fn digest(&self) -> MemoryDigest {
        MemoryDigest([
            self.lanes[0].load(Ordering::Acquire),
            self.lanes[1].load(Ordering::Acquire),
        ])
    }

    /// The last hash recorded for page `index` (0: never recorded).
    #[inline]
    pub fn hash(&self, index: u64) -> u64 {
        self.hashes[index as usize].load(Ordering::Acquire)
    }

    /// The per-page table as plain values.
    pub fn table(&self) -> Vec<u64> {
        self.hashes
            .iter()
            .map(|h| h.load(Ordering::Acquire))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entry values are on the wire (through the digest): pinned so that a
    /// change of hash crate or seed cannot pass unnoticed. The XXH3-128 of the
    /// empty input is the reference implementation's published value.
    #[test]
    fn entry_is_pinned() {
        assert_eq!(
            twox_hash::XxHash3_128::oneshot(b""),
            0x99aa_06d3_0147_98d8_6001_c324_468d_497f
        );
        assert_eq!(
            entry(0, 0),
            entry(0, 0),
            "entries are a pure function of (index, hash)"
        );
        assert_ne!(entry(1, 7), entry(7, 1), "index and hash do not commute");
        let d = MemoryDigest::of_table(&[1, 2, 3]);
        assert_eq!(d.to_string(), PINNED_123);
    }
    const PINNED_123: &str = "eff30b00c0d430c59db936ac0af694f2";
    // Recording a hash and then 0 leaves nothing behind.
    #[test]
    fn zero_means_not_recorded() {
        let mut d = DigestDelta::default();
        d.replace(5, 0, 99);
        d.replace(5, 99, 0);
        assert_eq!(d, DigestDelta::default());
        assert_eq!(MemoryDigest::of_table(&[0, 0]), MemoryDigest::default());
    }

    #[test]
    fn any_order_and_any_thread_give_the_table_digest() {
        let n = 10_000u64;
        let table: Vec<u64> = (0..n).map(|i| i.wrapping_mul(0x9E37_79B9) ^ 5).collect();
        let ledger = PageLedger::new(n);
        // Round 0 from 4 threads in interleaved order, then re-send a third of the
        // pages twice with other hashes, then send their final hashes.
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (ledger, table) = (&ledger, &table);
                s.spawn(move || {
                    let mut d = DigestDelta::default();
                    for i in (t..n).step_by(4) {
                        ledger.record(i, table[i as usize] ^ 0xdead, &mut d);
                    }
                    ledger.merge(&mut d);
                });
            }
        });
        let mut d = DigestDelta::default();
        for i in (0..n).rev() {
            ledger.record(i, table[i as usize], &mut d);
            if i % 3 == 0 {
                ledger.record(i, 42, &mut d);
                ledger.record(i, table[i as usize], &mut d);
            }
        }
        ledger.merge(&mut d);
        assert_eq!(ledger.digest(), MemoryDigest::of_table(&table));
        assert_eq!(ledger.table(), table);
    }

    #[test]
    fn one_different_page_changes_both_lanes() {
        let table: Vec<u64> = (0..4096).collect();
        let base = MemoryDigest::of_table(&table);
        for i in [0usize, 1, 2048, 4095] {
            let mut t = table.clone();
            t[i] ^= 1;
            let d = MemoryDigest::of_table(&t);
            assert_ne!(d.0[0], base.0[0], "lane 0, page {i}");
            assert_ne!(d.0[1], base.0[1], "lane 1, page {i}");
        }
        // Moving a hash to another page (a misapplied page) changes the digest too.
        let mut t = table.clone();
        t.swap(10, 11);
        assert_ne!(MemoryDigest::of_table(&t), base);
    }

    #[test]
    fn digest_round_trips_as_32_hex_digits() {
        let d = MemoryDigest([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210]);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, "\"0123456789abcdeffedcba9876543210\"");
        assert_eq!(serde_json::from_str::<MemoryDigest>(&json).unwrap(), d);
        for bad in [
            "\"\"",
            "\"0123\"",
            "\"0123456789abcdeffedcba987654321g\"",
            "17",
        ] {
            assert!(
                serde_json::from_str::<MemoryDigest>(bad).is_err(),
                "{bad} must not parse"
            );
        }
        assert!("+123456789abcdeffedcba9876543210"
            .parse::<MemoryDigest>()
            .is_err());
    }
}
