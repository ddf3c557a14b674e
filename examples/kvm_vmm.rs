//! A small KVM VMM that live-migrates a running long-mode guest between two processes.
//!
//! ```text
//! cargo run --release --features kvm --example kvm_vmm -- demo
//! ```
//! `demo` re-executes this binary as `dst` (which creates its VM, vCPU and memory at
//! setup and listens on loopback TCP) and `src` (which boots the self-checking guest
//! of `livemig::kvm::guest`, lets it run, then migrates it with the livemig engine:
//! `Migration` with a `KvmDirtyLog` tracker, a `VmControl` that pauses the vCPU thread,
//! and the VM, vCPU and a small guest-progress participant; on the other side a
//! `Receiver` writing straight into the destination VM's memfd). The destination runs
//! the guest for a number of passes after switchover; the guest checks every page on
//! every pass and reports a stale page through an I/O port. The last line printed is
//! one JSON object with the outcome and the downtime breakdown. See docs/KVM.md.
//!
//! Pieces a VMM author would copy: `create_machine` (VM, memfd slot, irqchip, vCPU),
//! `Runner`/`VcpuHandle` (the vCPU thread and a reliable pause: immediate_exit + a
//! signal, re-kicked every 200 µs, plus the re-entry that completes a pending I/O exit),
//! and `KvmVmControl`.
//!
//! `--drop-final-pages` is the negative control: the source deliberately does not send
//! the pages dirtied in the final (paused) round, and the guest must notice.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::raw::{c_int, c_void};
use std::os::unix::thread::JoinHandleExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use crossbeam_channel::Sender;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use livemig::device::{ParticipantError, RestoreState, SaveState, Veto};
use livemig::dirty::{
    DirtyTracker, KvmDirtyLog, KvmDirtyLogMode, KvmSlot, TrackError, TrackerCaps,
};
use livemig::engine::{DowntimePolicy, Migration, OnLimit, VmControl};
use livemig::kvm::{
    guest, probe_msrs, SharedVcpu, StateTimings, VcpuRestorer, VcpuSaver, VmRestorer, VmSaver,
};
use livemig::memory::{GuestMemory, GuestRegion, PageSet};
use livemig::receiver::Receiver;
use livemig::transport::tcp::TcpAcceptor;
use livemig::PAGE_SIZE;
use serde_json::{json, Value};

/// Planted in xmm7 on the source (through `KVM_SET_XSAVE`), checked on the destination.
const XMM7_MAGIC: [u32; 4] = [0x1234_5678, 0x9abc_def0, 0x0bad_f00d, 0x5eed_1e55];
/// u32 index of xmm7 in the legacy FXSAVE area (byte 160 + 7 * 16).
const XMM7_WORD: usize = (160 + 7 * 16) / 4;
/// u32 index of XSTATE_BV (byte 512 of the xsave area).
const XSTATE_BV_WORD: usize = 512 / 4;

#[derive(Parser)]
#[command(about = "Example KVM VMM live-migrating a self-checking guest between two processes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run `dst` and `src` as two processes over loopback TCP and print one JSON line.
    Demo(Opts),
    /// Source VMM: boot the guest, then migrate it to `--addr`.
    Src {
        /// Destination address.
        #[arg(long)]
        addr: String,
        #[command(flatten)]
        opts: Opts,
    },
    /// Destination VMM: set up a VM, listen, receive, run the guest on.
    Dst {
        /// Address to listen on (port 0: any; the bound address is printed first).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        #[command(flatten)]
        opts: Opts,
    },
}

#[derive(Args, Clone, Debug)]
struct Opts {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    mem_mib: u64,
    /// Working-set pages the guest writes and checks on every pass.
    #[arg(long, default_value_t = 8192)]
    pages: u64,
    /// Busy-wait iterations per page written (lowers the dirty rate).
    #[arg(long, default_value_t = 0)]
    spins: u64,
    /// How long the guest runs on the source before the migration starts.
    #[arg(long, default_value_t = 300)]
    warmup_ms: u64,
    /// Guest passes the destination must see after switchover.
    #[arg(long, default_value_t = 10)]
    passes_after: u32,
    /// Downtime target of the engine's convergence policy (ms).
    #[arg(long, default_value_t = 10.0)]
    target_ms: f64,
    /// Page streams.
    #[arg(long, default_value_t = 2)]
    streams: u16,
    /// Give up converging after this many rounds (and brown out anyway).
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Negative control: do not send the final round's dirty pages (and, before
    /// pausing, let the guest complete one whole pass so that round is never empty).
    #[arg(long)]
    drop_final_pages: bool,
    /// Use plain KVM_GET_DIRTY_LOG even if manual protect is offered.
    #[arg(long)]
    plain_dirty_log: bool,
}

impl Opts {
    fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--mem-mib={}", self.mem_mib),
            format!("--pages={}", self.pages),
            format!("--spins={}", self.spins),
            format!("--warmup-ms={}", self.warmup_ms),
            format!("--passes-after={}", self.passes_after),
            format!("--target-ms={}", self.target_ms),
            format!("--streams={}", self.streams),
            format!("--max-rounds={}", self.max_rounds),
        ];
        if self.drop_final_pages {
            a.push("--drop-final-pages".into());
        }
        if self.plain_dirty_log {
            a.push("--plain-dirty-log".into());
        }
        a
    }
}

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Demo(opts) => demo(&opts),
        Cmd::Src { addr, opts } => source(&addr, &opts),
        Cmd::Dst { listen, opts } => destination(&listen, &opts),
    };
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("kvm_vmm: {e}");
            std::process::exit(1);
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for both processes on this host, so the
/// destination can compute downtime from the source's pause timestamp.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------
// The machine: VM, guest memory (a memfd registered as KVM slot 0), one vCPU.
// ---------------------------------------------------------------------------------

// Field order: the vCPU and VM fds are dropped before the memory they map.
struct Machine {
    vcpu: SharedVcpu,
    vm: Arc<VmFd>,
    kvm: Kvm,
    mode: KvmDirtyLogMode,
    mem: Arc<GuestMemory>,
}

const SLOT: u32 = 0;

fn create_machine(opts: &Opts) -> Res<Machine> {
    let kvm = Kvm::new().map_err(err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
    // Ordering requirement: manual protect must be enabled before the slot exists.
    let mode = if opts.plain_dirty_log {
        KvmDirtyLogMode::Plain
    } else {
        KvmDirtyLog::enable_manual_protect(&vm).map_err(err("enable manual protect"))?
    };
    let bytes = (opts.mem_mib as usize) << 20;
    if guest::WORKSET_GPA + opts.pages * PAGE_SIZE as u64 > bytes as u64 {
        return Err(format!(
            "{} pages do not fit in {} MiB",
            opts.pages, opts.mem_mib
        ));
    }
    let region = GuestRegion::memfd(0, bytes, "guest-ram").map_err(err("memfd"))?;
    let slot = kvm_userspace_memory_region {
        slot: SLOT,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: bytes as u64,
        userspace_addr: region.host_addr() as u64,
    };
    // SAFETY: the memfd mapping is owned by `Machine::mem`, which outlives the VM fd
    // (field order, and the process keeps the Arc until exit).
    unsafe { vm.set_user_memory_region(slot) }.map_err(err("KVM_SET_USER_MEMORY_REGION"))?;
    let _ = vm.set_tss_address(0xfffb_d000);
    vm.create_irq_chip().map_err(err("KVM_CREATE_IRQCHIP"))?;
    let vcpu = vm.create_vcpu(0).map_err(err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    let mem = Arc::new(GuestMemory::new(vec![region]).map_err(err("guest memory"))?);
    Ok(Machine {
        vcpu: Arc::new(Mutex::new(vcpu)),
        vm: Arc::new(vm),
        kvm,
        mode,
        mem,
    })
}

fn boot_guest(m: &Machine, opts: &Opts) -> Res<()> {
    guest::write_boot_image(&m.mem.regions()[0]).map_err(err("boot image"))?;
    let vcpu = m
        .vcpu
        .lock()
        .map_err(|_| "vCPU lock poisoned".to_string())?;
    let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&guest::long_mode_sregs(sregs))
        .map_err(err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&guest::initial_regs(opts.pages, opts.spins))
        .map_err(err("KVM_SET_REGS"))?;
    let mut xsave = vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
    xsave.region[XMM7_WORD..XMM7_WORD + 4].copy_from_slice(&XMM7_MAGIC);
    xsave.region[XSTATE_BV_WORD] |= 0b10; // SSE state valid (else KVM ignores xmm).
                                          // SAFETY: a legacy 4 KiB xsave area just read with KVM_GET_XSAVE, two words changed.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    Ok(())
}

fn xmm7_ok(m: &Machine) -> Res<bool> {
    let vcpu = m
        .vcpu
        .lock()
        .map_err(|_| "vCPU lock poisoned".to_string())?;
    let xsave = vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
    Ok(xsave.region[XMM7_WORD..XMM7_WORD + 4] == XMM7_MAGIC)
}

// ---------------------------------------------------------------------------------
// The vCPU thread, and pausing it reliably.
// ---------------------------------------------------------------------------------

#[derive(Debug)]
enum GuestEvent {
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
struct VcpuHandle {
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
    fn pause(&self) -> Res<()> {
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

    fn resume(&self) -> Res<()> {
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

struct Runner {
    handle: VcpuHandle,
    join: Option<JoinHandle<()>>,
    /// The last pass the guest reported (also sent as events).
    last_pass: Arc<AtomicU32>,
    events: crossbeam_channel::Receiver<GuestEvent>,
}

impl Runner {
    fn spawn(vcpu: SharedVcpu, pages: u64) -> Res<Self> {
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

    fn stop(&mut self) {
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

// ---------------------------------------------------------------------------------
// demo: two processes.
// ---------------------------------------------------------------------------------

fn last_json_line(out: &[u8]) -> Res<Value> {
    let text = String::from_utf8_lossy(out);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or("no JSON output")?;
    serde_json::from_str(line).map_err(err("parse JSON"))
}

fn demo(opts: &Opts) -> Res<Value> {
    let exe = std::env::current_exe().map_err(err("current_exe"))?;
    let mut dst = Command::new(&exe)
        .arg("dst")
        .args(opts.to_args())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(err("spawn dst"))?;
    let mut dst_out = BufReader::new(dst.stdout.take().ok_or("dst stdout")?);
    let mut first = String::new();
    dst_out
        .read_line(&mut first)
        .map_err(err("read dst address"))?;
    let addr = first
        .trim()
        .strip_prefix("LISTENING ")
        .ok_or_else(|| format!("dst said {first:?}"))?
        .to_string();
    let src = Command::new(&exe)
        .arg("src")
        .arg(format!("--addr={addr}"))
        .args(opts.to_args())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(err("spawn src"))?;
    let src_out = src.wait_with_output().map_err(err("wait src"))?;
    let mut rest = Vec::new();
    dst_out
        .read_to_end(&mut rest)
        .map_err(err("read dst output"))?;
    let dst_status = dst.wait().map_err(err("wait dst"))?;
    if !src_out.status.success() || !dst_status.success() {
        return Err(format!(
            "src exited {}, dst exited {}",
            src_out.status, dst_status
        ));
    }
    let s = last_json_line(&src_out.stdout)?;
    let d = last_json_line(&rest)?;
    let pause_ns = s["pause_mono_ns"].as_u64().unwrap_or(0);
    let resume_ns = d["resume_mono_ns"].as_u64().unwrap_or(0);
    let downtime_ms = resume_ns.saturating_sub(pause_ns) as f64 / 1e6;
    let e = &s["engine"];
    let bd = &e["downtime_breakdown"];
    Ok(json!({
        "guest_continued": d["guest_continued"],
        "stale_pages": d["stale_pages"],
        "passes_after": d["passes_after"],
        "first_pass_dst": d["first_pass"],
        "last_pass_src": d["first_pass_expected"].as_u64().map(|v| v.saturating_sub(1)),
        "rounds": e["rounds"],
        "round_pages": e["round_table"].as_array().map(|t| t.iter().map(|r| r["pages"].clone()).collect::<Vec<_>>()),
        "downtime_ms": downtime_ms,
        "downtime": {
            "definition": "source pause request -> destination about to KVM_RUN (CLOCK_MONOTONIC, both processes)",
            "pause_vcpu_ms": bd["pause_ms"],
            "final_pages": s["final_pages"],
            "final_pages_dropped": s["final_pages_dropped"],
            "final_harvest_ms": bd["final_harvest_ms"],
            "final_pages_ms": bd["final_pages_ms"],
            "device_state_ms": bd["device_state_ms"],
            "state_save_ms": s["state_save_ms"],
            "vcpu_state_bytes": s["vcpu_state_bytes"],
            "vm_state_bytes": s["vm_state_bytes"],
            "device_state_bytes": bd["device_state_bytes"],
            "digest_ms": bd["digest_ms"],
            "commit_ms": bd["commit_ms"],
            "dest_verify_ms": bd["dest_verify_ms"],
            "state_validate_ms": d["state_validate_ms"],
            "state_restore_ms": d["state_restore_ms"],
            "dst_commit_to_run_ms": d["commit_to_run_ms"],
            "engine_downtime_ms": e["downtime_ms"],
        },
        "precopy_ms": s["precopy_ms"],
        "dst_setup_ms": d["setup_ms"],
        "dirty_log_mode": s["dirty_log_mode"],
        "xmm7_ok": d["xmm7_ok"],
        "counter_ok": d["counter_ok"],
        "verified": e["verified"],
        "dropped_final_pages": opts.drop_final_pages,
        "transport": format!("livemig engine over TCP ({}, {} streams)", e["mode"].as_str().unwrap_or("?"), e["streams"]),
        "brownout_reason": e["brownout_reason"],
        "pages": opts.pages,
        "mem_mib": opts.mem_mib,
    }))
}

// ---------------------------------------------------------------------------------
// Engine glue: VmControl, the drop-final fault injector, a guest-progress participant.
// ---------------------------------------------------------------------------------

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
    fn pause(&mut self) -> Result<(), String> {
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
    fn resume(&mut self) -> Result<(), String> {
        self.paused.store(false, Ordering::SeqCst);
        self.vcpu.resume()
    }
    fn throttle(&mut self, percent: u8) -> Result<(), String> {
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
        r
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

const PROGRESS_ID: &str = "guest-progress";

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

struct ProgressRestorer {
    last_pass: Arc<AtomicU64>,
}

impl RestoreState for ProgressRestorer {
    fn id(&self) -> &str {
        PROGRESS_ID
    }
    fn validate_setup(&mut self, _info: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn validate_state(&mut self, version: u32, blob: &[u8]) -> Result<(), Veto> {
        if version != 1 || blob.len() != 4 {
            return Err(Veto {
                participant: PROGRESS_ID.into(),
                reason: format!("bad blob v{version}, {} bytes", blob.len()),
            });
        }
        Ok(())
    }
    fn restore(&mut self, _version: u32, blob: &[u8]) -> Result<(), ParticipantError> {
        let v = u32::from_le_bytes(blob.try_into().map_err(|_| ParticipantError::Failed {
            participant: PROGRESS_ID.into(),
            message: "blob is not 4 bytes".into(),
        })?);
        self.last_pass
            .store(u64::from(v) | 1 << 63, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&mut self) {}
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

// ---------------------------------------------------------------------------------
// Source and destination.
// ---------------------------------------------------------------------------------

fn source(addr: &str, opts: &Opts) -> Res<Value> {
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

fn destination(listen: &str, opts: &Opts) -> Res<Value> {
    // The VM, its memory and vCPU exist before any page arrives: not downtime.
    let t = Instant::now();
    let m = create_machine(opts)?;
    m.mem.regions()[0]
        .prefault(0, m.mem.total_pages())
        .map_err(err("prefault"))?;
    let setup = t.elapsed();
    let listener = TcpListener::bind(listen).map_err(err("bind"))?;
    println!(
        "LISTENING {}",
        listener.local_addr().map_err(err("local_addr"))?
    );
    std::io::stdout().flush().map_err(err("stdout"))?;
    let timings = Arc::new(StateTimings::default());
    let last_pass = Arc::new(AtomicU64::new(0));
    let received = Receiver::new()
        .memory(m.mem.clone())
        .participant(Box::new(ProgressRestorer {
            last_pass: last_pass.clone(),
        }))
        .participant(Box::new(VmRestorer::new(m.vm.clone(), timings.clone())))
        .participant(Box::new(VcpuRestorer::new(
            "vcpu0",
            m.vcpu.clone(),
            timings.clone(),
        )))
        .run(&TcpAcceptor::from_listener(listener))
        .map_err(err("receive"))?;
    let committed = Instant::now();
    let xmm7 = xmm7_ok(&m)?;
    let last_pass = last_pass.load(Ordering::SeqCst);
    if last_pass & (1 << 63) == 0 {
        return Err("guest-progress state never arrived".into());
    }
    let last_pass_src = last_pass as u32;
    let resume_mono_ns = mono_ns();
    let commit_to_run = committed.elapsed();
    let mut runner = Runner::spawn(m.vcpu.clone(), opts.pages)?;
    let (mut passes, mut first, mut prev, mut stale, mut counter_ok, mut consecutive) =
        (0u32, None, 0u32, 0u32, true, true);
    let mut failure = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while passes < opts.passes_after && stale == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match runner.events.recv_timeout(left) {
            Ok(GuestEvent::Pass { n, counter_ok: ok }) => {
                if first.is_none() {
                    first = Some(n);
                } else if n != prev + 1 {
                    consecutive = false;
                }
                prev = n;
                counter_ok &= ok;
                passes += 1;
            }
            Ok(GuestEvent::Stale { addr }) => {
                stale += 1;
                eprintln!("dst: guest found stale page at {addr:#x}");
            }
            Ok(GuestEvent::Failed(f)) => {
                failure = Some(f);
                break;
            }
            Err(_) => {
                failure = Some("timed out waiting for guest passes".into());
                break;
            }
        }
    }
    runner.stop();
    let first_ok = first == Some(last_pass_src + 1);
    let continued = failure.is_none()
        && stale == 0
        && passes >= opts.passes_after
        && first_ok
        && consecutive
        && counter_ok
        && xmm7;
    Ok(json!({
        "role": "dst",
        "guest_continued": continued,
        "stale_pages": stale,
        "passes_after": passes,
        "first_pass": first,
        "first_pass_expected": last_pass_src + 1,
        "consecutive": consecutive,
        "counter_ok": counter_ok,
        "xmm7_ok": xmm7,
        "failure": failure,
        "setup_ms": ms(setup),
        "resume_mono_ns": resume_mono_ns,
        "commit_to_run_ms": ms(commit_to_run),
        "state_validate_ms": timings.validate_ns.load(Ordering::Relaxed) as f64 / 1e6,
        "state_restore_ms": timings.restore_ns.load(Ordering::Relaxed) as f64 / 1e6,
        "engine": received.report,
    }))
}
