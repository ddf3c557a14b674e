//! The switch-port handoff: exact spec order, a veto at the validation port, a
//! destination failure after the source released its port, and slow participants
//! in the downtime breakdown.

mod setup_common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use livemig::device::slow_disk::{SlowDiskDest, SlowDiskSource};
use livemig::device::switch_port::{
    DestPort, PortParams, PortRuntime, PortStep, Side, SourcePort, StepLog, SPEC_ORDER, VETO_ORDER,
};
use livemig::engine::{Migration, MigrationError};
use livemig::receiver::{ReceiveError, Receiver};
use setup_common::{guest, migrate, source};

fn params() -> PortParams {
    PortParams {
        switch: "external".into(),
        mac: "00:15:5d:01:02:03".into(),
        vlan: 42,
        policies: vec!["acl:allow-dhcp".into(), "qos:100mbit".into()],
    }
}

fn runtime() -> PortRuntime {
    PortRuntime {
        rx_packets: 10,
        tx_packets: 20,
        mac_table: vec!["00:15:5d:aa:bb:cc".into()],
    }
}

fn ports(log: &StepLog) -> (SourcePort, DestPort) {
    (
        SourcePort::new("port:eth0", params(), runtime(), log.clone()),
        DestPort::new("port:eth0", vec!["external".into()], log.clone()),
    )
}

#[test]
fn combined_log_equals_the_spec_order() {
    let log = StepLog::new();
    let (sp, dp) = ports(&log);
    let (s, d) = (sp.handle(), dp.handle());
    let mem = guest(8);
    let (m, vm, _) = source(mem.clone());
    let (res, recv) = migrate(
        m.participant(Box::new(sp)),
        Receiver::new().participant(Box::new(dp)),
    );
    let report = res.expect("migration");
    let recv = recv.expect("receive");
    assert_eq!(log.steps(), SPEC_ORDER.to_vec());
    // The source's teardown comes strictly after its save and before the
    // destination's NIC create.
    let e = log.entries();
    assert!(e.windows(2).all(|w| w[0].at <= w[1].at));
    let s = s.get();
    assert!(s.migrated && !s.port_operational && !s.nic_connected);
    let d = d.get();
    assert_eq!(
        d.operational_port,
        Some(params()),
        "created with the source's parameters"
    );
    assert!(d.policies_added && d.nic_connected && !d.validation_port);
    assert_eq!(d.runtime, Some(runtime()));
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 1);
    assert_eq!(
        vm.resumes.load(Ordering::SeqCst),
        0,
        "the VM now runs on the destination"
    );
    assert_eq!(recv.report.participants, vec!["port:eth0".to_string()]);
    assert_eq!(report.downtime_breakdown.participants.len(), 1);
    assert_eq!(
        recv.memory.full_digest(2).unwrap(),
        mem.full_digest(2).unwrap()
    );
}

#[test]
fn two_ports_each_follow_the_spec_order() {
    let log = StepLog::new();
    let mut m = source(guest(4)).0;
    let mut r = Receiver::new();
    for id in ["port:eth0", "port:eth1"] {
        m = m.participant(Box::new(SourcePort::new(
            id,
            params(),
            runtime(),
            log.clone(),
        )));
        r = r.participant(Box::new(DestPort::new(
            id,
            vec!["external".into()],
            log.clone(),
        )));
    }
    let (res, recv) = migrate(m, r);
    res.expect("migration");
    recv.expect("receive");
    for id in ["port:eth0", "port:eth1"] {
        assert_eq!(log.steps_of(id), SPEC_ORDER.to_vec(), "{id}");
    }
}

#[test]
fn policy_veto_at_the_validation_port_stops_before_any_page() {
    let log = StepLog::new();
    let (sp, dp) = ports(&log);
    let dp = dp.reject_policies(vec!["qos:100mbit".into()]);
    let (s, d) = (sp.handle(), dp.handle());
    let mem = guest(8);
    let before = mem.full_digest(2).unwrap();
    let (m, vm, counter) = source(mem.clone());
    let (res, recv) = migrate(
        m.participant(Box::new(sp)),
        Receiver::new().participant(Box::new(dp)),
    );
    match res {
        Err(MigrationError::Vetoed(v)) => {
            assert_eq!(v.participant, "port:eth0");
            assert!(v.reason.contains("qos:100mbit"), "{}", v.reason);
        }
        other => panic!("expected a veto, got {other:?}"),
    }
    assert!(matches!(recv, Err(ReceiveError::Vetoed(_))), "{recv:?}");
    assert_eq!(log.steps(), VETO_ORDER.to_vec());
    assert!(counter.nothing_sent(), "zero pages transferred");
    assert!(vm.never_paused());
    assert_eq!(mem.full_digest(2).unwrap(), before);
    let s = s.get();
    assert!(s.port_operational && s.nic_connected && !s.saved && !s.migrated);
    let d = d.get();
    assert!(d.discarded);
    assert!(!d.validation_port && d.operational_port.is_none() && !d.nic_connected);
    assert!(d.runtime.is_none());
}

#[test]
fn destination_failure_after_release_rolls_the_source_port_back() {
    let log = StepLog::new();
    let (sp, dp) = ports(&log);
    let dp = dp.fail_restore(true);
    let (s, d) = (sp.handle(), dp.handle());
    let (m, vm, _) = source(guest(4));
    let (res, recv) = migrate(
        m.participant(Box::new(sp)),
        Receiver::new().participant(Box::new(dp)),
    );
    assert!(matches!(res, Err(MigrationError::Remote(_))), "{res:?}");
    assert!(
        matches!(recv, Err(ReceiveError::Participant(_))),
        "{recv:?}"
    );
    // The source VM resumed with its port re-created and the NIC reconnected.
    assert!(vm.running());
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1);
    let s = s.get();
    assert!(s.port_operational && s.nic_connected && !s.migrated && !s.saved);
    let d = d.get();
    assert!(d.discarded && d.operational_port.is_none() && !d.nic_connected);
    let steps = log.steps();
    let src: Vec<_> = steps
        .iter()
        .filter(|x| x.0 == Side::Source)
        .map(|x| x.1)
        .collect();
    assert_eq!(
        src,
        vec![
            PortStep::Save,
            PortStep::NicDisconnect,
            PortStep::NicDelete,
            PortStep::PortTeardown,
            PortStep::PortDelete,
            PortStep::RollbackPortCreate,
            PortStep::RollbackNicCreate,
            PortStep::RollbackNicConnect,
        ]
    );
    assert!(steps.contains(&(Side::Destination, PortStep::DiscardPort)));
}

fn with_disks(n: usize, ms: u64) -> (Migration, Receiver) {
    let log = StepLog::new();
    let (sp, dp) = ports(&log);
    let mut m = source(guest(4)).0.participant(Box::new(sp));
    let mut r = Receiver::new().participant(Box::new(dp));
    for i in 0..n {
        let id = format!("disk{i}");
        m = m.participant(Box::new(SlowDiskSource::new(
            &id,
            Duration::from_millis(ms),
        )));
        r = r.participant(Box::new(SlowDiskDest::new(&id, Duration::from_millis(ms))));
    }
    (m, r)
}

#[test]
fn slow_participants_show_in_the_downtime_breakdown() {
    let (m, r) = with_disks(2, 60);
    let (res, recv) = migrate(m, r);
    let report = res.expect("migration");
    recv.expect("receive");
    let bd = &report.downtime_breakdown;
    let ids: Vec<_> = bd.participants.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(ids, ["port:eth0", "disk0", "disk1"]);
    for (id, ms, _) in &bd.participants[1..] {
        assert!(*ms >= 60.0, "{id} saved in {ms} ms");
    }
    assert!(bd.device_state_ms >= 120.0, "{bd:?}");
    assert!(bd.dest_restore_ms >= 120.0, "{bd:?}");
    let dest_ids: Vec<_> = bd.dest_participants.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(dest_ids, ["port:eth0", "disk0", "disk1"]);
    assert!(bd.dest_participants[1..].iter().all(|p| p.1 >= 60.0));
    assert!(report.downtime_ms >= 240.0, "{}", report.downtime_ms);
    assert!(report.downtime_ms >= bd.device_state_ms + bd.dest_restore_ms);

    let (m, r) = with_disks(0, 60);
    let (res, _) = migrate(m, r);
    let bd0 = res.expect("migration").downtime_breakdown;
    assert!(bd0.device_state_ms < bd.device_state_ms);
}

#[test]
fn validation_port_create_failure_is_a_veto_at_setup() {
    let log = StepLog::new();
    let sp = SourcePort::new("port:eth0", params(), runtime(), log.clone());
    let s = sp.handle();
    // This host's port participant has no switch named like the source's.
    let dp = DestPort::new("port:eth0", vec!["internal".into()], log.clone());
    let (m, vm, counter) = source(guest(4));
    let (res, recv) = migrate(
        m.participant(Box::new(sp)),
        Receiver::new().participant(Box::new(dp)),
    );
    match res {
        Err(MigrationError::Vetoed(v)) => {
            assert!(
                v.reason
                    .contains("PORT_CREATE of the validation port failed"),
                "{}",
                v.reason
            )
        }
        other => panic!("expected a veto, got {other:?}"),
    }
    assert!(recv.is_err());
    assert!(counter.nothing_sent() && vm.never_paused());
    let s = s.get();
    assert!(s.port_operational && s.nic_connected);
    assert!(log.steps().is_empty(), "no port was created on either side");
}

#[test]
fn spec_order_holds_over_loopback_tcp() {
    use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
    let log = StepLog::new();
    let (sp, dp) = ports(&log);
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").unwrap();
    let addr = acceptor.local_addr().unwrap().to_string();
    let r = Receiver::new().participant(Box::new(dp));
    let dest = std::thread::spawn(move || r.run(&acceptor));
    let (m, _, _) = source(guest(4));
    m.participant(Box::new(sp))
        .run(&TcpConnector::new(addr))
        .expect("migration");
    dest.join().unwrap().expect("receive");
    assert_eq!(log.steps(), SPEC_ORDER.to_vec());
}
