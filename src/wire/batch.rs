//! Batch meta: which pages a batch frame carries, how they are encoded, and the
//! xxh3-64 of every page.
//!
//! ```text
//! round u32 | codec u8 | flags u8 | npages u16 | nextents u16 | reserved u16 | payload_len u32
//! extents:  nextents × (gfn u64, count u32)          sum(count) == npages,
//!                                                     sorted by gfn, disjoint
//! zero map: ceil(npages / 8) bytes                   bit i: page i is all zero (no payload)
//! hashes:   npages × u64                             xxh3-64 of each page's content
//! ```
//! `payload_len` is the length of the decoded payload (all non-zero pages, or the
//! delta record stream when `FLAG_DELTA` is set); data holds it encoded by `codec`.

use super::{WireError, MAX_BATCH_DATA, MAX_BATCH_PAGES};
use crate::codec::CodecId;
use crate::memory::PAGE_SIZE;

/// The payload is a delta record stream (XOR against the destination's current page).
pub const FLAG_DELTA: u8 = 1;
/// The pages were hashed from live guest memory that may have changed while being
/// sent (zero-copy send): a hash mismatch is a torn page, not corruption, and the
/// page is guaranteed to be re-sent because it is dirty.
pub const FLAG_RACY: u8 = 2;
/// All known flag bits.
pub const KNOWN_FLAGS: u8 = FLAG_DELTA | FLAG_RACY;

const FIXED: usize = 16;

/// A run of contiguous guest frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First guest frame number.
    pub gfn: u64,
    /// Number of pages.
    pub count: u32,
}

/// Decoded batch meta.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchMeta {
    /// Round (generation) the pages belong to.
    pub round: u32,
    /// Codec of the data section.
    pub codec: Option<CodecId>,
    /// Flags (`FLAG_*`).
    pub flags: u8,
    /// Decoded payload length.
    pub payload_len: u32,
    /// The pages, as extents, in payload order.
    pub extents: Vec<Extent>,
    /// Zero-page bitmap, one bit per page in extent order.
    pub zero_map: Vec<u8>,
    /// xxh3-64 per page, in extent order.
    pub hashes: Vec<u64>,
}

impl BatchMeta {
    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.hashes.len()
    }

    /// Is page `i` (extent order) a zero page?
    #[inline]
    pub fn is_zero(&self, i: usize) -> bool {
        self.zero_map[i / 8] & (1 << (i % 8)) != 0
    }

    /// Number of pages that carry payload.
    pub fn nonzero_pages(&self) -> usize {
        self.pages()
            - self
                .zero_map
                .iter()
                .map(|b| b.count_ones() as usize)
                .sum::<usize>()
    }

    /// Clear for reuse with capacity kept.
    pub fn clear(&mut self) {
        self.extents.clear();
        self.zero_map.clear();
        self.hashes.clear();
        self.payload_len = 0;
        self.flags = 0;
    }

    /// Serialize into `out` (cleared first).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        let n = self.hashes.len();
        out.extend_from_slice(&self.round.to_le_bytes());
        out.push(self.codec.map_or(0, |c| c as u8));
        out.push(self.flags);
        out.extend_from_slice(&(n as u16).to_le_bytes());
        out.extend_from_slice(&(self.extents.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.payload_len.to_le_bytes());
        for e in &self.extents {
            out.extend_from_slice(&e.gfn.to_le_bytes());
            out.extend_from_slice(&e.count.to_le_bytes());
        }
        out.extend_from_slice(&self.zero_map[..n.div_ceil(8)]);
        for h in &self.hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
    }

    /// Parse and validate `b` into `self` (reusing its buffers). Every count is
    /// bounded before use; the function never panics on any input.
    pub fn decode_from(&mut self, b: &[u8]) -> Result<(), WireError> {
        self.clear();
        if b.len() < FIXED {
            return Err(WireError::Truncated("batch meta"));
        }
        let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        self.round = u32at(0);
        self.codec = Some(CodecId::from_u8(b[4]).ok_or(WireError::BadCodec(b[4]))?);
        self.flags = b[5];
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(WireError::Invalid("batch flags"));
        }
        if self.flags & FLAG_DELTA != 0 && self.flags & FLAG_RACY != 0 {
            return Err(WireError::Invalid("batch flags (delta with racy)"));
        }
        if u16at(10) != 0 {
            return Err(WireError::Invalid("batch meta reserved field"));
        }
        let npages = u16at(6) as usize;
        let nextents = u16at(8) as usize;
        self.payload_len = u32at(12);
        if npages == 0 || npages > MAX_BATCH_PAGES {
            return Err(WireError::Invalid("batch page count"));
        }
        if nextents == 0 || nextents > npages {
            return Err(WireError::Invalid("batch extent count"));
        }
        if self.payload_len as usize > MAX_BATCH_DATA {
            return Err(WireError::TooLong {
                what: "batch payload",
                len: self.payload_len as usize,
                max: MAX_BATCH_DATA,
            });
        }
        let zlen = npages.div_ceil(8);
        let need = FIXED + nextents * 12 + zlen + npages * 8;
        if b.len() != need {
            return Err(if b.len() < need {
                WireError::Truncated("batch meta")
            } else {
                WireError::Invalid("batch meta length")
            });
        }
        let mut off = FIXED;
        let mut total = 0usize;
        // End (exclusive) of the previous extent: extents must be sorted and
        // disjoint, so no page appears twice in a batch (the receiver relies on it
        // to hand out one mutable slice per page).
        let mut prev_end = 0u64;
        for i in 0..nextents {
            let gfn = u64::from_le_bytes(
                b[off..off + 8]
                    .try_into()
                    .map_err(|_| WireError::Truncated("extent"))?,
            );
            let count = u32at(off + 8);
            let Some(end) = gfn.checked_add(count as u64).filter(|_| count != 0) else {
                return Err(WireError::Invalid("extent (empty or past the last gfn)"));
            };
            if i > 0 && gfn < prev_end {
                return Err(WireError::Invalid(
                    "extents overlap or are not sorted by gfn",
                ));
            }
            prev_end = end;
            total += count as usize;
            if total > npages {
                return Err(WireError::Invalid("extent counts exceed page count"));
            }
            self.extents.push(Extent { gfn, count });
            off += 12;
        }
        if total != npages {
            return Err(WireError::Invalid(
                "extent counts do not add up to page count",
            ));
        }
        self.zero_map.extend_from_slice(&b[off..off + zlen]);
        // Bits past npages in the last byte must be clear.
        if !npages.is_multiple_of(8) && self.zero_map[zlen - 1] >> (npages % 8) != 0 {
            return Err(WireError::Invalid("zero map padding"));
        }
        off += zlen;
        for i in 0..npages {
            let o = off + i * 8;
            self.hashes.push(u64::from_le_bytes(
                b[o..o + 8]
                    .try_into()
                    .map_err(|_| WireError::Truncated("hash"))?,
            ));
        }
        let nonzero = self.nonzero_pages();
        if self.flags & FLAG_DELTA == 0 && self.payload_len as usize != nonzero * PAGE_SIZE {
            return Err(WireError::Invalid(
                "payload length does not match non-zero pages",
            ));
        }
        if self.flags & FLAG_DELTA != 0 && self.payload_len as usize > nonzero * (PAGE_SIZE + 8) {
            return Err(WireError::Invalid("delta payload length"));
        }
        Ok(())
    }

    /// Iterate page gfns in payload order.
    pub fn gfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.extents
            .iter()
            .flat_map(|e| (0..e.count as u64).map(move |i| e.gfn + i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let m = BatchMeta {
            round: 3,
            codec: Some(CodecId::Raw),
            flags: 0,
            payload_len: 2 * PAGE_SIZE as u32,
            extents: vec![Extent { gfn: 10, count: 2 }, Extent { gfn: 100, count: 1 }],
            zero_map: vec![0b010],
            hashes: vec![1, 2, 3],
        };
        let mut b = Vec::new();
        m.encode_into(&mut b);
        let mut d = BatchMeta::default();
        d.decode_from(&b).unwrap();
        assert_eq!(d, m);
        assert_eq!(d.gfns().collect::<Vec<_>>(), vec![10, 11, 100]);
        for cut in 0..b.len() {
            assert!(d.decode_from(&b[..cut]).is_err());
        }
        let mut bad = b.clone();
        bad[4] = 0; // codec 0 is invalid
        assert!(d.decode_from(&bad).is_err());
        let mut bad = b.clone();
        bad[12] = 1; // payload length off by one
        assert!(d.decode_from(&bad).is_err());
        let mut bad = b.clone();
        bad[10] = 1; // reserved
        assert_eq!(
            d.decode_from(&bad),
            Err(WireError::Invalid("batch meta reserved field"))
        );
        let mut bad = b.clone();
        bad[5] = FLAG_DELTA | FLAG_RACY;
        assert_eq!(
            d.decode_from(&bad),
            Err(WireError::Invalid("batch flags (delta with racy)"))
        );
        // Extents must be sorted and disjoint: (10, 2) then (11, 1) overlaps, and
        // (100, 1) then (10, 2) is unsorted.
        for extents in [
            vec![Extent { gfn: 10, count: 2 }, Extent { gfn: 11, count: 1 }],
            vec![Extent { gfn: 100, count: 1 }, Extent { gfn: 10, count: 2 }],
        ] {
            let mut e = Vec::new();
            BatchMeta {
                extents,
                ..m.clone()
            }
            .encode_into(&mut e);
            assert_eq!(
                d.decode_from(&e),
                Err(WireError::Invalid(
                    "extents overlap or are not sorted by gfn"
                ))
            );
        }
        // Adjacent extents (two regions meeting at a gfn) are fine.
        let mut e = Vec::new();
        BatchMeta {
            extents: vec![Extent { gfn: 10, count: 2 }, Extent { gfn: 12, count: 1 }],
            ..m.clone()
        }
        .encode_into(&mut e);
        assert_eq!(d.decode_from(&e), Ok(()));
    }
}
