//! The `Resumed` attachment: which pages of the rounds in flight the destination
//! holds (docs/PROTOCOL.md, "Resumption").
//!
//! A run is 16 bytes, little-endian: first page index (u64), page count (u32), and
//! the round whose copy of those pages the destination applied completely (u32).
//! Runs are sorted by first page and disjoint. A destination may leave pages out
//! (they are then sent again); it may never list a page it does not hold, which
//! the memory digest at commit would expose.

use super::WireError;

/// Bytes per run on the wire.
pub const HELD_RUN_LEN: usize = 16;
/// Most runs in one `Resumed` (16 MiB); a destination with more lists only the
/// first ones, and the pages it leaves out are sent again.
pub const MAX_HELD_RUNS: usize = 1 << 20;

/// Pages `first..first + count`, held as sent in `round`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldRun {
    /// First page index.
    pub first: u64,
    /// Pages in the run (at least one).
    pub count: u32,
    /// The round of the copy the destination holds.
    pub round: u32,
}

impl HeldRun {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.first + self.count as u64
    }
}

/// Append `runs` to `out`.
pub fn encode_runs(runs: &[HeldRun], out: &mut Vec<u8>) {
    out.reserve(runs.len() * HELD_RUN_LEN);
    for r in runs {
        out.extend_from_slice(&r.first.to_le_bytes());
        out.extend_from_slice(&r.count.to_le_bytes());
        out.extend_from_slice(&r.round.to_le_bytes());
    }
}

/// How a `Resumed` attachment breaks its rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeldRunsError {
    /// The attachment's length does not match the announced number of runs.
    #[error("resumed attachment is {bytes} bytes; {runs} held runs take {expected}")]
    Length {
        /// Bytes received.
        bytes: usize,
        /// Runs announced.
        runs: usize,
        /// Bytes those runs take.
        expected: usize,
    },
    /// A run of zero pages.
    #[error("held run at page {first} is empty")]
    Empty {
        /// Its first page.
        first: u64,
    },
    /// A run that starts before the previous one ended.
    #[error("held run at page {first} overlaps or precedes the run before it (ending at {previous_end})")]
    Overlap {
        /// Its first page.
        first: u64,
        /// Where the previous run ended.
        previous_end: u64,
    },
    /// A run past the end of guest memory.
    #[error("held run at page {first} of {count} pages goes past the guest's {pages} pages")]
    PastEnd {
        /// Its first page.
        first: u64,
        /// Its length in pages.
        count: u32,
        /// Guest pages.
        pages: u64,
    },
}

/// Decode `expected` runs from `b`, for a guest of `pages` pages. Refuses a length
/// that does not match, more than [`MAX_HELD_RUNS`], empty runs, runs past the end
/// of memory, and runs out of order or overlapping.
pub fn decode_runs(b: &[u8], expected: u64, pages: u64) -> Result<Vec<HeldRun>, WireError> {
    if expected > MAX_HELD_RUNS as u64 {
        return Err(WireError::TooLong {
            what: "held runs",
            len: usize::try_from(expected).unwrap_or(usize::MAX),
            max: MAX_HELD_RUNS,
        });
    }
    let n = expected as usize;
    if b.len() != n * HELD_RUN_LEN {
        return Err(WireError::HeldRuns(HeldRunsError::Length {
            bytes: b.len(),
            runs: n,
            expected: n * HELD_RUN_LEN,
        }));
    }
    let mut runs = Vec::with_capacity(n);
    let mut end = 0u64;
    for c in b.chunks_exact(HELD_RUN_LEN) {
        let r = HeldRun {
            first: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
            count: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
            round: u32::from_le_bytes(c[12..16].try_into().expect("4 bytes")),
        };
        if r.count == 0 {
            return Err(WireError::HeldRuns(HeldRunsError::Empty { first: r.first }));
        }
        if r.first < end {
            return Err(WireError::HeldRuns(HeldRunsError::Overlap {
                first: r.first,
                previous_end: end,
            }));
        }
        if r.first
            .checked_add(r.count as u64)
            .is_none_or(|e| e > pages)
        {
            return Err(WireError::HeldRuns(HeldRunsError::PastEnd {
                first: r.first,
                count: r.count,
                pages,
            }));
        }
        end = r.end();
        runs.push(r);
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first: u64, count: u32, round: u32) -> HeldRun {
        HeldRun {
            first,
            count,
            round,
        }
    }

    #[test]
    fn runs_round_trip() {
        let runs = vec![run(0, 3, 1), run(3, 1, 2), run(10, 256, 2)];
        let mut b = Vec::new();
        encode_runs(&runs, &mut b);
        assert_eq!(b.len(), 3 * HELD_RUN_LEN);
        assert_eq!(decode_runs(&b, 3, 266).unwrap(), runs);
    }

    #[test]
    fn bad_runs_are_refused_by_name() {
        let enc = |runs: &[HeldRun]| {
            let mut b = Vec::new();
            encode_runs(runs, &mut b);
            b
        };
        let e = decode_runs(&enc(&[run(5, 2, 0), run(6, 1, 0)]), 2, 100).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        let e = decode_runs(&enc(&[run(99, 2, 0)]), 1, 100).unwrap_err();
        assert!(e.to_string().contains("goes past"), "{e}");
        let e = decode_runs(&enc(&[run(u64::MAX, 2, 0)]), 1, 100).unwrap_err();
        assert!(e.to_string().contains("goes past"), "{e}");
        let e = decode_runs(&enc(&[run(1, 0, 0)]), 1, 100).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = decode_runs(&enc(&[run(1, 1, 0)]), 2, 100).unwrap_err();
        assert!(e.to_string().contains("bytes"), "{e}");
        let e = decode_runs(&[], u64::MAX, 100).unwrap_err();
        assert!(e.to_string().contains("held runs"), "{e}");
    }
}
