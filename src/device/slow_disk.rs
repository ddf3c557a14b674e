//! A model pass-through disk: a participant whose handoff takes real time.
//!
//! With a pass-through disk the VM waits, paused, while ownership of the physical
//! disk moves between hosts (the spec measured 5.7 s with one disk against under one
//! second with none). Here the source's `save` sleeps for the release of ownership
//! (flush + reservation release) and the destination's `restore` sleeps for taking
//! it, so the time shows up in the report's `downtime_breakdown`: per participant in
//! `participants` (source save), in `device_state_ms`, and in `dest_restore_ms` /
//! `dest_participants` (destination restore).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ParticipantError, RestoreState, SaveState, Veto};

/// Format version of a disk's state blob.
pub const DISK_STATE_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct DiskState {
    disk: String,
    owner_generation: u64,
}

/// Source side of a pass-through disk.
#[derive(Debug)]
pub struct SlowDiskSource {
    id: String,
    release_time: Duration,
    generation: u64,
    released: bool,
}

impl SlowDiskSource {
    /// A disk whose ownership release takes `release_time` (spent in `save`).
    pub fn new(id: &str, release_time: Duration) -> Self {
        Self {
            id: id.to_string(),
            release_time,
            generation: 1,
            released: false,
        }
    }
}

impl SaveState for SlowDiskSource {
    fn id(&self) -> &str {
        &self.id
    }
    fn version(&self) -> u32 {
        DISK_STATE_VERSION
    }
    fn setup_info(&self) -> Vec<u8> {
        self.id.as_bytes().to_vec()
    }
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError> {
        // Flush the disk's queue and release the SCSI reservation.
        std::thread::sleep(self.release_time);
        self.released = true;
        serde_json::to_writer(
            &mut *out,
            &DiskState {
                disk: self.id.clone(),
                owner_generation: self.generation,
            },
        )
        .map_err(|e| ParticipantError::device(self.id.clone(), e))
    }
    fn release(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn committed(&mut self) {}
    fn rolled_back(&mut self) {
        // Take the reservation back: the VM resumes here.
        self.released = false;
    }
}

/// Destination side of a pass-through disk.
#[derive(Debug)]
pub struct SlowDiskDest {
    id: String,
    acquire_time: Duration,
    owned: bool,
}

impl SlowDiskDest {
    /// A disk whose ownership acquisition takes `acquire_time` (spent in `restore`).
    pub fn new(id: &str, acquire_time: Duration) -> Self {
        Self {
            id: id.to_string(),
            acquire_time,
            owned: false,
        }
    }
}

impl RestoreState for SlowDiskDest {
    fn id(&self) -> &str {
        &self.id
    }
    fn validate_setup(&mut self, info: &[u8]) -> Result<(), Veto> {
        if info != self.id.as_bytes() {
            return Err(Veto {
                participant: self.id.clone(),
                reason: "the source attaches a different physical disk".into(),
            });
        }
        Ok(())
    }
    fn validate_state(&mut self, version: u32, blob: &[u8]) -> Result<(), Veto> {
        let ok = version == DISK_STATE_VERSION
            && serde_json::from_slice::<DiskState>(blob).is_ok_and(|s| s.disk == self.id);
        if ok {
            Ok(())
        } else {
            Err(Veto {
                participant: self.id.clone(),
                reason: format!("unreadable disk state (version {version})"),
            })
        }
    }
    fn restore(&mut self, _version: u32, _blob: &[u8]) -> Result<(), ParticipantError> {
        // Take the SCSI reservation and rescan.
        std::thread::sleep(self.acquire_time);
        self.owned = true;
        Ok(())
    }
    fn discard(&mut self) {
        self.owned = false;
    }
}
