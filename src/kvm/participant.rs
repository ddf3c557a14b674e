//! [`SaveState`]/[`RestoreState`] participants for KVM vCPUs and the VM.
//!
//! A vCPU is shared between the VMM's vCPU thread (which runs `KVM_RUN` while it
//! holds the lock) and the participant (which locks it only while the guest is
//! paused, so the lock is uncontended): [`SharedVcpu`]. The VMM's `VmControl::pause`
//! must return only after the vCPU thread has left `KVM_RUN`, completed any pending
//! I/O exit (re-entry with `immediate_exit = 1`) and released the lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{VcpuFd, VmFd};

use super::state::{StateError, VcpuState, VmState, STATE_FORMAT_VERSION};
use crate::device::{ParticipantError, RestoreState, SaveState, Veto};

/// A vCPU shared between its run thread and the state participants.
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;

/// Time spent saving/restoring and bytes produced, summed over the participants that
/// share it (for a downtime breakdown).
#[derive(Debug, Default)]
pub struct StateTimings {
    /// Nanoseconds spent in save (ioctls + encoding).
    pub save_ns: AtomicU64,
    /// Nanoseconds spent in restore (ioctls).
    pub restore_ns: AtomicU64,
    /// Nanoseconds spent decoding/validating incoming blobs.
    pub validate_ns: AtomicU64,
    /// Bytes of encoded state.
    pub bytes: AtomicU64,
}

impl StateTimings {
    fn add(counter: &AtomicU64, since: Instant) {
        counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Count one saved blob of `bytes` and the time since `started`.
    fn record_save(&self, bytes: usize, started: Instant) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Self::add(&self.save_ns, started);
    }
}

fn failed(id: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ParticipantError {
    ParticipantError::device(id, e)
}

fn veto(id: &str, e: impl std::fmt::Display) -> Veto {
    Veto {
        participant: id.to_string(),
        reason: e.to_string(),
    }
}

fn check_version(id: &str, version: u32) -> Result<(), Veto> {
    if version != u32::from(STATE_FORMAT_VERSION) {
        return Err(veto(id, StateError::Version(version as u16)));
    }
    Ok(())
}

/// Source side of one vCPU.
#[derive(Debug)]
pub struct VcpuSaver {
    id: String,
    vcpu: SharedVcpu,
    msr_indices: Vec<u32>,
    timings: Arc<StateTimings>,
}

impl VcpuSaver {
    /// `id` (e.g. "vcpu0") must match the destination's [`VcpuRestorer`]; `msr_indices`
    /// come from [`super::probe_msrs`] at setup.
    pub fn new(
        id: impl Into<String>,
        vcpu: SharedVcpu,
        msr_indices: Vec<u32>,
        timings: Arc<StateTimings>,
    ) -> Self {
        Self {
            id: id.into(),
            vcpu,
            msr_indices,
            timings,
        }
    }
}

impl SaveState for VcpuSaver {
    fn id(&self) -> &str {
        &self.id
    }
    fn version(&self) -> u32 {
        u32::from(STATE_FORMAT_VERSION)
    }
    fn setup_info(&self) -> Vec<u8> {
        // The number of MSRs the source will send: the destination may veto if it
        // cannot take them (it does not today).
        (self.msr_indices.len() as u32).to_le_bytes().to_vec()
    }
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError> {
        let t = Instant::now();
        let vcpu = self
            .vcpu
            .lock()
            .map_err(|_| failed(&self.id, "vCPU lock poisoned"))?;
        let state = VcpuState::save(&vcpu, &self.msr_indices).map_err(|e| failed(&self.id, e))?;
        drop(vcpu);
        let before = out.len();
        state.encode(out);
        self.timings.record_save(out.len() - before, t);
        Ok(())
    }
    fn release(&mut self) -> Result<(), ParticipantError> {
        // Nothing to hand over: the paused source vCPU/VM stays intact until commit
        // so that a rollback can simply resume it.
        Ok(())
    }
    fn committed(&mut self) {}
    fn rolled_back(&mut self) {}
}

/// Destination side of one vCPU (created at setup, before any page arrives).
#[derive(Debug)]
pub struct VcpuRestorer {
    id: String,
    vcpu: SharedVcpu,
    prepared: Option<VcpuState>,
    timings: Arc<StateTimings>,
}

impl VcpuRestorer {
    /// Restores into `vcpu`, which must not have run yet.
    pub fn new(id: impl Into<String>, vcpu: SharedVcpu, timings: Arc<StateTimings>) -> Self {
        Self {
            id: id.into(),
            vcpu,
            prepared: None,
            timings,
        }
    }
}

impl RestoreState for VcpuRestorer {
    fn id(&self) -> &str {
        &self.id
    }
    fn validate_setup(&mut self, info: &[u8]) -> Result<(), Veto> {
        if !info.is_empty() && info.len() != 4 {
            return Err(veto(&self.id, "malformed vCPU setup info"));
        }
        Ok(())
    }
    fn validate_state(&mut self, version: u32, blob: &[u8]) -> Result<(), Veto> {
        let t = Instant::now();
        check_version(&self.id, version)?;
        self.prepared = Some(VcpuState::decode(blob).map_err(|e| veto(&self.id, e))?);
        StateTimings::add(&self.timings.validate_ns, t);
        Ok(())
    }
    fn restore(&mut self, version: u32, blob: &[u8]) -> Result<(), ParticipantError> {
        let t = Instant::now();
        let state = match self.prepared.take() {
            Some(s) => s,
            None => {
                check_version(&self.id, version).map_err(|v| failed(&self.id, v))?;
                VcpuState::decode(blob).map_err(|e| failed(&self.id, e))?
            }
        };
        let vcpu = self
            .vcpu
            .lock()
            .map_err(|_| failed(&self.id, "vCPU lock poisoned"))?;
        state.restore(&vcpu).map_err(|e| failed(&self.id, e))?;
        StateTimings::add(&self.timings.restore_ns, t);
        Ok(())
    }
    fn discard(&mut self) {
        self.prepared = None;
    }
}

/// Source side of the VM-wide state.
#[derive(Debug)]
pub struct VmSaver {
    vm: Arc<VmFd>,
    timings: Arc<StateTimings>,
}

impl VmSaver {
    /// Saves the irqchip and clock of `vm`. Id: "kvm-vm".
    pub fn new(vm: Arc<VmFd>, timings: Arc<StateTimings>) -> Self {
        Self { vm, timings }
    }
}

const VM_ID: &str = "kvm-vm";

impl SaveState for VmSaver {
    fn id(&self) -> &str {
        VM_ID
    }
    fn version(&self) -> u32 {
        u32::from(STATE_FORMAT_VERSION)
    }
    fn setup_info(&self) -> Vec<u8> {
        Vec::new()
    }
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError> {
        let t = Instant::now();
        let state = VmState::save(&self.vm).map_err(|e| failed(VM_ID, e))?;
        let before = out.len();
        state.encode(out);
        self.timings.record_save(out.len() - before, t);
        Ok(())
    }
    fn release(&mut self) -> Result<(), ParticipantError> {
        // Nothing to hand over: the paused source vCPU/VM stays intact until commit
        // so that a rollback can simply resume it.
        Ok(())
    }
    fn committed(&mut self) {}
    fn rolled_back(&mut self) {}
}

/// Destination side of the VM-wide state.
#[derive(Debug)]
pub struct VmRestorer {
    vm: Arc<VmFd>,
    prepared: Option<VmState>,
    timings: Arc<StateTimings>,
}

impl VmRestorer {
    /// Restores into `vm` (which has an in-kernel irqchip).
    pub fn new(vm: Arc<VmFd>, timings: Arc<StateTimings>) -> Self {
        Self {
            vm,
            prepared: None,
            timings,
        }
    }
}

impl RestoreState for VmRestorer {
    fn id(&self) -> &str {
        VM_ID
    }
    fn validate_setup(&mut self, _info: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn validate_state(&mut self, version: u32, blob: &[u8]) -> Result<(), Veto> {
        let t = Instant::now();
        check_version(VM_ID, version)?;
        self.prepared = Some(VmState::decode(blob).map_err(|e| veto(VM_ID, e))?);
        StateTimings::add(&self.timings.validate_ns, t);
        Ok(())
    }
    fn restore(&mut self, version: u32, blob: &[u8]) -> Result<(), ParticipantError> {
        let t = Instant::now();
        let state = match self.prepared.take() {
            Some(s) => s,
            None => {
                check_version(VM_ID, version).map_err(|v| failed(VM_ID, v))?;
                VmState::decode(blob).map_err(|e| failed(VM_ID, e))?
            }
        };
        state.restore(&self.vm).map_err(|e| failed(VM_ID, e))?;
        StateTimings::add(&self.timings.restore_ns, t);
        Ok(())
    }
    fn discard(&mut self) {
        self.prepared = None;
    }
}
