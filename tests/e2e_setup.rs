//! Setup-stage refusals: each reason has its own code and message, costs no page
//! transfer, leaves the source VM running and its memory untouched, and never
//! panics. Also processor compatibility mode and the per-host concurrency limit.

mod setup_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig::compat::common_cpu_features;
use livemig::device::slow_disk::{SlowDiskDest, SlowDiskSource};
use livemig::device::switch_port::{DestPort, PortParams, PortRuntime, SourcePort, StepLog};
use livemig::engine::{MigrationConfig, MigrationError};
use livemig::receiver::{HostCaps, HostLimiter, ReceiveError, Receiver, ReceiverConfig};
use livemig::session::SessionToken;
use livemig::transport::framed::FrameReader;
use livemig::transport::Connector;
use livemig::wire::control::{CompatVector, RefuseCode};
use livemig::wire::{ControlMsg, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use setup_common::{guest, migrate, source};

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

fn dest_host() -> HostCaps {
    HostCaps {
        cpu_features: Some(strings(&["sse4.2", "avx", "avx2"])),
        switches: Some(strings(&["external"])),
        max_memory: Some(64 << 20),
    }
}

fn receiver(host: HostCaps) -> Receiver {
    Receiver::new().config({
        let mut settings = ReceiverConfig::default();
        settings.host = host;
        settings
    })
}

fn vm_compat(cpu: &[&str], switches: &[&str]) -> MigrationConfig {
    let mut settings = MigrationConfig::default();
    settings.compat = CompatVector {
        cpu_features: strings(cpu),
        switches: strings(switches),
    };
    settings
}

/// Run a migration the destination must refuse at setup; check everything a
/// refusal promises and return its message.
fn expect_refusal(mib: usize, config: MigrationConfig, r: Receiver, code: RefuseCode) -> String {
    let mem = guest(mib);
    let before = mem.full_digest(2).unwrap();
    let log = StepLog::new();
    let port = SourcePort::new(
        "port:eth0",
        PortParams {
            switch: "external".into(),
            mac: "00:15:5d:00:00:01".into(),
            vlan: 0,
            policies: vec![],
        },
        PortRuntime::default(),
        log.clone(),
    );
    let port_state = port.handle();
    let (m, vm, counter) = source(mem.clone());
    let m = m.config(config).participant(Box::new(port));
    let r = r.participant(Box::new(DestPort::new(
        "port:eth0",
        strings(&["external"]),
        log.clone(),
    )));
    let (res, recv) = migrate(m, r);
    let message = match res {
        Err(MigrationError::Refused { code: c, message }) => {
            assert_eq!(c, code, "refusal code (message: {message})");
            message.to_string()
        }
        other => panic!("expected a {code:?} refusal, got {other:?}"),
    };
    match recv {
        Err(ReceiveError::Refused { code: c, reason }) => {
            assert_eq!(c, code);
            assert_eq!(
                reason.to_string(),
                message,
                "the source reports the destination's message verbatim"
            );
        }
        other => panic!("destination: expected a refusal, got {other:?}"),
    }
    assert!(counter.nothing_sent(), "a refusal costs no page transfer");
    assert!(vm.never_paused(), "the source VM was never paused");
    assert_eq!(
        mem.full_digest(2).unwrap(),
        before,
        "source memory untouched"
    );
    let s = port_state.get();
    assert!(s.port_operational && s.nic_connected && !s.saved && !s.migrated);
    message
}

fn cpu_refusal() -> String {
    expect_refusal(
        4,
        vm_compat(&["sse4.2", "avx", "avx512f"], &["external"]),
        receiver(dest_host()),
        RefuseCode::CpuFeatures,
    )
}

fn switch_refusal() -> String {
    expect_refusal(
        4,
        vm_compat(&["sse4.2"], &["external", "corp-net"]),
        receiver(dest_host()),
        RefuseCode::SwitchName,
    )
}

fn memory_refusal() -> String {
    let mut host = dest_host();
    host.max_memory = Some(8 << 20);
    expect_refusal(
        16,
        vm_compat(&["sse4.2"], &["external"]),
        receiver(host),
        RefuseCode::MemoryLayout,
    )
}

fn memory_mismatch_refusal() -> String {
    // A caller-provided skeleton VM of another size.
    let dest_mem = Arc::new(livemig::GuestMemory::anonymous(8 << 20, false).unwrap());
    expect_refusal(
        4,
        vm_compat(&["sse4.2"], &["external"]),
        receiver(dest_host()).memory(dest_mem),
        RefuseCode::MemoryLayout,
    )
}

/// Speak the handshake by hand with a chosen version; return the Refuse reply.
fn version_refusal_for(major: u16, minor: u16) -> (RefuseCode, String) {
    let (connector, acceptor) = livemig::transport::mem::pair();
    let dest = std::thread::spawn(move || receiver(dest_host()).run(&acceptor));
    let stream = connector.connect().unwrap();
    let mut control = FrameReader::new(stream, "control");
    control
        .send_control(
            &ControlMsg::Hello {
                magic: "livemig".into(),
                major,
                minor,
                session: SessionToken::from_bytes([7; 16]),
                streams: 1,
                capabilities: vec![],
            },
            &[],
        )
        .unwrap();
    let reply = control.control().unwrap().0;
    let recv = dest.join().expect("receiver must not panic");
    match (reply, recv) {
        (ControlMsg::Refuse { code, message }, Err(ReceiveError::Refused { code: c2, .. })) => {
            assert_eq!(code, c2);
            (code, message)
        }
        (reply, recv) => panic!("expected a refusal, got {reply:?} / {recv:?}"),
    }
}

fn version_refusal() -> String {
    let (code, message) = version_refusal_for(PROTOCOL_MAJOR + 1, 0);
    assert_eq!(code, RefuseCode::Version);
    message
}

#[test]
fn cpu_features_missing_on_destination_are_refused() {
    let m = cpu_refusal();
    assert!(m.contains("avx512f"), "{m}");
    assert!(
        !m.contains("sse4.2"),
        "only the missing features are named: {m}"
    );
}

#[test]
fn processor_compatibility_mode_restricts_to_the_common_set() {
    let src_host = strings(&["sse4.2", "avx", "avx2", "avx512f"]);
    let dst_host = dest_host().cpu_features.unwrap();
    let common = common_cpu_features(&[&src_host, &dst_host]);
    assert_eq!(common, strings(&["sse4.2", "avx", "avx2"]));
    let mem = guest(4);
    let (m, _vm, counter) = source(mem.clone());
    let mut config = vm_compat(&["sse4.2", "avx", "avx512f"], &["external"]);
    config.processor_compat = Some(common);
    let (res, recv) = migrate(m.config(config), receiver(dest_host()));
    let report = res.expect("compatibility mode lets the VM move");
    let recv = recv.expect("destination accepts");
    assert!(report.verified);
    assert!(counter.pages.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert_eq!(
        recv.memory.full_digest(2).unwrap(),
        mem.full_digest(2).unwrap()
    );
}

#[test]
fn unknown_virtual_switch_is_refused() {
    let m = switch_refusal();
    assert!(m.contains("corp-net") && !m.contains("\"external\""), "{m}");
}

#[test]
fn memory_over_host_limit_is_refused() {
    let m = memory_refusal();
    assert!(m.contains("exceeds this host's limit"), "{m}");
}

#[test]
fn memory_layout_mismatch_is_refused() {
    let m = memory_mismatch_refusal();
    assert!(m.contains("memory size mismatch"), "{m}");
}

#[test]
fn other_major_version_is_refused() {
    let m = version_refusal();
    assert!(m.contains(&format!("{}.0", PROTOCOL_MAJOR + 1)), "{m}");
}

#[test]
fn current_and_previous_minor_accepted_newer_minor_refused() {
    let (code, m) = version_refusal_for(PROTOCOL_MAJOR, PROTOCOL_MINOR + 1);
    assert_eq!(code, RefuseCode::Version, "{m}");
    assert!(livemig::receiver::setup_check::check_version(
        "livemig",
        PROTOCOL_MAJOR,
        PROTOCOL_MINOR
    )
    .is_ok());
    assert!(livemig::receiver::setup_check::check_version(
        "livemig",
        PROTOCOL_MAJOR,
        PROTOCOL_MINOR.saturating_sub(1)
    )
    .is_ok());
    assert!(
        livemig::receiver::setup_check::check_version("qemu", PROTOCOL_MAJOR, PROTOCOL_MINOR)
            .is_err()
    );
}

/// Start a migration whose destination holds its permit for a while (a slow disk
/// keeps brownout busy), then try a second one against the same host.
fn host_busy_refusal() -> String {
    let limiter = Arc::new(HostLimiter::new(1));
    let (m1, _vm1, _c1) = source(guest(4));
    // Its release takes a second: the second migration's setup, on a loaded
    // host too, comes well within it.
    let m1 = m1.participant(Box::new(SlowDiskSource::new(
        "disk0",
        Duration::from_millis(1000),
    )));
    let r1 = receiver(dest_host())
        .host_limiter(limiter.clone())
        .participant(Box::new(SlowDiskDest::new(
            "disk0",
            Duration::from_millis(10),
        )));
    let first = std::thread::spawn(move || migrate(m1, r1));
    let t0 = Instant::now();
    while limiter.active() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "first migration never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let r2 = receiver(dest_host()).host_limiter(limiter.clone());
    let message = expect_refusal(
        4,
        vm_compat(&["sse4.2"], &["external"]),
        r2,
        RefuseCode::HostBusy,
    );
    let (res, recv) = first.join().unwrap();
    res.expect("the first migration is unaffected");
    recv.expect("the first destination commits");
    assert_eq!(
        limiter.active(),
        0,
        "permits are released when receivers finish"
    );
    // The slot is free again: the next migration goes through.
    let (m3, _, _) = source(guest(4));
    let (res, _) = migrate(m3, receiver(dest_host()).host_limiter(limiter.clone()));
    res.expect("a migration after the first finished is accepted");
    message
}

#[test]
fn host_at_its_limit_refuses_with_host_busy() {
    let m = host_busy_refusal();
    assert!(m.contains("limit"), "{m}");
}

#[test]
fn default_host_limit_is_two() {
    let l = Arc::new(HostLimiter::default());
    assert_eq!(l.limit(), 2);
    let a = l.try_acquire();
    let b = l.try_acquire();
    assert!(a.is_some() && b.is_some() && l.try_acquire().is_none());
}

#[test]
fn each_refusal_reason_has_its_own_message() {
    let msgs = [
        cpu_refusal(),
        switch_refusal(),
        memory_refusal(),
        version_refusal(),
        host_busy_refusal(),
    ];
    for (i, a) in msgs.iter().enumerate() {
        assert!(!a.is_empty());
        for b in &msgs[i + 1..] {
            assert_ne!(a, b);
        }
    }
}
