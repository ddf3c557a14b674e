//! A `recv` confined by a real memory cgroup refuses, at setup, a guest larger than
//! the cgroup lets it commit: `send` fails naming memory and the cgroup, and the
//! receiver exits by itself (it is not OOM-killed).
//!
//! The test makes its own cgroup under the one this process sits in: cgroup v2 when
//! the unified hierarchy carries the memory controller, else the v1 memory
//! hierarchy. Where no memory cgroup can be made (not root, no memory controller, a
//! read-only /sys/fs/cgroup) it is skipped with the reason. Under `LIVEMIG_CI=1` it
//! fails instead when the machine offers a writable memory controller and the
//! cgroup still could not be made.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, temp_path};

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(30);
/// The confined receiver's memory limit; the guest below is twice as large.
const LIMIT: u64 = 128 * MIB;

/// A memory cgroup made for this test, removed when dropped.
struct Cgroup {
    dir: PathBuf,
    /// File that moves a process in when its pid is written to it.
    procs: PathBuf,
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Empty once the confined receiver has exited; a directory of a cgroup
        // hierarchy is removed with rmdir (its control files go with it).
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Why a memory cgroup cannot be made here: `capable` says whether the machine
/// looked able to (root, and a memory controller for this process's cgroup).
struct Unavailable {
    capable: bool,
    reason: String,
}

fn unavailable(capable: bool, reason: impl Into<String>) -> Unavailable {
    Unavailable {
        capable,
        reason: reason.into(),
    }
}

/// Where the memory controller governs this process: (hierarchy root, this
/// process's path in it, v2?).
fn memory_hierarchy() -> Option<(PathBuf, String, bool)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = Path::new("/sys/fs/cgroup");
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            for base in [root.to_path_buf(), root.join("unified")] {
                let offered =
                    std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
                if offered.split_whitespace().any(|c| c == "memory") {
                    return Some((base, path.to_string(), true));
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            return Some((root.join("memory"), path.to_string(), false));
        }
    }
    None
}

/// A cgroup v2 directory whose children get the memory controller: this
/// process's own cgroup or the nearest ancestor (the hierarchy's root last) that
/// has it enabled for its children or lets it be enabled. A cgroup holding
/// processes cannot enable it (the "no internal processes" rule, EBUSY), which is
/// why this process's own cgroup often will not do under systemd.
fn v2_parent(base: &Path, own: &Path) -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    for dir in own.ancestors().take_while(|d| d.starts_with(base)) {
        let control = dir.join("cgroup.subtree_control");
        let enabled = |c: &str| c.split_whitespace().any(|c| c == "memory");
        if std::fs::read_to_string(&control).is_ok_and(|c| enabled(&c)) {
            return Ok(dir.to_path_buf());
        }
        match std::fs::write(&control, "+memory") {
            Ok(()) => return Ok(dir.to_path_buf()),
            Err(e) => tried.push(format!("{}: {e}", control.display())),
        }
    }
    Err(format!(
        "no cgroup from this process's up to the root enables the memory controller for its children ({})",
        tried.join("; ")
    ))
}

fn make_cgroup(limit: u64) -> Result<Cgroup, Unavailable> {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let Some((base, path, v2)) = memory_hierarchy() else {
        return Err(unavailable(
            false,
            "no memory controller governs this process (/proc/self/cgroup, /sys/fs/cgroup)",
        ));
    };
    let own = base.join(path.trim_start_matches('/'));
    let own = if own.is_dir() { own } else { base.clone() };
    let parent = if v2 {
        match v2_parent(&base, &own) {
            Ok(p) => p,
            Err(reason) => return Err(unavailable(root, reason)),
        }
    } else {
        own
    };
    let dir = parent.join(format!("livemig-test-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&dir) {
        return Err(unavailable(
            root,
            format!("cannot create {}: {e}", dir.display()),
        ));
    }
    let (limit_file, procs) = if v2 {
        ("memory.max", "cgroup.procs")
    } else {
        ("memory.limit_in_bytes", "cgroup.procs")
    };
    let cg = Cgroup {
        procs: dir.join(procs),
        dir,
    };
    if let Err(e) = std::fs::write(cg.dir.join(limit_file), limit.to_string()) {
        return Err(unavailable(
            root,
            format!("cannot set {}: {e}", cg.dir.join(limit_file).display()),
        ));
    }
    Ok(cg)
}

#[test]
fn a_receiver_in_a_memory_cgroup_refuses_a_larger_guest_at_setup() {
    let cg = match make_cgroup(LIMIT) {
        Ok(cg) => cg,
        Err(u) => {
            let ci = std::env::var("LIVEMIG_CI").is_ok_and(|v| v == "1");
            if ci && u.capable {
                panic!(
                    "LIVEMIG_CI=1 and this machine has a memory controller, but: {}",
                    u.reason
                );
            }
            eprintln!("skipped: {}", u.reason);
            return;
        }
    };
    const EXE: &str = env!("CARGO_BIN_EXE_livemig");
    let image = temp_path("cgroup-256m.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(2 * LIMIT))
        .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    // The shell moves itself into the cgroup, then becomes the receiver, so the
    // receiver starts confined (no --max-memory: the bound must come from the
    // cgroup).
    let mut recv = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(&cg.procs)
        .args([EXE, "recv", "--plaintext", "--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let send = loop {
        let out = Command::new(EXE)
            .args(["send", "--plaintext", "--streams", "1", "--to", &addr])
            .args(["--image", image.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        // The listener may not be up yet on the first tries.
        if err.contains("cannot connect") && t.elapsed() < DEADLINE {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        break (out.status, err);
    };
    let _ = std::fs::remove_file(&image);
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = recv.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = recv.kill();
            panic!("recv did not exit after refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(recv.stderr.as_mut().unwrap(), &mut err).unwrap();
    eprintln!("send: {}", send.1.trim());
    assert!(!send.0.success(), "send must fail: {}", send.1);
    assert!(
        send.1.contains("not enough memory on the destination"),
        "send names memory: {}",
        send.1
    );
    let name = cg.dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        send.1.contains("cgroup") && send.1.contains(&name),
        "the bound comes from the test's cgroup ({name}): {}",
        send.1
    );
    // Refused and exited with an error of its own: not killed by a signal.
    assert_eq!(status.code(), Some(1), "recv exits by itself: {err}");
    assert!(err.contains("memory"), "{err}");
}
