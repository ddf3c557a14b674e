//! `livemig send` and `livemig recv` as two processes over loopback TCP.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, temp_path, wait_with_timeout, MIB, REPORT_KEYS};
use livemig::memory::GuestMemory;
use livemig::workload::{self, Content};

const EXE: &str = env!("CARGO_BIN_EXE_livemig");

fn last_json_line(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("no output; stdout was {stdout:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// Write a 32 MiB image of mixed content (as a guest would have it).
fn make_image() -> (std::path::PathBuf, Vec<u8>) {
    make_image_in(&std::env::temp_dir())
}

/// The same, in `dir`.
fn make_image_in(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let mem = GuestMemory::anonymous(32 * MIB, false).unwrap();
    workload::fill(&mem, Content::Mix, 77, 2).unwrap();
    let mut bytes = vec![0u8; 32 * MIB];
    mem.read_pages(0, &mut bytes).unwrap();
    let name = temp_path("image.bin");
    let path = dir.join(name.file_name().unwrap());
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

/// The file system type of `dir` (`stat -f -c %T`), e.g. "tmpfs" or "ext2/ext3".
fn fs_type(dir: &std::path::Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn run(args: &[&str], limit: Duration, what: &str) -> (i32, String, String) {
    let child = Command::new(EXE)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    wait_with_timeout(child, limit, what)
}

/// Certificates made with rcgen, written as PEM files: a CA, the destination's
/// certificate for 127.0.0.1 and the source's for `livemig-source`.
struct CertFiles {
    paths: Vec<std::path::PathBuf>,
}

impl CertFiles {
    fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "test CA");
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca = p.self_signed(&ca_key).unwrap();
        let mut files = vec![ca.pem()];
        for name in ["127.0.0.1", "livemig-source"] {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            files.push(cert.pem());
            files.push(key.serialize_pem());
        }
        let paths = ["ca.pem", "dest.pem", "dest.key", "src.pem", "src.key"]
            .iter()
            .zip(files)
            .map(|(n, text)| {
                let p = temp_path(n);
                std::fs::write(&p, text).unwrap();
                p
            })
            .collect();
        Self { paths }
    }

    fn arg(&self, i: usize) -> String {
        self.paths[i].to_str().unwrap().to_string()
    }

    /// `recv`'s flags: the destination's certificate, only the source may connect.
    fn recv_flags(&self) -> Vec<String> {
        [
            "--tls-cert",
            &self.arg(1),
            "--tls-key",
            &self.arg(2),
            "--tls-ca",
            &self.arg(0),
            "--tls-peer-name",
            "livemig-source",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `send`'s flags (the destination's name defaults to the host of --to).
    fn send_flags(&self) -> Vec<String> {
        [
            "--tls-cert",
            &self.arg(3),
            "--tls-key",
            &self.arg(4),
            "--tls-ca",
            &self.arg(0),
        ]
        .map(String::from)
        .to_vec()
    }
}

impl Drop for CertFiles {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
fn send_recv_two_processes() {
    let tmp = std::env::temp_dir();
    let (send, recv) = send_recv(&tmp, &["--plaintext".into()], &["--plaintext".into()]);
    assert_eq!(send["tls"], false);
    assert_eq!(recv["tls"], false);
    // An image outside tmpfs is read through its mapping.
    if fs_type(&tmp) != "tmpfs" {
        assert_eq!(send["image_read"], "mapping", "{send}");
    }
}

/// An image on tmpfs in 4 KiB pages (`/dev/shm` here) is copied out of the file
/// with `pread` (the file path of the sender), here over TLS, a stream that reads
/// every byte in user space.
#[test]
fn send_recv_two_processes_over_mutual_tls() {
    let certs = CertFiles::new();
    let shm = std::path::Path::new("/dev/shm");
    let (send, recv) = send_recv(shm, &certs.send_flags(), &certs.recv_flags());
    assert_eq!(send["tls"], true);
    assert_eq!(recv["tls"], true);
    if fs_type(shm) == "tmpfs" {
        assert_eq!(send["image_read"], "copy", "{send}");
    } else {
        assert!(
            std::env::var("LIVEMIG_CI").as_deref() != Ok("1"),
            "LIVEMIG_CI=1 but /dev/shm is not a tmpfs"
        );
        eprintln!("skipped the read-path check: /dev/shm is not a tmpfs");
    }
}

#[test]
fn send_and_recv_refuse_to_run_without_tls_or_plaintext() {
    let (image, _) = make_image();
    // The address is held by this test: the flags are checked before `recv` binds
    // (or `send` connects), so the refusal names them and not the busy port.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    for args in [
        vec!["recv", "--listen", &addr],
        vec!["recv", "--serve", "--listen", &addr],
        vec!["send", "--to", &addr, "--image", image.to_str().unwrap()],
    ] {
        let (code, _, err) = run(&args, Duration::from_secs(60), args[0]);
        assert_ne!(code, 0, "{} ran without TLS or --plaintext", args[0]);
        assert!(
            err.contains("needs mutual TLS") && err.contains("--plaintext"),
            "{}: {err}",
            args[0]
        );
    }
    let _ = std::fs::remove_file(&image);
}

/// Send a 32 MiB image from one process to another; check the received image and
/// both JSON reports; return them.
fn send_recv(
    image_dir: &std::path::Path,
    send_extra: &[String],
    recv_extra: &[String],
) -> (serde_json::Value, serde_json::Value) {
    let (image, bytes) = make_image_in(image_dir);
    let out = temp_path("received.bin");
    let image_s = image.to_str().unwrap().to_string();
    let out_s = out.to_str().unwrap().to_string();
    let mut outcome = None;
    // The port is free when picked but may be taken before `recv` binds it, and
    // `send` may start before `recv` listens: retry both cases.
    'ports: for _ in 0..5 {
        let addr = format!("127.0.0.1:{}", free_port());
        let recv = Command::new(EXE)
            .args(["recv", "--listen", &addr, "--out", &out_s, "--json"])
            .args(recv_extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn recv");
        for _ in 0..50 {
            let mut args = vec![
                "send",
                "--to",
                &addr,
                "--image",
                &image_s,
                "--streams",
                "2",
                "--json",
            ];
            args.extend(send_extra.iter().map(String::as_str));
            let send = run(&args, Duration::from_secs(60), "send");
            if send.0 != 0 && send.2.contains("cannot connect") {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let recv = wait_with_timeout(recv, Duration::from_secs(60), "recv");
            outcome = Some((send, recv));
            break 'ports;
        }
        // recv never listened (port taken): try another port.
        let _ = wait_with_timeout(recv, Duration::from_secs(60), "recv");
    }
    let (send, recv) = outcome.expect("could not start send/recv on any port");
    assert_eq!(send.0, 0, "send failed: {}", send.2);
    assert_eq!(recv.0, 0, "recv failed: {}", recv.2);

    let got = std::fs::read(&out).expect("received image");
    assert_eq!(got.len(), bytes.len());
    assert!(got == bytes, "received image differs from the sent one");

    let s = last_json_line(&send.1);
    for k in REPORT_KEYS {
        assert!(s.get(k).is_some(), "send JSON lacks {k}: {s}");
    }
    assert_eq!(s["memory_bytes"], 32 * MIB as u64);
    assert_eq!(s["streams"], 2);
    assert_eq!(s["verified"], true);
    assert_eq!(s["converged"], true);
    assert_eq!(s["tracker"], "none");
    // The sender's memory overhead is measured (sampled anonymous RSS; the guest is
    // the file-backed image). It must stay well below the guest: a sender that
    // copied guest memory into buffers would exceed it.
    let start = s["sender_anon_rss_start_bytes"]
        .as_u64()
        .expect("rss start");
    let peak = s["sender_anon_rss_peak_bytes"].as_u64().expect("rss peak");
    assert!(start > 0 && peak >= start, "start {start} peak {peak}");
    assert!(
        peak < 32 * MIB as u64,
        "sender anon RSS peak {peak} ≥ guest size"
    );
    let ratio = s["sender_overhead_vs_guest"].as_f64().expect("ratio");
    assert!((ratio - peak as f64 / (32 * MIB) as f64).abs() < 1e-12);

    // recv prints the destination's report: the keys that side knows.
    let r = last_json_line(&recv.1);
    for k in [
        "memory_bytes",
        "streams",
        "rounds",
        "total_ms",
        "verified",
        "guest_gib_per_s",
    ] {
        assert!(r.get(k).is_some(), "recv JSON lacks {k}: {r}");
    }
    assert_eq!(r["verified"], true);
    assert_eq!(r["digest"], s["digest"]);

    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&out);
    (s, r)
}

#[test]
fn send_to_nobody_fails_cleanly() {
    let (image, _) = make_image();
    let addr = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = run(
        &[
            "send",
            "--to",
            &addr,
            "--image",
            image.to_str().unwrap(),
            "--json",
            "--plaintext",
        ],
        Duration::from_secs(60),
        "send",
    );
    let _ = std::fs::remove_file(&image);
    assert_ne!(code, 0);
    assert!(err.contains("cannot connect"), "{err}");
}
