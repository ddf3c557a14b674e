//! The source VMM: boot the guest, let it run, migrate it. Engine glue: the
//! `VmControl` over the vCPU thread, the drop-final fault injector (negative control)
//! and the guest-progress participant.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig::device::{ParticipantError, SaveState};
use livemig::dirty::{DirtyTracker, KvmDirtyLog, KvmSlot, TrackError, TrackerCaps};
use livemig::engine::{DowntimePolicy, Migration, OnLimit, VmControl};
use livemig::kvm::{probe_msrs, SharedVcpu, StateTimings, VcpuSaver, VmSaver};
use livemig::memory::{GuestMemory, PageSet};
use serde_json::{json, Value};

use crate::machine::{boot_guest, create_machine, SLOT};
use crate::vcpu::{GuestEvent, Runner, VcpuHandle};
use crate::{err, mono_ns, ms, Opts, Res};

/// The engine's handle on the source vCPU.
struct KvmVmControl {
    vcpu: VcpuHandle,
    /// CLOCK_MONOTONIC at the pause request (for the cross-process downtime).
    pause_mono_ns: Arc<AtomicU64>,
    /// Set once paused: from then on, harvests are the final round.
    paused: Arc<AtomicBool>,
    /// Negative control only: before pausing, wait for the guest to complete one whole
    /// pass after the engine's last harvest, so that every working-set page is in the
    /// final round (and stale on the destination once dropped).
    full_pass_before_pause: Option<Arc<AtomicU32>>,
    /// The vCPU itself (for throttling through r15).
    shared: SharedVcpu,
    /// The spins per page the guest was started with.
    base_spins: u64,
}

/// Busy-wait iterations per page added per percent of throttle.
const THROTTLE_SPINS_PER_PERCENT: u64 = 20;

impl VmControl for KvmVmControl {
    fn pause(&mut self) -> Result<(), livemig::engine::VmControlError> {
        if let Some(last) = &self.full_pass_before_pause {
            let start = last.load(Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            while last.load(Ordering::SeqCst) < start + 2 {
                if Instant::now() > deadline {
                    return Err("guest made no progress before pause".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.pause_mono_ns.store(mono_ns(), Ordering::SeqCst);
        self.vcpu.pause()?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.paused.store(false, Ordering::SeqCst);
        Ok(self.vcpu.resume()?)
    }
    fn throttle(&mut self, percent: u8) -> Result<(), livemig::engine::VmControlError> {
        // The guest's dirty rate is set by r15 (busy-wait iterations per page): pause,
        // raise it, resume. A general VMM would time-slice the vCPU instead.
        self.vcpu.pause()?;
        let r = (|| {
            let v = self
                .shared
                .lock()
                .map_err(|_| "vCPU lock poisoned".to_string())?;
            let mut regs = v.get_regs().map_err(err("KVM_GET_REGS"))?;
            regs.r15 = self.base_spins + u64::from(percent.min(99)) * THROTTLE_SPINS_PER_PERCENT;
            v.set_regs(&regs).map_err(err("KVM_SET_REGS"))
        })();
        self.vcpu.resume()?;
        Ok(r?)
    }
}

/// Negative control: passes harvests through until the VM is paused, then empties
/// the final round's set (the engine hands the pending pages in `into`), so the final
/// dirty pages are never sent.
struct DropFinal {
    inner: Box<dyn DirtyTracker>,
    paused: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

impl DirtyTracker for DropFinal {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn caps(&self) -> TrackerCaps {
        self.inner.caps()
    }
    fn start(&mut self, mem: &GuestMemory) -> Result<(), TrackError> {
        self.inner.start(mem)
    }
    fn harvest(&mut self, mem: &GuestMemory, into: &mut PageSet) -> Result<(), TrackError> {
        if self.paused.load(Ordering::SeqCst) {
            // The engine passes the set still to be sent (the last pre-pause harvest);
            // the final round is that plus this harvest. Drop all of it.
            self.inner.harvest(mem, into)?;
            self.dropped.fetch_add(into.count(), Ordering::SeqCst);
            into.clear();
            return Ok(());
        }
        self.inner.harvest(mem, into)
    }
    fn stop(&mut self, mem: &GuestMemory) -> Result<(), TrackError> {
        self.inner.stop(mem)
    }
}

pub const PROGRESS_ID: &str = "guest-progress";

/// Source side: carries the last guest pass seen before the pause, so the destination
/// can check that the guest goes on from exactly there.
struct ProgressSaver {
    events: crossbeam_channel::Receiver<GuestEvent>,
}

impl SaveState for ProgressSaver {
    fn id(&self) -> &str {
        PROGRESS_ID
    }
    fn version(&self) -> u32 {
        1
    }
    fn setup_info(&self) -> Vec<u8> {
        Vec::new()
    }
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError> {
        let last = last_guest_pass(&self.events).map_err(|message| ParticipantError::Failed {
            participant: PROGRESS_ID.into(),
            message,
        })?;
        out.extend_from_slice(&last.to_le_bytes());
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

/// Drain the source guest's events: the last pass it reported (fails on a guest error).
fn last_guest_pass(events: &crossbeam_channel::Receiver<GuestEvent>) -> Res<u32> {
    let mut last = 0;
    for e in events.try_iter() {
        match e {
            GuestEvent::Pass {
                n,
                counter_ok: true,
            } => last = n,
            GuestEvent::Pass {
                n,
                counter_ok: false,
            } => return Err(format!("source guest counter wrong at pass {n}")),
            GuestEvent::Stale { addr } => {
                return Err(format!("source guest found a stale page at {addr:#x}"))
            }
            GuestEvent::Failed(f) => return Err(format!("source guest failed: {f}")),
        }
    }
    Ok(last)
}

pub fn source(addr: &str, opts: &Opts) -> Res<Value> {
    let m = create_machine(opts)?;
    boot_guest(&m, opts)?;
    let msrs = {
        let v = m
            .vcpu
            .lock()
            .map_err(|_| "vCPU lock poisoned".to_string())?;
        probe_msrs(&m.kvm, &v).map_err(err("probe MSRs"))?
    };
    let mut runner = Runner::spawn(m.vcpu.clone(), opts.pages)?;
    std::thread::sleep(Duration::from_millis(opts.warmup_ms));
    let vcpu_t = Arc::new(StateTimings::default());
    let vm_t = Arc::new(StateTimings::default());
    let pause_mono_ns = Arc::new(AtomicU64::new(0));
    let paused = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let kvm_log = KvmDirtyLog::new(
        m.vm.clone(),
        vec![KvmSlot {
            slot: SLOT,
            gpa: 0,
            base_flags: 0,
        }],
        m.mode,
    );
    // This VMM writes guest memory only before the migration (the boot image), so the
    // KVM log alone is complete; a VMM with device emulation would use
    // UnionTracker(KvmDirtyLog, ExplicitTracker) (see livemig::dirty::kvm).
    let tracker: Box<dyn DirtyTracker> = if opts.drop_final_pages {
        Box::new(DropFinal {
            inner: Box::new(kvm_log),
            paused: paused.clone(),
            dropped: dropped.clone(),
        })
    } else {
        Box::new(kvm_log)
    };
    let mut policy =
        DowntimePolicy::with_target(Duration::from_micros((opts.target_ms * 1000.0) as u64));
    policy.max_rounds = opts.max_rounds;
    policy.max_time = Duration::from_secs(60);
    policy.on_limit = OnLimit::ForceBrownout;
    let t0 = Instant::now();
    // Ordering requirements (livemig::kvm): the destination restores in this order,
    // so the VM-wide state comes before the vCPU.
    let report = Migration::new(m.mem.clone())
        .tracker(tracker)
        .vm_control(Box::new(KvmVmControl {
            vcpu: runner.handle.clone(),
            pause_mono_ns: pause_mono_ns.clone(),
            paused: paused.clone(),
            full_pass_before_pause: opts.drop_final_pages.then(|| runner.last_pass.clone()),
            shared: m.vcpu.clone(),
            base_spins: opts.spins,
        }))
        .policy(Box::new(policy))
        .participant(Box::new(ProgressSaver {
            events: runner.events.clone(),
        }))
        .participant(Box::new(VmSaver::new(m.vm.clone(), vm_t.clone())))
        .participant(Box::new(VcpuSaver::new(
            "vcpu0",
            m.vcpu.clone(),
            msrs,
            vcpu_t.clone(),
        )))
        .streams(opts.streams)
        .run_tcp(addr)
        .map_err(err("migration"))?;
    let total = t0.elapsed();
    // Committed: the guest now runs on the destination; this copy stays paused.
    runner.stop();
    let dropped = dropped.load(Ordering::SeqCst);
    Ok(json!({
        "role": "src",
        "engine": report,
        "final_pages": report.final_pages + dropped,
        "final_pages_dropped": dropped,
        "pause_mono_ns": pause_mono_ns.load(Ordering::SeqCst),
        "state_save_ms": (vcpu_t.save_ns.load(Ordering::Relaxed) + vm_t.save_ns.load(Ordering::Relaxed)) as f64 / 1e6,
        "vcpu_state_bytes": vcpu_t.bytes.load(Ordering::Relaxed),
        "vm_state_bytes": vm_t.bytes.load(Ordering::Relaxed),
        "precopy_ms": report.total_ms - report.downtime_ms,
        "total_ms": ms(total),
        "dirty_log_mode": format!("{:?}", m.mode),
    }))
}
