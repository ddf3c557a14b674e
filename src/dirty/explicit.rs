//! The explicit tracker: a shared atomic bitmap that the writer marks.

use std::sync::Arc;

use super::{DirtyTracker, TrackError, TrackerCaps};
use crate::memory::{DirtyBitmap, GuestMemory, PageSet};

/// A tracker fed by [`DirtyBitmap::mark`] calls from the hypervisor (device emulation,
/// the workload simulator). The writer must mark *after* completing its write.
#[derive(Debug, Clone)]
pub struct ExplicitTracker {
    bitmap: Arc<DirtyBitmap>,
    started: bool,
}

impl ExplicitTracker {
    /// A tracker over `bitmap` (one bit per page index of the guest memory).
    pub fn new(bitmap: Arc<DirtyBitmap>) -> Self {
        Self {
            bitmap,
            started: false,
        }
    }

    /// The bitmap writers mark.
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }
}

impl DirtyTracker for ExplicitTracker {
    fn name(&self) -> &'static str {
        "explicit"
    }
    fn caps(&self) -> TrackerCaps {
        TrackerCaps {
            sees_guest_writes: false,
            sees_vmm_writes: true,
            exact: true,
        }
    }
    fn start(&mut self, mem: &GuestMemory) -> Result<(), TrackError> {
        if self.bitmap.len() != mem.total_pages() {
            return Err(TrackError::Unavailable {
                tracker: "explicit",
                reason: super::Unavailable::BitmapSize {
                    bits: self.bitmap.len(),
                    pages: mem.total_pages(),
                },
            });
        }
        // Discard marks made before start: round 0 sends everything anyway.
        let mut scratch = PageSet::new(self.bitmap.len());
        self.bitmap.harvest_into(&mut scratch);
        self.started = true;
        Ok(())
    }
    fn harvest(&mut self, _mem: &GuestMemory, into: &mut PageSet) -> Result<(), TrackError> {
        if !self.started {
            return Err(TrackError::Order("explicit"));
        }
        self.bitmap.harvest_into(into);
        Ok(())
    }
    fn stop(&mut self, _mem: &GuestMemory) -> Result<(), TrackError> {
        self.started = false;
        Ok(())
    }
}
