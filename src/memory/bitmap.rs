//! Page bitmaps: an atomic one that writers mark concurrently ([`DirtyBitmap`]) and a
//! plain one the engine owns after a harvest ([`PageSet`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// A concurrently markable bitmap, one bit per page index.
///
/// Writers call [`DirtyBitmap::mark`] **after** their write to the page is complete
/// (release ordering); the harvester swaps each word with zero (acquire ordering) and
/// only then copies the pages. That order guarantees a write is either visible to
/// the copy that follows the harvest, or marked again for the next harvest.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

impl DirtyBitmap {
    /// A clear bitmap of `bits` bits.
    pub fn new(bits: u64) -> Self {
        let n = bits.div_ceil(64) as usize;
        Self {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True when the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Mark one page dirty. Out-of-range indexes are ignored (returns false).
    #[inline]
    pub fn mark(&self, index: u64) -> bool {
        if index >= self.bits {
            return false;
        }
        self.words[(index / 64) as usize].fetch_or(1 << (index % 64), Ordering::Release);
        true
    }

    /// Mark `[start, start+count)` dirty (clamped to the bitmap).
    pub fn mark_range(&self, start: u64, count: u64) {
        let end = start.saturating_add(count).min(self.bits);
        let mut i = start;
        while i < end {
            let w = i / 64;
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[w as usize].fetch_or(mask, Ordering::Release);
            i += n;
        }
    }

    /// Is the page marked?
    pub fn is_marked(&self, index: u64) -> bool {
        index < self.bits
            && self.words[(index / 64) as usize].load(Ordering::Acquire) & (1 << (index % 64)) != 0
    }

    /// Move every set bit into `into` (OR) and clear it here.
    pub fn harvest_into(&self, into: &mut PageSet) {
        debug_assert_eq!(into.words.len(), self.words.len());
        for (dst, src) in into.words.iter_mut().zip(self.words.iter()) {
            // Cheap load first: most words are zero in late rounds, and a swap on a
            // zero word would dirty the cache line for nothing.
            if src.load(Ordering::Relaxed) != 0 {
                *dst |= src.swap(0, Ordering::Acquire);
            }
        }
    }

    /// Number of set bits (racy snapshot).
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }
}

/// A plain page bitmap owned by one thread: the harvested dirty set of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    bits: u64,
}

impl PageSet {
    /// An empty set over `bits` pages.
    pub fn new(bits: u64) -> Self {
        Self {
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
        }
    }

    /// A set with every page in it.
    pub fn full(bits: u64) -> Self {
        let mut s = Self::new(bits);
        s.insert_range(0, bits);
        s
    }

    /// Number of pages the set ranges over.
    pub fn capacity(&self) -> u64 {
        self.bits
    }

    /// Add one page.
    #[inline]
    pub fn insert(&mut self, index: u64) {
        if index < self.bits {
            self.words[(index / 64) as usize] |= 1 << (index % 64);
        }
    }

    /// Remove one page.
    #[inline]
    pub fn remove(&mut self, index: u64) {
        if index < self.bits {
            self.words[(index / 64) as usize] &= !(1 << (index % 64));
        }
    }

    /// Add `[start, start+count)`.
    pub fn insert_range(&mut self, start: u64, count: u64) {
        let end = start.saturating_add(count).min(self.bits);
        for i in start..end {
            self.insert(i);
        }
    }

    /// Membership.
    #[inline]
    pub fn contains(&self, index: u64) -> bool {
        index < self.bits && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// True when no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Remove every page.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// OR another set into this one.
    pub fn union_with(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Remove every page of `other` from this set.
    pub fn subtract(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// Keep only pages also in `other`.
    pub fn intersect_with(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= *b;
        }
    }

    /// Raw words (bit `i` of word `w` is page `64*w + i`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Mutable raw words, for trackers that fill the set from a kernel bitmap.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Iterate set bits in increasing order.
    pub fn iter(&self) -> SetBits<'_> {
        SetBits {
            words: &self.words,
            word: 0,
            cur: self.words.first().copied().unwrap_or(0),
        }
    }
}

/// Iterator over the set bits of a [`PageSet`].
#[derive(Debug)]
pub struct SetBits<'a> {
    words: &'a [u64],
    word: usize,
    cur: u64,
}

impl Iterator for SetBits<'_> {
    type Item = u64;
    #[inline]
    fn next(&mut self) -> Option<u64> {
        loop {
            if self.cur != 0 {
                let bit = self.cur.trailing_zeros() as u64;
                self.cur &= self.cur - 1;
                return Some(self.word as u64 * 64 + bit);
            }
            self.word += 1;
            if self.word >= self.words.len() {
                return None;
            }
            self.cur = self.words[self.word];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_harvest_iterate() {
        let b = DirtyBitmap::new(200);
        b.mark(3);
        b.mark(64);
        b.mark_range(120, 70);
        assert!(!b.mark(500));
        let mut s = PageSet::new(200);
        b.harvest_into(&mut s);
        assert_eq!(b.count(), 0);
        let v: Vec<u64> = s.iter().collect();
        assert_eq!(v.len(), 72);
        assert_eq!(&v[..3], &[3, 64, 120]);
        assert_eq!(*v.last().unwrap(), 189);
    }

    #[test]
    fn set_algebra() {
        let mut a = PageSet::full(130);
        assert_eq!(a.count(), 130);
        let mut b = PageSet::new(130);
        b.insert_range(0, 65);
        a.subtract(&b);
        assert_eq!(a.count(), 65);
        assert_eq!(a.iter().next(), Some(65));
        a.intersect_with(&b);
        assert!(a.is_empty());
    }
}
