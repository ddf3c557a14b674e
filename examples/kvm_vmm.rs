//! A small KVM VMM that live-migrates a running long-mode guest between two processes.
//!
//! ```text
//! cargo run --release --features kvm --example kvm_vmm -- demo
//! ```
//! `demo` re-executes this binary as `dst` (which creates its VM, vCPU and memory at
//! setup and listens on loopback TCP) and `src` (which boots the self-checking guest
//! of `livemig::kvm::guest`, lets it run, then migrates it with pre-copy rounds driven
//! by the KVM dirty log). The destination runs the guest for a number of passes after
//! switchover; the guest checks every page on every pass and reports a stale page
//! through an I/O port. The last line printed is one JSON object with the outcome and
//! the downtime breakdown.
//!
//! `--drop-final-pages` is the negative control: the source deliberately does not send
//! the pages dirtied in the final (paused) round, and the guest must notice.

use std::cell::Cell;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::raw::{c_int, c_void};
use std::os::unix::thread::JoinHandleExt;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use crossbeam_channel::{Receiver, Sender};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use livemig::device::{RestoreState, SaveState};
use livemig::dirty::{DirtyTracker, KvmDirtyLog, KvmDirtyLogMode, KvmSlot};
use livemig::kvm::{guest, probe_msrs, SharedVcpu, StateTimings, VcpuRestorer, VcpuSaver, VmRestorer, VmSaver};
use livemig::memory::{GuestMemory, GuestRegion, PageSet};
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
    /// Enter brownout once a round has at most this many dirty pages.
    #[arg(long, default_value_t = 256)]
    target_pages: u64,
    /// Give up converging after this many rounds (and brown out anyway).
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Negative control: do not send the final round's dirty pages.
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
            format!("--target-pages={}", self.target_pages),
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
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
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
        return Err(format!("{} pages do not fit in {} MiB", opts.pages, opts.mem_mib));
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
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    let mem = Arc::new(GuestMemory::new(vec![region]).map_err(err("guest memory"))?);
    Ok(Machine { vcpu: Arc::new(Mutex::new(vcpu)), vm: Arc::new(vm), kvm, mode, mem })
}

fn boot_guest(m: &Machine, opts: &Opts) -> Res<()> {
    guest::write_boot_image(&m.mem.regions()[0]).map_err(err("boot image"))?;
    let vcpu = m.vcpu.lock().map_err(|_| "vCPU lock poisoned".to_string())?;
    let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&guest::long_mode_sregs(sregs)).map_err(err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&guest::initial_regs(opts.pages, opts.spins)).map_err(err("KVM_SET_REGS"))?;
    let mut xsave = vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
    xsave.region[XMM7_WORD..XMM7_WORD + 4].copy_from_slice(&XMM7_MAGIC);
    xsave.region[XSTATE_BV_WORD] |= 0b10; // SSE state valid (else KVM ignores xmm).
    // SAFETY: a legacy 4 KiB xsave area just read with KVM_GET_XSAVE, two words changed.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    Ok(())
}

fn xmm7_ok(m: &Machine) -> Res<bool> {
    let vcpu = m.vcpu.lock().map_err(|_| "vCPU lock poisoned".to_string())?;
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

struct Runner {
    ctl: Arc<Ctl>,
    handle: Option<JoinHandle<()>>,
    events: Receiver<GuestEvent>,
}

impl Runner {
    fn spawn(vcpu: SharedVcpu, pages: u64) -> Res<Self> {
        static HANDLER: std::sync::Once = std::sync::Once::new();
        let mut reg = Ok(());
        HANDLER.call_once(|| reg = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick));
        reg.map_err(err("register kick signal handler"))?;
        let ctl = Arc::new(Ctl { state: Mutex::new(RunState::Running), cv: Condvar::new() });
        let (tx, rx) = crossbeam_channel::unbounded();
        let c = ctl.clone();
        let handle = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || vcpu_thread(vcpu, c, tx, pages))
            .map_err(err("spawn vCPU thread"))?;
        Ok(Self { ctl, handle: Some(handle), events: rx })
    }

    fn kick(&self) {
        if let Some(h) = &self.handle {
            // SAFETY: the thread is not joined yet (we hold its JoinHandle), so its
            // pthread_t is valid; the signal's handler only sets immediate_exit.
            unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
        }
    }

    /// Pause: returns once the vCPU left KVM_RUN, completed any pending I/O exit and
    /// released the vCPU lock.
    fn pause(&self) -> Res<()> {
        let mut st = self.ctl.state.lock().map_err(|_| "ctl poisoned".to_string())?;
        match *st {
            RunState::Exited | RunState::Stop => return Err("vCPU is not running".into()),
            RunState::Paused => return Ok(()),
            _ => *st = RunState::PauseRequested,
        }
        loop {
            self.kick();
            let (g, _) = self.ctl.cv.wait_timeout(st, KICK_INTERVAL).map_err(|_| "ctl poisoned".to_string())?;
            st = g;
            match *st {
                RunState::Paused => return Ok(()),
                RunState::Exited => return Err("vCPU exited while pausing".into()),
                _ => {}
            }
        }
    }

    fn resume(&self) -> Res<()> {
        let mut st = self.ctl.state.lock().map_err(|_| "ctl poisoned".to_string())?;
        if *st == RunState::Paused {
            *st = RunState::Running;
            self.ctl.cv.notify_all();
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Ok(mut st) = self.ctl.state.lock() {
            if *st != RunState::Exited {
                *st = RunState::Stop;
            }
            self.ctl.cv.notify_all();
        }
        // The guest may sit in `hlt` inside KVM_RUN: kick until the thread is gone.
        while self.handle.as_ref().is_some_and(|h| !h.is_finished()) {
            self.kick();
            std::thread::sleep(KICK_INTERVAL);
        }
        if let Some(h) = self.handle.take() {
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

fn vcpu_thread(vcpu: SharedVcpu, ctl: Arc<Ctl>, tx: Sender<GuestEvent>, pages: u64) {
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
            let Ok(mut st) = ctl.state.lock() else { return finish(&ctl) };
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
        let Ok(mut v) = vcpu.lock() else { return finish(&ctl) };
        let event = match v.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == guest::PORT_PASS => {
                let n = io_u32(data);
                let counter_ok = v.get_regs().is_ok_and(|r| r.r8 == r.r9 * pages);
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
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).ok_or("no JSON output")?;
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
    dst_out.read_line(&mut first).map_err(err("read dst address"))?;
    let addr = first.trim().strip_prefix("LISTENING ").ok_or_else(|| format!("dst said {first:?}"))?.to_string();
    let src = Command::new(&exe)
        .arg("src")
        .arg(format!("--addr={addr}"))
        .args(opts.to_args())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(err("spawn src"))?;
    let src_out = src.wait_with_output().map_err(err("wait src"))?;
    let mut rest = Vec::new();
    dst_out.read_to_end(&mut rest).map_err(err("read dst output"))?;
    let dst_status = dst.wait().map_err(err("wait dst"))?;
    if !src_out.status.success() || !dst_status.success() {
        return Err(format!("src exited {}, dst exited {}", src_out.status, dst_status));
    }
    let s = last_json_line(&src_out.stdout)?;
    let d = last_json_line(&rest)?;
    let pause_ns = s["pause_mono_ns"].as_u64().unwrap_or(0);
    let resume_ns = d["resume_mono_ns"].as_u64().unwrap_or(0);
    let downtime_ms = resume_ns.saturating_sub(pause_ns) as f64 / 1e6;
    Ok(json!({
        "guest_continued": d["guest_continued"],
        "stale_pages": d["stale_pages"],
        "passes_after": d["passes_after"],
        "first_pass_dst": d["first_pass"],
        "last_pass_src": s["last_pass"],
        "rounds": s["rounds"],
        "round_pages": s["round_pages"],
        "downtime_ms": downtime_ms,
        "downtime": {
            "pause_vcpu_ms": s["pause_vcpu_ms"],
            "final_pages": s["final_pages"],
            "final_round_ms": s["final_round_ms"],
            "state_save_ms": s["state_save_ms"],
            "vcpu_state_bytes": s["vcpu_state_bytes"],
            "vm_state_bytes": s["vm_state_bytes"],
            "state_validate_ms": d["state_validate_ms"],
            "state_restore_ms": d["state_restore_ms"],
            "dst_receive_to_run_ms": d["receive_to_run_ms"],
        },
        "precopy_ms": s["precopy_ms"],
        "dst_setup_ms": d["setup_ms"],
        "dirty_log_mode": s["dirty_log_mode"],
        "xmm7_ok": d["xmm7_ok"],
        "counter_ok": d["counter_ok"],
        "dropped_final_pages": opts.drop_final_pages,
        "transport": s["transport"],
        "pages": opts.pages,
        "mem_mib": opts.mem_mib,
    }))
}

// ---------------------------------------------------------------------------------
// Source and destination.
// ---------------------------------------------------------------------------------

/// What the source's migration produced (whatever carried it).
struct SourceOutcome {
    rounds: u32,
    round_pages: Vec<u64>,
    final_pages: u64,
    final_round: Duration,
    pause_vcpu: Duration,
    pause_mono_ns: u64,
    precopy: Duration,
    transport: &'static str,
    /// The last guest pass seen before the pause.
    last_pass: u32,
}

fn source(addr: &str, opts: &Opts) -> Res<Value> {
    let m = create_machine(opts)?;
    boot_guest(&m, opts)?;
    let msrs = {
        let v = m.vcpu.lock().map_err(|_| "vCPU lock poisoned".to_string())?;
        probe_msrs(&m.kvm, &v).map_err(err("probe MSRs"))?
    };
    let runner = Runner::spawn(m.vcpu.clone(), opts.pages)?;
    std::thread::sleep(Duration::from_millis(opts.warmup_ms));
    let vcpu_t = Arc::new(StateTimings::default());
    let vm_t = Arc::new(StateTimings::default());
    // Ordering requirement (see livemig::kvm): vCPUs saved before the VM.
    let participants: Vec<Box<dyn SaveState>> = vec![
        Box::new(VcpuSaver::new("vcpu0", m.vcpu.clone(), msrs, vcpu_t.clone())),
        Box::new(VmSaver::new(m.vm.clone(), vm_t.clone())),
    ];
    let outcome = migrate_source(&m, &runner, participants, addr, opts)?;
    let last_pass = outcome.last_pass;
    Ok(json!({
        "role": "src",
        "transport": outcome.transport,
        "rounds": outcome.rounds,
        "round_pages": outcome.round_pages,
        "final_pages": outcome.final_pages,
        "final_round_ms": ms(outcome.final_round),
        "pause_vcpu_ms": ms(outcome.pause_vcpu),
        "pause_mono_ns": outcome.pause_mono_ns,
        "state_save_ms": (vcpu_t.save_ns.load(Ordering::Relaxed) + vm_t.save_ns.load(Ordering::Relaxed)) as f64 / 1e6,
        "vcpu_state_bytes": vcpu_t.bytes.load(Ordering::Relaxed),
        "vm_state_bytes": vm_t.bytes.load(Ordering::Relaxed),
        "precopy_ms": ms(outcome.precopy),
        "last_pass": last_pass,
        "dirty_log_mode": format!("{:?}", m.mode),
    }))
}

fn destination(listen: &str, opts: &Opts) -> Res<Value> {
    // The VM, its memory and vCPU exist before any page arrives: not downtime.
    let t = Instant::now();
    let m = create_machine(opts)?;
    m.mem.regions()[0].prefault(0, m.mem.total_pages()).map_err(err("prefault"))?;
    let setup = t.elapsed();
    let listener = TcpListener::bind(listen).map_err(err("bind"))?;
    println!("LISTENING {}", listener.local_addr().map_err(err("local_addr"))?);
    std::io::stdout().flush().map_err(err("stdout"))?;
    let timings = Arc::new(StateTimings::default());
    // Ordering requirement (see livemig::kvm): the VM restored before its vCPUs.
    let participants: Vec<Box<dyn RestoreState>> = vec![
        Box::new(VmRestorer::new(m.vm.clone(), timings.clone())),
        Box::new(VcpuRestorer::new("vcpu0", m.vcpu.clone(), timings.clone())),
    ];
    let got = migrate_destination(&m, participants, listener)?;
    let xmm7 = xmm7_ok(&m)?;
    let resume_mono_ns = mono_ns();
    let receive_to_run = got.state_received.elapsed();
    let mut runner = Runner::spawn(m.vcpu.clone(), opts.pages)?;
    let (mut passes, mut first, mut prev, mut stale, mut counter_ok, mut consecutive) = (0u32, None, 0u32, 0u32, true, true);
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
    let first_ok = first == Some(got.last_pass_src + 1);
    let continued = failure.is_none() && stale == 0 && passes >= opts.passes_after && first_ok && consecutive && counter_ok && xmm7;
    Ok(json!({
        "role": "dst",
        "guest_continued": continued,
        "stale_pages": stale,
        "passes_after": passes,
        "first_pass": first,
        "first_pass_expected": got.last_pass_src + 1,
        "consecutive": consecutive,
        "counter_ok": counter_ok,
        "xmm7_ok": xmm7,
        "failure": failure,
        "setup_ms": ms(setup),
        "resume_mono_ns": resume_mono_ns,
        "receive_to_run_ms": ms(receive_to_run),
        "state_validate_ms": timings.validate_ns.load(Ordering::Relaxed) as f64 / 1e6,
        "state_restore_ms": timings.restore_ns.load(Ordering::Relaxed) as f64 / 1e6,
        "pages_received": got.pages,
    }))
}

/// What the destination got.
struct DestOutcome {
    /// The last guest pass the source saw before pausing.
    last_pass_src: u32,
    /// When the device state arrived.
    state_received: Instant,
    pages: u64,
}

// ---------------------------------------------------------------------------------
// Transport: this example's own minimal protocol over one TCP stream. It stands in
// for the livemig engine until that lands; only `migrate_source` and
// `migrate_destination` know about it.
//
//   PAGES   tag 1 | count u32 | count × (page index u64, 4096 bytes)
//   STATE   tag 2 | pause_mono_ns u64 | last_pass u32 | n u32 |
//                   n × (id_len u16, id, version u32, len u32, blob)
//   (dst → src) ACK 1 byte: 1 = restored, 0 = vetoed/failed
// ---------------------------------------------------------------------------------

const TAG_PAGES: u8 = 1;
const TAG_STATE: u8 = 2;
const BATCH: usize = 256;

fn send_pages(w: &mut impl Write, mem: &GuestMemory, pages: &mut dyn Iterator<Item = u64>, skip_zero: bool) -> Res<u64> {
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH * (8 + PAGE_SIZE));
    let mut n = 0u32;
    let mut total = 0u64;
    let flush = |batch: &mut Vec<u8>, n: &mut u32, w: &mut dyn Write| -> Res<()> {
        if *n > 0 {
            w.write_all(&[TAG_PAGES]).map_err(err("send"))?;
            w.write_all(&n.to_le_bytes()).map_err(err("send"))?;
            w.write_all(batch).map_err(err("send"))?;
            batch.clear();
            *n = 0;
        }
        Ok(())
    };
    for index in pages {
        mem.read_pages(index, &mut buf).map_err(err("read page"))?;
        if skip_zero && buf.iter().all(|&b| b == 0) {
            continue;
        }
        batch.extend_from_slice(&index.to_le_bytes());
        batch.extend_from_slice(&buf);
        n += 1;
        total += 1;
        if n as usize == BATCH {
            flush(&mut batch, &mut n, w)?;
        }
    }
    flush(&mut batch, &mut n, w)?;
    Ok(total)
}

fn migrate_source(
    m: &Machine,
    runner: &Runner,
    mut participants: Vec<Box<dyn SaveState>>,
    addr: &str,
    opts: &Opts,
) -> Res<SourceOutcome> {
    let stream = TcpStream::connect(addr).map_err(err("connect"))?;
    stream.set_nodelay(true).map_err(err("nodelay"))?;
    let mut ack = stream.try_clone().map_err(err("clone stream"))?;
    let mut w = BufWriter::with_capacity(1 << 20, stream);
    let mem = &*m.mem;
    let total = mem.total_pages();
    let t0 = Instant::now();
    let mut tracker = KvmDirtyLog::new(m.vm.clone(), vec![KvmSlot { slot: SLOT, gpa: 0, base_flags: 0 }], m.mode);
    tracker.start(mem).map_err(err("tracker start"))?;
    // Round 0: every page (zero pages are implied: the destination's memory is fresh).
    let mut round_pages = vec![send_pages(&mut w, mem, &mut (0..total), true)?];
    let mut set = PageSet::new(total);
    loop {
        set.clear();
        tracker.harvest(mem, &mut set).map_err(err("harvest"))?;
        let dirty = set.count();
        round_pages.push(send_pages(&mut w, mem, &mut set.iter(), false)?);
        w.flush().map_err(err("send"))?;
        if dirty <= opts.target_pages || round_pages.len() as u32 >= opts.max_rounds {
            break;
        }
    }
    let precopy = t0.elapsed();
    // Brownout.
    let pause_mono_ns = mono_ns();
    let t = Instant::now();
    runner.pause()?;
    let pause_vcpu = t.elapsed();
    let t = Instant::now();
    set.clear();
    tracker.harvest(mem, &mut set).map_err(err("final harvest"))?;
    let final_pages = set.count();
    if !opts.drop_final_pages {
        send_pages(&mut w, mem, &mut set.iter(), false)?;
    }
    let final_round = t.elapsed();
    tracker.stop(mem).map_err(err("tracker stop"))?;
    let last_pass = last_guest_pass(runner)?;
    let mut msg = vec![TAG_STATE];
    msg.extend_from_slice(&pause_mono_ns.to_le_bytes());
    msg.extend_from_slice(&last_pass.to_le_bytes());
    msg.extend_from_slice(&(participants.len() as u32).to_le_bytes());
    for p in &mut participants {
        let mut blob = Vec::new();
        p.save(&mut blob).map_err(err("save state"))?;
        msg.extend_from_slice(&(p.id().len() as u16).to_le_bytes());
        msg.extend_from_slice(p.id().as_bytes());
        msg.extend_from_slice(&p.version().to_le_bytes());
        msg.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        msg.extend_from_slice(&blob);
    }
    w.write_all(&msg).map_err(err("send state"))?;
    w.flush().map_err(err("send state"))?;
    let mut a = [0u8; 1];
    ack.read_exact(&mut a).map_err(err("read ack"))?;
    if a[0] != 1 {
        runner.resume()?;
        for p in &mut participants {
            p.rolled_back();
        }
        return Err("destination refused the state; source guest resumed".into());
    }
    for p in &mut participants {
        p.committed();
    }
    Ok(SourceOutcome {
        rounds: round_pages.len() as u32,
        round_pages,
        final_pages,
        final_round,
        pause_vcpu,
        pause_mono_ns,
        precopy,
        transport: "example-tcp",
        last_pass,
    })
}

/// Drain the source guest's events: the last pass it reported (fails on a guest error).
fn last_guest_pass(runner: &Runner) -> Res<u32> {
    let mut last = 0;
    for e in runner.events.try_iter() {
        match e {
            GuestEvent::Pass { n, counter_ok: true } => last = n,
            GuestEvent::Pass { n, counter_ok: false } => return Err(format!("source guest counter wrong at pass {n}")),
            GuestEvent::Stale { addr } => return Err(format!("source guest found a stale page at {addr:#x}")),
            GuestEvent::Failed(f) => return Err(format!("source guest failed: {f}")),
        }
    }
    Ok(last)
}

fn read_u32(r: &mut impl Read) -> Res<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(err("receive"))?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Res<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(err("receive"))?;
    Ok(u64::from_le_bytes(b))
}

fn migrate_destination(
    m: &Machine,
    mut participants: Vec<Box<dyn RestoreState>>,
    listener: TcpListener,
) -> Res<DestOutcome> {
    let (stream, _) = listener.accept().map_err(err("accept"))?;
    let mut ack = stream.try_clone().map_err(err("clone stream"))?;
    let mut r = BufReader::with_capacity(1 << 20, stream);
    let mem = &*m.mem;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut pages = 0u64;
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag).map_err(err("receive"))?;
        match tag[0] {
            TAG_PAGES => {
                let n = read_u32(&mut r)?;
                for _ in 0..n {
                    let index = read_u64(&mut r)?;
                    r.read_exact(&mut page).map_err(err("receive"))?;
                    mem.write_pages(index, &page).map_err(err("write page"))?;
                }
                pages += u64::from(n);
            }
            TAG_STATE => {
                let state_received = Instant::now();
                let _pause_ns = read_u64(&mut r)?;
                let last_pass_src = read_u32(&mut r)?;
                let n = read_u32(&mut r)?;
                let mut blobs = Vec::new();
                for _ in 0..n {
                    let mut l = [0u8; 2];
                    r.read_exact(&mut l).map_err(err("receive"))?;
                    let mut id = vec![0u8; u16::from_le_bytes(l) as usize];
                    r.read_exact(&mut id).map_err(err("receive"))?;
                    let version = read_u32(&mut r)?;
                    let len = read_u32(&mut r)? as usize;
                    if len > livemig::kvm::state::MAX_STATE_BYTES {
                        return Err("state blob too large".into());
                    }
                    let mut blob = vec![0u8; len];
                    r.read_exact(&mut blob).map_err(err("receive"))?;
                    blobs.push((String::from_utf8_lossy(&id).into_owned(), version, blob));
                }
                // Validate every participant before restoring any.
                let mut vetoed = None;
                for p in &mut participants {
                    let Some((_, v, b)) = blobs.iter().find(|(id, _, _)| id == p.id()) else {
                        vetoed = Some(format!("no state for {}", p.id()));
                        break;
                    };
                    if let Err(v) = p.validate_state(*v, b) {
                        vetoed = Some(v.to_string());
                        break;
                    }
                }
                if let Some(v) = vetoed {
                    participants.iter_mut().for_each(|p| p.discard());
                    let _ = ack.write_all(&[0]);
                    return Err(v);
                }
                for p in &mut participants {
                    let (_, v, b) = blobs.iter().find(|(id, _, _)| id == p.id()).ok_or("state vanished")?;
                    if let Err(e) = p.restore(*v, b) {
                        let _ = ack.write_all(&[0]);
                        return Err(e.to_string());
                    }
                }
                ack.write_all(&[1]).map_err(err("send ack"))?;
                return Ok(DestOutcome { last_pass_src, state_received, pages });
            }
            t => return Err(format!("unknown message tag {t}")),
        }
    }
}
