//! `livemig recv --memory SIZE --prealloc`: destination memory prepared when `recv`
//! starts; a guest of that size uses it, a bigger one is refused naming memory.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, temp_path, wait_with_timeout, MIB};
use livemig::memory::GuestMemory;
use livemig::workload::{self, Content};

const EXE: &str = env!("CARGO_BIN_EXE_livemig");

fn spawn(args: &[&str]) -> Child {
    Command::new(EXE)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn livemig")
}

/// `recv --plaintext --memory 64M --prealloc --out OUT`, then `send` of `image`;
/// returns (send, recv) exit codes and output.
fn send_into_prepared(
    image: &std::path::Path,
    out: &std::path::Path,
) -> ((i32, String, String), (i32, String, String)) {
    let image = image.to_str().unwrap();
    let out = out.to_str().unwrap();
    // The port may be taken before `recv` binds it, and `send` may start before
    // `recv` listens (it commits its memory first): retry both.
    for _ in 0..5 {
        let addr = format!("127.0.0.1:{}", free_port());
        let recv = spawn(&[
            "recv",
            "--plaintext",
            "--listen",
            &addr,
            "--memory",
            "64M",
            "--prealloc",
            "--out",
            out,
            "--json",
        ]);
        for _ in 0..100 {
            let send = wait_with_timeout(
                spawn(&[
                    "send",
                    "--plaintext",
                    "--to",
                    &addr,
                    "--image",
                    image,
                    "--json",
                ]),
                Duration::from_secs(60),
                "send",
            );
            if send.0 != 0 && send.2.contains("cannot connect") {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            return (
                send,
                wait_with_timeout(recv, Duration::from_secs(60), "recv"),
            );
        }
        let _ = wait_with_timeout(recv, Duration::from_secs(60), "recv");
    }
    panic!("could not start send/recv on any port");
}

#[test]
fn recv_memory_prealloc_takes_a_guest_of_its_size_and_refuses_a_bigger_one() {
    // A 64 MiB guest of mixed content: received into the prepared memory.
    let mem = GuestMemory::anonymous(64 * MIB, false).unwrap();
    workload::fill(&mem, Content::Mix, 5, 2).unwrap();
    let mut bytes = vec![0u8; 64 * MIB];
    mem.read_pages(0, &mut bytes).unwrap();
    let image = temp_path("prepared-64.img");
    let out = temp_path("prepared-out.img");
    std::fs::write(&image, &bytes).unwrap();
    let (send, recv) = send_into_prepared(&image, &out);
    assert_eq!(send.0, 0, "send failed: {}", send.2);
    assert_eq!(recv.0, 0, "recv failed: {}", recv.2);
    let got = std::fs::read(&out).expect("received image");
    assert!(got == bytes, "received image differs from the sent one");
    let report: serde_json::Value =
        serde_json::from_str(recv.1.lines().last().expect("recv JSON")).unwrap();
    assert_eq!(report["memory_prepared"], true, "{report}");
    assert_eq!(report["memory_bytes"], 64 * MIB as u64);
    // The committed guest is resident, so the receiver's peak anonymous RSS holds it,
    // and what it reports beyond the guest is that peak less the guest.
    let peak = report["receiver_anon_rss_peak_bytes"]
        .as_u64()
        .expect("peak RSS");
    assert!(
        peak >= 64 * MIB as u64,
        "peak {peak} below the guest: {report}"
    );
    assert_eq!(
        report["receiver_anon_rss_beyond_guest_bytes"].as_u64(),
        Some(peak - 64 * MIB as u64),
        "{report}"
    );
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&out);

    // A 128 MiB guest (a sparse image): refused at setup, naming memory.
    let big = temp_path("prepared-128.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(128 * MIB as u64)
        .unwrap();
    let (send, recv) = send_into_prepared(&big, &out);
    let _ = std::fs::remove_file(&big);
    assert_ne!(send.0, 0, "send of a bigger guest succeeded: {}", send.1);
    assert!(
        send.2.contains("memory") && send.2.contains(&(128 * MIB).to_string()),
        "send's error names memory and the guest's size: {}",
        send.2
    );
    assert!(
        send.2.contains(&(64 * MIB).to_string()),
        "send's error names the prepared size: {}",
        send.2
    );
    assert_ne!(recv.0, 0, "recv accepted a bigger guest");
    assert!(!out.exists(), "nothing is written for a refused guest");
}
