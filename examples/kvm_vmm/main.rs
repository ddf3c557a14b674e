//! A small KVM VMM that live-migrates a running long-mode guest between two processes.
//!
//! ```text
//! cargo run --release --features kvm,vm-memory --example kvm_vmm -- demo
//! ```
//! `demo` re-executes this binary as `dst` (which creates its VM, vCPU and memory at
//! setup and listens on loopback TCP) and `src` (which boots the self-checking guest
//! of `livemig::kvm::guest`, lets it run, then migrates it with the livemig engine:
//! `Migration` with a `KvmDirtyLog` tracker, a `VmControl` that pauses the vCPU thread,
//! and the VM, vCPU and a small guest-progress participant; on the other side a
//! `Receiver` writing straight into the destination VM's guest RAM). Both VMMs hold
//! their guest RAM in rust-vmm `vm-memory` (`GuestMemoryMmap`), as a real VMM would,
//! and lend the engine a view of the same mapping (`GuestMemory::from_vm_memory`).
//! The destination runs the guest for a number of passes after switchover; the guest
//! checks every page on every pass and reports a stale page through an I/O port. The
//! last line printed is one JSON object with the outcome and the downtime breakdown.
//! See docs/KVM.md.
//!
//! The modules are the pieces a VMM author would copy:
//! - [`machine`]: VM, vm-memory guest RAM registered as a KVM slot, irqchip, vCPU;
//! - [`vcpu`]: the vCPU thread and a reliable pause (immediate_exit + a signal,
//!   re-kicked every 200 µs, plus the re-entry that completes a pending I/O exit);
//! - [`source`]: the engine glue on the sending side (`KvmVmControl`, the
//!   guest-progress participant) and the migration itself;
//! - [`destination`]: the receiving side and the checks after switchover.
//!
//! `--drop-final-pages` is the negative control: the source deliberately does not send
//! the pages dirtied in the final (paused) round, and the guest must notice.

mod destination;
mod machine;
mod source;
mod vcpu;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use destination::destination;
use source::source;

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

/// Errors are messages: this is a demo binary that prints them and exits.
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
        "guest_failure": d["failure"],
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
        "received_into_vmm_ram": d["received_into_vmm_ram"],
        "counter_ok": d["counter_ok"],
        "verified": e["verified"],
        "dropped_final_pages": opts.drop_final_pages,
        "transport": format!("livemig engine over TCP ({}, {} streams)", e["mode"].as_str().unwrap_or("?"), e["streams"]),
        "brownout_reason": e["brownout_reason"],
        "pages": opts.pages,
        "mem_mib": opts.mem_mib,
    }))
}
