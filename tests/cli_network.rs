//! `livemig send` against a misbehaving destination over loopback: a receiver that
//! stops reading (SIGSTOP), and several destination addresses of which the first is
//! dead.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::procs::Proc;
use common::{free_port, image_file, last_json_line, temp_path, MIB};

const EXE: &str = env!("CARGO_BIN_EXE_livemig");

fn livemig(args: &[&str]) -> Command {
    let mut c = Command::new(EXE);
    c.args(args);
    c
}

/// Spawn a plaintext `send` of `image` to `to`, with `extra` flags.
fn spawn_send(to: &str, image: &std::path::Path, extra: &[&str]) -> Proc {
    let mut c = livemig(&[
        "send",
        "--plaintext",
        "--to",
        to,
        "--image",
        image.to_str().unwrap(),
    ]);
    c.args(extra);
    Proc::spawn(c, "send")
}

/// Start `recv` on a free loopback port; returns it once it listens.
fn start_recv(extra: &[&str]) -> (Proc, String) {
    for _ in 0..5 {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["recv", "--plaintext", "--listen", addr.as_str()];
        args.extend_from_slice(extra);
        let mut recv = Proc::spawn(livemig(&args), "recv");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if recv.stderr_so_far().contains("listening on") {
                return (recv, addr);
            }
            if recv.exited() {
                break; // port taken meanwhile: try another
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("recv never listened");
}

#[test]
fn send_gives_up_on_a_stopped_destination_within_the_peer_timeout() {
    // 128 MiB at 400 Mbit/s takes ~2.7 s, far more than the socket buffers hold, so
    // the receiver is stopped mid-transfer and the sender's writes then stall.
    let (image, bytes) = image_file(128 * MIB, 5);
    let peer_timeout = Duration::from_secs(2);
    let (recv, addr) = start_recv(&["--peer-timeout", "2s"]);
    let events = temp_path("events.jsonl");
    let send = spawn_send(
        &addr,
        &image,
        &[
            "--bandwidth",
            "400mbit",
            "--peer-timeout",
            "2s",
            "--reconnect-timeout",
            "3s",
            "--events",
            events.to_str().unwrap(),
        ],
    );
    // Stop the receiver once pages flow (setup done, round 0 started).
    let t0 = Instant::now();
    while !std::fs::read_to_string(&events).is_ok_and(|s| s.contains(r#""event":"started""#)) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "send never started a round; stderr: {}",
            send.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    recv.signal("STOP");
    let stopped = Instant::now();
    // `send` must end on its own: the deadline plus time to fill the socket buffers
    // at the shaped rate and to shut down, with room for a loaded machine.
    // It tries to resume for its reconnection budget (3 s) first: a stopped
    // process still accepts connections in the kernel but never answers.
    let out = send.wait_exit(peer_timeout + Duration::from_secs(3 + 15));
    let took = stopped.elapsed();
    eprintln!(
        "send exited {:?} {took:?} after the destination was stopped: {}",
        out.code,
        out.stderr.trim()
    );
    recv.signal("CONT");
    drop(recv);
    let _ = std::fs::remove_file(&events);
    assert!(
        !out.ok(),
        "send succeeded although the destination was stopped: {}",
        out.stdout
    );
    assert!(
        out.stderr.contains("timed out") && out.stderr.contains("peer"),
        "the error does not say the peer timed out: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&addr),
        "the error does not name the destination {addr}: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("os error 11"), "{}", out.stderr);
    assert!(
        took >= peer_timeout,
        "gave up after {took:?}, before the deadline"
    );
    // The source image is untouched.
    assert!(
        std::fs::read(&image).unwrap() == bytes,
        "the source image changed"
    );
    let _ = std::fs::remove_file(&image);
}

#[test]
fn send_uses_the_next_address_when_the_first_is_dead() {
    let (image, bytes) = image_file(8 * MIB, 6);
    let out = temp_path("received.bin");
    let (recv, live) = start_recv(&["--out", out.to_str().unwrap()]);
    // Nothing listens on a port that was just free: connecting is refused.
    let dead = format!("127.0.0.1:{}", free_port());
    let to = format!("{dead},{live}");
    let send = spawn_send(&to, &image, &["--json"]).wait_exit(Duration::from_secs(60));
    let recv = recv.wait_exit(Duration::from_secs(30));
    assert!(send.ok(), "send failed: {}", send.stderr);
    assert!(recv.ok(), "recv failed: {}", recv.stderr);
    let report = last_json_line(&send.stdout);
    assert_eq!(report["connected_to"], live.as_str(), "{report}");
    assert_eq!(report["verified"], true);
    assert!(
        std::fs::read(&out).unwrap() == bytes,
        "received image differs"
    );
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&out);
}

#[test]
fn send_to_only_dead_addresses_names_them_all() {
    let (image, _) = image_file(MIB, 7);
    let a = format!("127.0.0.1:{}", free_port());
    let b = format!("127.0.0.1:{}", free_port());
    let to = format!("{a},{b}");
    let out = spawn_send(&to, &image, &[]).wait_exit(Duration::from_secs(60));
    let _ = std::fs::remove_file(&image);
    assert!(!out.ok());
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&a) && out.stderr.contains(&b),
        "{}",
        out.stderr
    );
}
