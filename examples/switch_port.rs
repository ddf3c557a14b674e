//! Migrate a small guest with a model virtual-switch port (and optional slow
//! pass-through disks) between two threads, print both sides' handoff steps from
//! one shared, timestamp-ordered log, and check them against the spec's order.
//!
//! ```text
//! cargo run --release --example switch_port                        # success path
//! cargo run --release --example switch_port -- --veto              # policy veto at setup
//! cargo run --release --example switch_port -- --slow-disks 4 --disk-ms 250
//! ```
//! Exit status 0 when the observed outcome is the correct one (the spec's order on
//! success; on `--veto`: no page moved and the source keeps its port operational and
//! its NIC connected), 1 otherwise.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use livemig::device::slow_disk::{SlowDiskDest, SlowDiskSource};
use livemig::device::switch_port::{
    DestPort, PortParams, PortRuntime, SourcePort, StepLog, SPEC_ORDER, VETO_ORDER,
};
use livemig::engine::{Migration, MigrationConfig, MigrationError, VmControl};
use livemig::receiver::{HostCaps, Receiver, ReceiverConfig};
use livemig::stats::Event;
use livemig::wire::control::CompatVector;
use livemig::workload::{self, Content};
use livemig::GuestMemory;

struct Opts {
    veto: bool,
    slow_disks: usize,
    disk_ms: u64,
    memory_mib: usize,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        veto: false,
        slow_disks: 0,
        disk_ms: 100,
        memory_mib: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<u64, String> {
            it.next()
                .ok_or(format!("{name} needs a value"))?
                .parse()
                .map_err(|e| format!("{name}: {e}"))
        };
        match a.as_str() {
            "--veto" => o.veto = true,
            "--slow-disks" => o.slow_disks = num("--slow-disks")? as usize,
            "--disk-ms" => o.disk_ms = num("--disk-ms")?,
            "--memory-mib" => o.memory_mib = num("--memory-mib")? as usize,
            "-h" | "--help" => {
                println!(
                    "usage: switch_port [--veto] [--slow-disks N] [--disk-ms M] [--memory-mib X]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

/// The source VM: records whether it is running.
struct ModelVm(Arc<AtomicBool>, Arc<AtomicU64>);

impl VmControl for ModelVm {
    fn pause(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.0.store(false, Ordering::SeqCst);
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn throttle(&mut self, _percent: u8) -> Result<(), livemig::engine::VmControlError> {
        Ok(())
    }
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<bool, String> {
    let o = parse()?;
    let log = StepLog::new();
    let switch = "external-vswitch".to_string();
    let params = PortParams {
        switch: switch.clone(),
        mac: "00:15:5d:01:02:03".into(),
        vlan: 10,
        policies: vec!["acl:allow-dhcp".into(), "qos:100mbit".into()],
    };
    let runtime = PortRuntime {
        rx_packets: 123_456,
        tx_packets: 98_765,
        mac_table: vec!["00:15:5d:0a:0b:0c".into()],
    };
    let disk_time = Duration::from_millis(o.disk_ms);

    let mem =
        Arc::new(GuestMemory::anonymous(o.memory_mib << 20, false).map_err(|e| e.to_string())?);
    workload::fill(&mem, Content::Mix, 7, 2).map_err(|e| e.to_string())?;
    let digest_before = mem.full_digest(2).map_err(|e| e.to_string())?;

    // Destination host.
    let mut dest_port = DestPort::new("port:eth0", vec![switch.clone()], log.clone());
    if o.veto {
        dest_port = dest_port.reject_policies(vec!["qos:100mbit".into()]);
    }
    let dest_handle = dest_port.handle();
    let mut receiver = Receiver::new()
        .config({
            let mut settings = ReceiverConfig::default();
            settings.host = HostCaps {
                cpu_features: Some(vec!["sse4.2".into(), "avx".into(), "avx2".into()]),
                switches: Some(vec![switch.clone()]),
                max_memory: None,
            };
            settings
        })
        .participant(Box::new(dest_port));
    for i in 0..o.slow_disks {
        receiver =
            receiver.participant(Box::new(SlowDiskDest::new(&format!("disk{i}"), disk_time)));
    }

    // Source host.
    let src_port = SourcePort::new("port:eth0", params.clone(), runtime.clone(), log.clone());
    let src_handle = src_port.handle();
    let running = Arc::new(AtomicBool::new(true));
    let pauses = Arc::new(AtomicU64::new(0));
    let pages_sent = Arc::new(AtomicU64::new(0));
    let ps = pages_sent.clone();
    let mut migration = Migration::new(mem.clone())
        .vm_control(Box::new(ModelVm(running.clone(), pauses.clone())))
        .config({
            let mut settings = MigrationConfig::default();
            settings.compat = CompatVector {
                cpu_features: vec!["sse4.2".into(), "avx".into()],
                switches: vec![switch.clone()],
            };
            settings
        })
        .progress(Arc::new(move |e: &Event| {
            if let Event::RoundFinished(r) = e {
                ps.fetch_add(r.pages, Ordering::SeqCst);
            }
        }))
        .participant(Box::new(src_port));
    for i in 0..o.slow_disks {
        migration = migration.participant(Box::new(SlowDiskSource::new(
            &format!("disk{i}"),
            disk_time,
        )));
    }

    let (connector, acceptor) = livemig::transport::mem::pair();
    let dest = std::thread::spawn(move || receiver.run(&acceptor));
    let result = migration.run(&connector);
    let received = dest.join().map_err(|_| "receiver thread panicked")?;

    println!(
        "switch-port handoff, {} MiB guest, {} slow disk(s) of {} ms{}:",
        o.memory_mib,
        o.slow_disks,
        o.disk_ms,
        if o.veto { ", destination vetoes" } else { "" }
    );
    let entries = log.entries();
    let t0 = entries.first().map(|e| e.at);
    for e in &entries {
        let dt = t0.map_or(0.0, |t| e.at.duration_since(t).as_secs_f64() * 1e3);
        println!(
            "  +{dt:9.3} ms  {:<11}  {:<10}  {}{}",
            e.side.name(),
            e.port,
            e.step.name(),
            if e.detail.is_empty() {
                String::new()
            } else {
                format!("  [{}]", e.detail)
            }
        );
    }
    let steps = log.steps();
    let src = src_handle.get();
    let dst = dest_handle.get();

    if o.veto {
        let vetoed =
            matches!(&result, Err(MigrationError::Vetoed(v)) if v.participant == "port:eth0");
        let checks = [
            ("the migration failed with the port's veto", vetoed),
            ("the destination reported the veto", received.is_err()),
            ("the log is the veto order", steps == VETO_ORDER),
            (
                "zero pages were transferred",
                pages_sent.load(Ordering::SeqCst) == 0,
            ),
            (
                "the source VM kept running (never paused)",
                running.load(Ordering::SeqCst) && pauses.load(Ordering::SeqCst) == 0,
            ),
            (
                "the source port is operational and its NIC connected",
                src.port_operational && src.nic_connected && !src.saved && !src.migrated,
            ),
            (
                "the destination holds no port, NIC or state",
                !dst.validation_port
                    && dst.operational_port.is_none()
                    && !dst.nic_connected
                    && dst.runtime.is_none(),
            ),
            (
                "source memory is untouched",
                mem.full_digest(2).map_err(|e| e.to_string())? == digest_before,
            ),
        ];
        if let Err(e) = &result {
            println!("source: {e}");
        }
        return Ok(report_checks(&checks, "veto outcome is correct"));
    }

    let received = received.map_err(|e| format!("receiver failed: {e}"))?;
    let report = result.map_err(|e| format!("migration failed: {e}"))?;
    let checks = [
        (
            "the combined log equals the spec's order",
            steps == SPEC_ORDER,
        ),
        (
            "the source port is gone and the VM runs on the destination",
            !src.port_operational && !src.nic_connected && src.migrated,
        ),
        (
            "the destination port has the source's parameters and runtime data",
            dst.operational_port.as_ref() == Some(&params)
                && dst.nic_connected
                && dst.runtime.as_ref() == Some(&runtime),
        ),
        (
            "destination memory equals the source's",
            received.memory.full_digest(2).map_err(|e| e.to_string())? == digest_before,
        ),
    ];
    let bd = &report.downtime_breakdown;
    println!(
        "downtime {:.1} ms: pause {:.2}, final pages {:.2}, device state (save+send) {:.1}, commit round trip {:.1} (dest verify {:.2}, source release {:.2}, dest validate+restore {:.1})",
        report.downtime_ms,
        bd.pause_ms,
        bd.final_pages_ms,
        bd.device_state_ms,
        bd.commit_ms,
        bd.dest_verify_ms,
        bd.release_ms,
        bd.dest_restore_ms
    );
    for (id, ms, bytes) in &bd.participants {
        println!("  source save    {id:<10} {ms:8.1} ms  {bytes} bytes");
    }
    for (id, ms) in &bd.dest_participants {
        println!("  dest restore   {id:<10} {ms:8.1} ms");
    }
    println!(
        "json: {}",
        serde_json::json!({
            "slow_disks": o.slow_disks,
            "disk_ms": o.disk_ms,
            "downtime_ms": report.downtime_ms,
            "downtime_breakdown": bd,
        })
    );
    Ok(report_checks(&checks, "handoff order is correct"))
}

fn report_checks(checks: &[(&str, bool)], ok: &str) -> bool {
    let mut all = true;
    for (what, pass) in checks {
        println!("  [{}] {what}", if *pass { "ok" } else { "FAIL" });
        all &= pass;
    }
    if all {
        println!("{ok}");
    } else {
        println!("FAILED: the outcome is not the correct one");
    }
    all
}
