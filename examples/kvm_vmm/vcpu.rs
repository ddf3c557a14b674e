//! The vCPU thread, and pausing it reliably from any thread.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use kvm_ioctls::VcpuExit;
use livemig::kvm::{guest, SharedVcpu};

use crate::{err, Res};

#[derive(Debug)]
pub enum GuestEvent {
    /// The guest completed pass `n`; `counter_ok`: r8 == r9 * pages at that moment.
    Pass { n: u32, counter_ok: bool },
    /// The guest found a page not holding the previous pass's value.
    Stale { addr: u32 },
    /// The vCPU stopped on something unexpected.
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    PauseRequested,
    Paused,
    Stop,
    Exited,
}

struct Ctl {
    state: Mutex<RunState>,
    cv: Condvar,
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_num: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's kvm_run.immediate_exit, set by the
            // vCPU thread while it holds an Arc to the vCPU (so the kvm_run mapping is
            // alive) and cleared before the thread exits.
            unsafe { p.write_volatile(1) };
        }
    });
}

fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Re-kick interval while waiting for a pause to be acknowledged.
const KICK_INTERVAL: Duration = Duration::from_micros(200);

/// Pauses and resumes the vCPU thread from any thread (shared with the engine's
/// `VmControl`).
#[derive(Clone)]
pub struct VcpuHandle {
    ctl: Arc<Ctl>,
    /// The vCPU thread; valid while its `Runner` (which holds the JoinHandle) lives.
    tid: libc::pthread_t,
}

impl VcpuHandle {
    fn kick(&self) {
        // SAFETY: the thread is not joined yet (its Runner holds the JoinHandle and
        // outlives every handle's use), so `tid` is valid; the signal's handler only
        // sets immediate_exit.
        unsafe { libc::pthread_kill(self.tid, kick_signal()) };
    }

    /// Pause: returns once the vCPU left KVM_RUN, completed any pending I/O exit and
    /// released the vCPU lock. Re-kicks every [`KICK_INTERVAL`] until acknowledged.
    pub fn pause(&self) -> Res<()> {
        let mut st = self
            .ctl
            .state
            .lock()
            .map_err(|_| "ctl poisoned".to_string())?;
        match *st {
            RunState::Exited | RunState::Stop => return Err("vCPU is not running".into()),
            RunState::Paused => return Ok(()),
            _ => *st = RunState::PauseRequested,
        }
        loop {
            self.kick();
            let (g, _) = self
                .ctl
                .cv
                .wait_timeout(st, KICK_INTERVAL)
                .map_err(|_| "ctl poisoned".to_string())?;
            st = g;
            match *st {
                RunState::Paused => return Ok(()),
                RunState::Exited => return Err("vCPU exited while pausing".into()),
                _ => {}
            }
        }
    }

    pub fn resume(&self) -> Res<()> {
        let mut st = self
            .ctl
            .state
            .lock()
            .map_err(|_| "ctl poisoned".to_string())?;
        if matches!(*st, RunState::Paused | RunState::PauseRequested) {
            *st = RunState::Running;
            self.ctl.cv.notify_all();
        }
        Ok(())
    }
}

pub struct Runner {
    pub handle: VcpuHandle,
    join: Option<JoinHandle<()>>,
    /// The last pass the guest reported (also sent as events).
    pub last_pass: Arc<AtomicU32>,
    pub events: crossbeam_channel::Receiver<GuestEvent>,
}

impl Runner {
    pub fn spawn(vcpu: SharedVcpu, pages: u64) -> Res<Self> {
        static HANDLER: std::sync::Once = std::sync::Once::new();
        let mut reg = Ok(());
        HANDLER.call_once(|| {
            reg = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        });
        reg.map_err(err("register kick signal handler"))?;
        let ctl = Arc::new(Ctl {
            state: Mutex::new(RunState::Running),
            cv: Condvar::new(),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let c = ctl.clone();
        let last_pass = Arc::new(AtomicU32::new(0));
        let lp = last_pass.clone();
        let join = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || vcpu_thread(vcpu, c, tx, pages, lp))
            .map_err(err("spawn vCPU thread"))?;
        let tid = join.as_pthread_t();
        Ok(Self {
            handle: VcpuHandle { ctl, tid },
            join: Some(join),
            last_pass,
            events: rx,
        })
    }

    pub fn stop(&mut self) {
        if let Ok(mut st) = self.handle.ctl.state.lock() {
            if *st != RunState::Exited {
                *st = RunState::Stop;
            }
            self.handle.ctl.cv.notify_all();
        }
        // The guest may sit in `hlt` inside KVM_RUN: kick until the thread is gone.
        while self.join.as_ref().is_some_and(|h| !h.is_finished()) {
            self.handle.kick();
            std::thread::sleep(KICK_INTERVAL);
        }
        if let Some(h) = self.join.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop();
    }
}

fn io_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

fn vcpu_thread(
    vcpu: SharedVcpu,
    ctl: Arc<Ctl>,
    tx: Sender<GuestEvent>,
    pages: u64,
    last_pass: Arc<AtomicU32>,
) {
    {
        let Ok(mut v) = vcpu.lock() else { return };
        let p: *mut u8 = &raw mut v.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
    }
    let finish = |ctl: &Ctl| {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        if let Ok(mut st) = ctl.state.lock() {
            *st = RunState::Exited;
        }
        ctl.cv.notify_all();
    };
    loop {
        {
            let Ok(mut st) = ctl.state.lock() else {
                return finish(&ctl);
            };
            if matches!(*st, RunState::PauseRequested | RunState::Stop) {
                // Pitfall: an I/O exit completes only on the next KVM_RUN. Re-enter once
                // with immediate_exit = 1: KVM finishes the pending PIO, then returns EINTR
                // with the guest state consistent for saving.
                if let Ok(mut v) = vcpu.lock() {
                    v.set_kvm_immediate_exit(1);
                    let _ = v.run();
                    v.set_kvm_immediate_exit(0);
                }
                if *st == RunState::Stop {
                    drop(st);
                    return finish(&ctl);
                }
                *st = RunState::Paused;
                ctl.cv.notify_all();
                while *st == RunState::Paused {
                    st = match ctl.cv.wait(st) {
                        Ok(g) => g,
                        Err(_) => return finish(&ctl),
                    };
                }
                if *st == RunState::Stop {
                    drop(st);
                    return finish(&ctl);
                }
                continue;
            }
        }
        let Ok(mut v) = vcpu.lock() else {
            return finish(&ctl);
        };
        let event = match v.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == guest::PORT_PASS => {
                let n = io_u32(data);
                let counter_ok = v.get_regs().is_ok_and(|r| r.r8 == r.r9 * pages);
                last_pass.store(n, Ordering::SeqCst);
                Some(GuestEvent::Pass { n, counter_ok })
            }
            Ok(VcpuExit::IoOut(port, data)) if port == guest::PORT_STALE => {
                Some(GuestEvent::Stale { addr: io_u32(data) })
            }
            Ok(other) => {
                let e = GuestEvent::Failed(format!("unexpected exit {other:?}"));
                drop(v);
                let _ = tx.send(e);
                return finish(&ctl);
            }
            Err(e) if e.errno() == libc::EINTR => {
                v.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => {
                drop(v);
                let _ = tx.send(GuestEvent::Failed(format!("KVM_RUN: {e}")));
                return finish(&ctl);
            }
        };
        drop(v);
        if let Some(e) = event {
            let _ = tx.send(e);
        }
    }
}
