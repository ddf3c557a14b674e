//! The hash-scan tracker: re-hash every page, report those that differ from the
//! baseline.
//!
//! Needs nothing from the kernel or the hypervisor, so it works on any memory and
//! serves as the oracle the other backends are tested against, and as the engine's
//! safe tracker after an audit caught a miss. Cost: one read of all of memory per
//! harvest (≈ 15 GB/s per core here for xxh3).
//!
//! The baseline is what was **sent** once the engine hands over its ledger
//! ([`DirtyTracker::follow_sent`]): a page is reported when its content differs from
//! the last version put on the wire. Compared with its own previous scan instead, a
//! page written A → B, sent as B, and written back to A before the next scan would
//! look unchanged while the destination holds B. Used alone (no ledger), the tracker
//! compares with its previous scan, which is exact only if every reported page is
//! copied before it is written again.

use std::sync::Arc;

use super::{DirtyTracker, TrackError, TrackerCaps};
use crate::memory::{GuestMemory, PageSet};
use crate::proof::PageLedger;

/// Hash-scan tracker; `threads` threads hash in parallel.
#[derive(Debug)]
pub struct HashScanTracker {
    /// Previous scan (used when there is no ledger).
    hashes: Vec<u64>,
    sent: Option<Arc<PageLedger>>,
    threads: usize,
    started: bool,
}

impl HashScanTracker {
    /// A tracker hashing with `threads` threads.
    pub fn new(threads: usize) -> Self {
        Self {
            hashes: Vec::new(),
            sent: None,
            threads: threads.max(1),
            started: false,
        }
    }
}

impl DirtyTracker for HashScanTracker {
    fn name(&self) -> &'static str {
        "hash"
    }
    fn caps(&self) -> TrackerCaps {
        // Sees any write through any mapping, but a write that restores the bytes
        // that were sent is invisible (harmless: the content is what was sent).
        TrackerCaps {
            sees_guest_writes: true,
            sees_vmm_writes: true,
            exact: false,
        }
    }
    fn start(&mut self, mem: &GuestMemory) -> Result<(), TrackError> {
        if self.started {
            return Err(TrackError::Order("hash"));
        }
        if self.sent.is_none() {
            self.hashes = mem.page_hash_table(self.threads)?;
        }
        self.started = true;
        Ok(())
    }
    fn harvest(&mut self, mem: &GuestMemory, into: &mut PageSet) -> Result<(), TrackError> {
        if !self.started {
            return Err(TrackError::Order("hash"));
        }
        let now = mem.page_hash_table(self.threads)?;
        match &self.sent {
            Some(sent) => {
                for (i, new) in now.iter().enumerate() {
                    if sent.hash(i as u64) != *new {
                        into.insert(i as u64);
                    }
                }
            }
            None => {
                for (i, (old, new)) in self.hashes.iter().zip(&now).enumerate() {
                    if old != new {
                        into.insert(i as u64);
                    }
                }
                self.hashes = now;
            }
        }
        Ok(())
    }
    fn stop(&mut self, _mem: &GuestMemory) -> Result<(), TrackError> {
        self.started = false;
        self.hashes = Vec::new();
        Ok(())
    }
    fn follow_sent(&mut self, sent: &Arc<PageLedger>) -> bool {
        self.sent = Some(sent.clone());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{page_hash, PAGE_SIZE};
    use crate::proof::DigestDelta;

    /// A page written A → B, sent as B, then written back to A before the next scan
    /// must be reported: the destination holds B.
    #[test]
    fn a_b_a_between_scans_is_reported_against_what_was_sent() {
        let mem = GuestMemory::anonymous(8 * PAGE_SIZE, false).unwrap();
        let (a, b) = ([0xaau8; PAGE_SIZE], [0xbbu8; PAGE_SIZE]);
        for p in 0..8 {
            mem.write_pages(p, &a).unwrap();
        }
        let sent = Arc::new(PageLedger::new(8));
        let mut d = DigestDelta::default();
        let mut with_ledger = HashScanTracker::new(2);
        assert!(with_ledger.follow_sent(&sent));
        let mut alone = HashScanTracker::new(2);
        with_ledger.start(&mem).unwrap();
        alone.start(&mem).unwrap();
        // Round 0 sends A everywhere, except page 3, which the guest has set to B
        // by the time it is copied.
        mem.write_pages(3, &b).unwrap();
        for p in 0..8 {
            let mut buf = [0u8; PAGE_SIZE];
            mem.read_pages(p, &mut buf).unwrap();
            sent.record(p, page_hash(&buf), &mut d);
        }
        mem.write_pages(3, &a).unwrap(); // back to A before the scan
        let (mut got, mut got_alone) = (PageSet::new(8), PageSet::new(8));
        with_ledger.harvest(&mem, &mut got).unwrap();
        alone.harvest(&mem, &mut got_alone).unwrap();
        assert_eq!(got.iter().collect::<Vec<_>>(), vec![3]);
        assert!(
            got_alone.is_empty(),
            "compared with its own scan, A → B → A is invisible (why the ledger exists)"
        );
        // Re-sent as A: clean from then on.
        sent.record(3, page_hash(&a), &mut d);
        got.clear();
        with_ledger.harvest(&mem, &mut got).unwrap();
        assert!(got.is_empty());
    }
}
