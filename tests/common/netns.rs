//! Two hosts on one machine: two network namespaces joined by a veth pair, with
//! network faults injected between them (the Rust side of `scripts/two_host.sh`).
//!
//! Each namespace gets one end of the veth pair and one address of a private /30
//! ([`SRC_IP`], [`DST_IP`]); the addresses exist only inside the namespaces, so
//! every namespace pair may use the same ones and no traffic leaves them. Faults are
//! nftables rules inside the namespaces (`reject with tcp reset`, `drop`) and link
//! state changes. Dropping a [`TwoHosts`] kills what still runs in the namespaces
//! and deletes the rules and the namespaces (the veth pair goes with them), on
//! every exit path including a failed assertion.
//!
//! Needs root, `ip` (iproute2), `nft` (nftables) and, for shaping, `tc`; tests call
//! [`two_hosts_or_skip`], which skips with a printed reason when they are missing and
//! fails instead under `LIVEMIG_CI=1`.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::procs::Proc;

/// The source host's address (inside its namespace only).
pub const SRC_IP: &str = "10.200.0.1";
/// The destination host's address (inside its namespace only).
pub const DST_IP: &str = "10.200.0.2";
/// Prefix length of the link between them.
const PREFIX: u8 = 30;
/// Name of the veth end in both namespaces (interface names are per namespace).
const VETH: &str = "lm0";
/// The nftables table that holds injected faults.
const FAULT_TABLE: &str = "livemig_fault";

/// One of the two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Runs `livemig send`.
    Src,
    /// Runs `livemig recv`.
    Dst,
}

/// A network fault between the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetFault {
    /// Every TCP segment from the other host is answered with a reset (resets
    /// themselves pass, so each side's reset reaches the other).
    Reset,
    /// Every packet between the hosts is silently dropped.
    Blackhole,
}

/// Two network namespaces joined by a veth pair; deleted on drop.
#[derive(Debug)]
pub struct TwoHosts {
    src: String,
    dst: String,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why two hosts cannot be made here, if they cannot.
pub fn unavailable() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        });
    if uid.as_deref() != Some("0") {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "nft", "tc", "ss"] {
        if !have(tool) {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 nftables)"
            ));
        }
    }
    None
}

/// Two hosts, or `None` after printing why the test is skipped; under
/// `LIVEMIG_CI=1` a missing prerequisite fails the test instead.
pub fn two_hosts_or_skip(test: &str, rate: Option<&str>) -> Option<TwoHosts> {
    let ci = std::env::var("LIVEMIG_CI").is_ok_and(|v| v == "1");
    let why = match unavailable() {
        None => match TwoHosts::create(rate) {
            Ok(h) => return Some(h),
            Err(e) => e,
        },
        Some(why) => why,
    };
    if ci {
        panic!("LIVEMIG_CI=1 but two network namespaces are unavailable: {why}");
    }
    eprintln!("skipping {test}: {why}");
    None
}

impl TwoHosts {
    /// Create the namespaces and the link; `rate` (e.g. `"200mbit"`) shapes both
    /// directions with a `tc tbf` qdisc.
    pub fn create(rate: Option<&str>) -> Result<Self, String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "livemig-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let h = TwoHosts {
            src: format!("{tag}-src"),
            dst: format!("{tag}-dst"),
        };
        // From here on, `h`'s drop removes whatever was made.
        run(Command::new("ip").args(["netns", "add", &h.src]))?;
        run(Command::new("ip").args(["netns", "add", &h.dst]))?;
        run(Command::new("ip").args([
            "link", "add", "name", VETH, "netns", &h.src, "type", "veth", "peer", "name", VETH,
            "netns", &h.dst,
        ]))?;
        for (ns, ip) in [(&h.src, SRC_IP), (&h.dst, DST_IP)] {
            let cidr = format!("{ip}/{PREFIX}");
            run(Command::new("ip").args(["-n", ns, "addr", "add", &cidr, "dev", VETH]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", VETH, "up"]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
            // A new namespace copies these from the host's: pin the kernel's
            // defaults, so that what the tests measure (buffers in flight at a
            // break, a transfer's pace) does not depend on the machine's tuning.
            // (Written to /proc/sys from inside the namespace: `sysctl` is not on
            // every machine.)
            run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                "echo 4096 16384 4194304 > /proc/sys/net/ipv4/tcp_wmem && \
                 echo 4096 131072 6291456 > /proc/sys/net/ipv4/tcp_rmem && \
                 echo cubic > /proc/sys/net/ipv4/tcp_congestion_control",
            ]))?;
            if let Some(rate) = rate {
                run(Command::new("ip").args([
                    "netns", "exec", ns, "tc", "qdisc", "add", "dev", VETH, "root", "tbf", "rate",
                    rate, "burst", "256kb", "latency", "100ms",
                ]))?;
            }
        }
        Ok(h)
    }

    fn ns(&self, host: Host) -> &str {
        match host {
            Host::Src => &self.src,
            Host::Dst => &self.dst,
        }
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(&self, host: Host, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(host), program]);
        c
    }

    /// Start `program args` inside `host`'s namespace.
    pub fn spawn(&self, host: Host, program: &str, args: &[&str], name: &str) -> Proc {
        let mut c = self.command(host, program);
        c.args(args);
        Proc::spawn(c, name)
    }

    /// Established TCP connections in `host`'s namespace with local or remote port
    /// `port`.
    pub fn established(&self, host: Host, port: u16) -> usize {
        let filter = format!("( sport = :{port} or dport = :{port} )");
        run(self
            .command(host, "ss")
            .args(["-Htn", "state", "established", &filter]))
        .map(|o| o.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
    }

    /// Wait up to `limit` for a TCP listener on `port` in `host`'s namespace.
    pub fn wait_listening(&self, host: Host, port: u16, limit: std::time::Duration) -> bool {
        let t0 = std::time::Instant::now();
        let filter = format!("( sport = :{port} )");
        while t0.elapsed() < limit {
            let n = run(self.command(host, "ss").args(["-Htln", &filter]))
                .map(|o| o.lines().filter(|l| !l.trim().is_empty()).count())
                .unwrap_or(0);
            if n > 0 {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    /// Inject `fault` in both directions (rules in both namespaces, so each side's
    /// packets meet it).
    pub fn inject(&self, fault: NetFault) -> Result<(), String> {
        for (host, peer) in [(Host::Src, DST_IP), (Host::Dst, SRC_IP)] {
            let rules = match fault {
                NetFault::Reset => format!(
                    "table inet {FAULT_TABLE} {{\n chain input {{ type filter hook input priority 0; policy accept;\n  ip saddr {peer} tcp flags & rst == 0 reject with tcp reset\n }}\n}}\n"
                ),
                NetFault::Blackhole => format!(
                    "table inet {FAULT_TABLE} {{\n chain input {{ type filter hook input priority 0; policy accept;\n  ip saddr {peer} drop\n }}\n chain output {{ type filter hook output priority 0; policy accept;\n  ip daddr {peer} drop\n }}\n}}\n"
                ),
            };
            self.nft_script(host, &rules)?;
        }
        Ok(())
    }

    /// Remove injected faults.
    pub fn heal(&self) {
        for host in [Host::Src, Host::Dst] {
            let _ = run(self
                .command(host, "nft")
                .args(["delete", "table", "inet", FAULT_TABLE]));
        }
    }

    /// Take `host`'s end of the link down or up.
    pub fn link(&self, host: Host, up: bool) -> Result<(), String> {
        run(Command::new("ip").args([
            "-n",
            self.ns(host),
            "link",
            "set",
            VETH,
            if up { "up" } else { "down" },
        ]))
        .map(|_| ())
    }

    fn nft_script(&self, host: Host, rules: &str) -> Result<(), String> {
        use std::io::Write;
        let mut child = self
            .command(host, "nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft: {e}"))?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft -f - failed: {}\n{rules}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        self.heal();
        for ns in [&self.src, &self.dst] {
            // A namespace lives on while a process is in it: kill them first.
            if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", ns])) {
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill").args(["-s", "CONT", pid]).status();
                    let _ = Command::new("kill").args(["-s", "KILL", pid]).status();
                }
            }
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
    }
}
