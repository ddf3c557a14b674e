//! `livemig recv` and `livemig send` on two hosts (network namespaces joined by a
//! veth pair, see tests/common/netns.rs), with network faults injected between
//! them. Needs root, iproute2 and nftables: skips with a printed reason without
//! them, fails instead under `LIVEMIG_CI=1`.

mod common;

use std::time::{Duration, Instant};

use common::netns::{two_hosts_or_skip, Host, NetFault, TwoHosts, DST_IP};
use common::procs::Proc;
use common::{image_file, last_json_line, temp_path, MIB};
use livemig::wire::MAX_BATCH_PAGES;

const EXE: &str = env!("CARGO_BIN_EXE_livemig");
/// The receiver's port (each test has its own namespaces, so it is always free).
const PORT: u16 = 7000;
/// Peer timeout given to both sides in the fault tests.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Slack over the peer timeout for shutting down on a loaded machine.
const SLACK: Duration = Duration::from_secs(8);
/// How long each side keeps trying to resume in the fault tests (the source's
/// reconnection budget, the destination's resume window).
const RESUME: Duration = Duration::from_secs(2);

fn dst_addr() -> String {
    format!("{DST_IP}:{PORT}")
}

/// Start `recv` on the destination host and wait until it listens.
fn start_recv(hosts: &TwoHosts, extra: &[&str]) -> Proc {
    let addr = dst_addr();
    let mut args = vec!["recv", "--plaintext", "--listen", addr.as_str()];
    args.extend_from_slice(extra);
    let recv = hosts.spawn(Host::Dst, EXE, &args, "recv");
    assert!(
        hosts.wait_listening(Host::Dst, PORT, Duration::from_secs(10)),
        "recv did not listen; stderr: {}",
        recv.stderr_so_far()
    );
    recv
}

/// Start `send` of `image` on the source host.
fn start_send(hosts: &TwoHosts, image: &std::path::Path, extra: &[&str]) -> Proc {
    let addr = dst_addr();
    let mut args = vec![
        "send",
        "--plaintext",
        "--to",
        addr.as_str(),
        "--image",
        image.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    hosts.spawn(Host::Src, EXE, &args, "send")
}

fn same_file(path: &std::path::Path, bytes: &[u8]) -> bool {
    std::fs::read(path).is_ok_and(|got| got == bytes)
}

#[test]
fn image_crosses_the_link_and_verifies() {
    let Some(hosts) = two_hosts_or_skip("image_crosses_the_link_and_verifies", None) else {
        return;
    };
    let (image, bytes) = image_file(256 * MIB, 11);
    let out = temp_path("two-host-received.bin");
    let recv = start_recv(&hosts, &["--out", out.to_str().unwrap(), "--json"]);
    let send = start_send(&hosts, &image, &["--json", "--streams", "2"]);
    let s = send.wait_exit(Duration::from_secs(60));
    let r = recv.wait_exit(Duration::from_secs(30));
    assert!(s.ok(), "send failed: {}", s.stderr);
    assert!(r.ok(), "recv failed: {}", r.stderr);
    let sj = last_json_line(&s.stdout);
    let rj = last_json_line(&r.stdout);
    assert_eq!(sj["verified"], true, "{sj}");
    assert_eq!(sj["memory_bytes"], 256 * MIB as u64);
    assert_eq!(sj["connected_to"], dst_addr().as_str());
    assert_eq!(rj["verified"], true, "{rj}");
    assert_eq!(rj["digest"], sj["digest"]);
    assert!(same_file(&out, &bytes), "received image differs");
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&out);
}

/// Run a shaped migration, inject `fault` once its streams are up, and return both
/// sides' exits, the time each took after the fault, and whether the source image
/// is unchanged.
fn migrate_through(
    fault: NetFault,
    test: &str,
) -> Option<(common::procs::Exit, common::procs::Exit)> {
    // 64 MiB at 100 Mbit/s takes ~5.4 s: the fault lands mid-transfer.
    let hosts = two_hosts_or_skip(test, Some("100mbit"))?;
    let (image, bytes) = image_file(64 * MIB, 12);
    let out = temp_path("two-host-received.bin");
    let pt = format!("{}s", PEER_TIMEOUT.as_secs());
    let resume = format!("{}s", RESUME.as_secs());
    let recv = start_recv(
        &hosts,
        &[
            "--out",
            out.to_str().unwrap(),
            "--peer-timeout",
            &pt,
            "--resume-window",
            &resume,
        ],
    );
    let send = start_send(
        &hosts,
        &image,
        &[
            "--streams",
            "2",
            "--peer-timeout",
            &pt,
            "--reconnect-timeout",
            &resume,
        ],
    );
    // Control stream plus two page streams established: pages are flowing.
    let t0 = Instant::now();
    while hosts.established(Host::Dst, PORT) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "streams never came up; send: {}; recv: {}",
            send.stderr_so_far(),
            recv.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    hosts.inject(fault).expect("inject the fault");
    // The fault stays: both sides try to resume for their budget, then give up.
    let s = send.wait_exit(PEER_TIMEOUT + RESUME + SLACK);
    let r = recv.wait_exit(PEER_TIMEOUT + RESUME + SLACK);
    eprintln!(
        "{fault:?}: send exited {:?} after {:?}: {}",
        s.code,
        s.waited,
        s.stderr.trim()
    );
    eprintln!(
        "{fault:?}: recv exited {:?} after {:?} more: {}",
        r.code,
        r.waited,
        r.stderr.trim()
    );
    assert!(!s.ok(), "send succeeded through a {fault:?}");
    assert!(!r.ok(), "recv succeeded through a {fault:?}");
    assert!(
        same_file(&image, &bytes),
        "the source image changed after a failed migration"
    );
    assert!(
        !same_file(&out, &bytes),
        "recv wrote a complete image although the migration failed"
    );
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&out);
    Some((s, r))
}

fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .rev()
        .find(|l| l.contains("error"))
        .unwrap_or_else(|| panic!("no error line in {stderr:?}"))
}

#[test]
fn blackhole_mid_transfer_times_out_on_both_sides() {
    let Some((s, r)) = migrate_through(NetFault::Blackhole, "blackhole_mid_transfer") else {
        return;
    };
    let se = error_line(&s.stderr);
    assert!(
        se.contains("timed out") && se.contains("peer"),
        "send: {se}"
    );
    assert!(
        se.contains(&dst_addr()),
        "send does not name the peer: {se}"
    );
    assert!(s.waited <= PEER_TIMEOUT + RESUME + SLACK);
    let re = error_line(&r.stderr);
    assert!(re.contains("timed out"), "recv: {re}");
    assert!(!se.contains("os error 11") && !re.contains("os error 11"));
}

#[test]
fn reset_mid_transfer_is_reported_on_both_sides() {
    let Some((s, r)) = migrate_through(NetFault::Reset, "reset_mid_transfer") else {
        return;
    };
    let se = error_line(&s.stderr);
    assert!(se.contains("reset"), "send: {se}");
    assert!(
        se.contains(&dst_addr()),
        "send does not name the peer: {se}"
    );
    let re = error_line(&r.stderr);
    assert!(re.contains("reset") || re.contains("closed"), "recv: {re}");
}

/// Migrate a 48 MiB image at 100 Mbit/s (5 s peer timeouts), calling `disrupt`
/// half a second after every stream is up; both sides must then succeed. Returns
/// the source's report (after checking the received image), or `None` when the
/// test is skipped.
fn survives(test: &str, seed: u64, disrupt: impl FnOnce(&TwoHosts)) -> Option<serde_json::Value> {
    let hosts = two_hosts_or_skip(test, Some("100mbit"))?;
    let (image, bytes) = image_file(48 * MIB, seed);
    let out = temp_path("two-host-received.bin");
    let recv = start_recv(
        &hosts,
        &[
            "--out",
            out.to_str().unwrap(),
            "--json",
            "--peer-timeout",
            "5s",
        ],
    );
    let send = start_send(&hosts, &image, &["--json", "--peer-timeout", "5s"]);
    let t0 = Instant::now();
    while hosts.established(Host::Dst, PORT) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "streams never came up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    disrupt(&hosts);
    let s = send.wait_exit(Duration::from_secs(40));
    let r = recv.wait_exit(Duration::from_secs(20));
    assert!(s.ok(), "send failed across {test}: {}", s.stderr);
    assert!(r.ok(), "recv failed across {test}: {}", r.stderr);
    let report = last_json_line(&s.stdout);
    assert_eq!(report["verified"], true);
    assert!(same_file(&out, &bytes), "received image differs");
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&out);
    Some(report)
}

/// Connections reset for a second mid-transfer, then the network heals: the
/// migration resumes on new connections and completes, verified, having sent
/// little twice.
#[test]
fn a_reset_network_that_heals_is_resumed() {
    let Some(report) = survives("reset_then_heal", 14, |hosts| {
        hosts.inject(NetFault::Reset).expect("inject resets");
        std::thread::sleep(Duration::from_secs(1));
        hosts.heal();
    }) else {
        return;
    };
    assert_eq!(report["resumed"], true, "{report}");
    assert!(report["reconnects"].as_u64() >= Some(1), "{report}");
    let pages = (48 * MIB / 4096) as u64;
    let (sent, resent) = (
        report["pages_sent"].as_u64().unwrap(),
        report["resent_pages"].as_u64().unwrap(),
    );
    // Nothing dirties an image: every page is written once, and those the
    // break lost in flight once more, which the report counts.
    assert_eq!(
        sent,
        pages + resent,
        "pages sent again are counted: {report}"
    );
    // A break loses what was in flight: batches in the source's send buffers,
    // the shaped link's queue (100 ms, 1.25 MB at 100 Mbit/s) and the
    // destination's receive buffers; 2 to 5 batches of 1 MiB over two streams
    // were measured. At most 4 per stream, a sixth of the image here, against
    // the whole image for a migration that starts over.
    let streams = report["streams"].as_u64().unwrap();
    assert!(
        resent <= streams * 4 * MAX_BATCH_PAGES as u64,
        "a resumption sends little twice: {report}"
    );
}

#[test]
fn a_link_outage_shorter_than_the_peer_timeout_is_survived() {
    // Silence is not death: the link goes down for 1 s mid-transfer and comes back;
    // with a 5 s peer timeout TCP retransmits and the migration completes.
    survives("link_outage_survived", 13, |hosts| {
        hosts.link(Host::Src, false).expect("link down");
        std::thread::sleep(Duration::from_secs(1));
        hosts.link(Host::Src, true).expect("link up");
    });
}
