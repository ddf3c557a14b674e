//! How much memory this host can commit to a skeleton VM, read before anything is
//! mapped: the kernel's `MemAvailable`, and the limit minus the usage of every
//! memory cgroup this process sits in (v2 `memory.max` / `memory.current`, v1
//! `memory.limit_in_bytes` / `memory.usage_in_bytes`), whichever is smallest.
//!
//! A receiver that maps more than this gets OOM-killed while pages arrive; refusing
//! at setup keeps it alive and tells the source why. `ReceiverConfig::max_memory`
//! replaces the measured figure (an operator's own bound, or a test's).

use std::path::{Path, PathBuf};

/// What the host can commit, and where the figure comes from (for the refusal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committable {
    /// Bytes that can still be committed.
    pub bytes: u64,
    /// Where `bytes` comes from.
    pub source: CommitSource,
}

/// Where a [`Committable`] figure comes from (named in a refusal).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitSource {
    /// The kernel's `MemAvailable`.
    MemAvailable,
    /// A memory cgroup's limit minus its usage.
    Cgroup {
        /// cgroup version (1 or 2).
        version: u8,
        /// The group's directory.
        dir: PathBuf,
        /// The limit file (`memory.max`, `memory.limit_in_bytes`).
        limit_file: &'static str,
        /// Its value.
        limit: u64,
        /// The usage file (`memory.current`, `memory.usage_in_bytes`).
        usage_file: &'static str,
        /// Its value.
        usage: u64,
    },
}

impl std::fmt::Display for CommitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MemAvailable => f.write_str("MemAvailable"),
            Self::Cgroup {
                version,
                dir,
                limit_file,
                limit,
                usage_file,
                usage,
            } => write!(
                f,
                "cgroup v{version} {} ({limit_file} {limit} − {usage_file} {usage})",
                dir.display()
            ),
        }
    }
}

/// A limit at or above this is "no limit" (cgroup v1 reports an unlimited group as
/// `PAGE_COUNTER_MAX` pages, about 2^63 bytes).
const UNLIMITED: u64 = 1 << 60;

/// The live host's committable memory (`/proc`, `/sys/fs/cgroup`); `None` when not
/// even `MemAvailable` can be read (then no bound is applied).
pub fn committable() -> Option<Committable> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    committable_in(&meminfo, &cgroup, Path::new("/sys/fs/cgroup"))
}

/// [`committable`] over given contents of `/proc/meminfo` and `/proc/self/cgroup`
/// and a cgroup mount root (tests use fixture trees).
pub fn committable_in(meminfo: &str, self_cgroup: &str, cgroup_root: &Path) -> Option<Committable> {
    let mut best: Option<Committable> = parse_mem_available(meminfo).map(|bytes| Committable {
        bytes,
        source: CommitSource::MemAvailable,
    });
    let mut consider = |c: Committable| {
        if best.as_ref().is_none_or(|b| c.bytes < b.bytes) {
            best = Some(c);
        }
    };
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            // cgroup v2: the unified hierarchy at the root (pure v2) or at
            // `unified/` (hybrid).
            for base in [cgroup_root.to_path_buf(), cgroup_root.join("unified")] {
                if base.join("cgroup.controllers").exists() {
                    if let Some(c) = walk_up(&base, path, "memory.max", "memory.current", 2) {
                        consider(c);
                    }
                    break;
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let base = cgroup_root.join("memory");
            if let Some(c) = walk_up(
                &base,
                path,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                1,
            ) {
                consider(c);
            }
        }
    }
    best
}

/// The smallest `limit − usage` from the process's cgroup up to the mount root
/// (every ancestor's limit applies too). Inside a cgroup namespace the process's
/// path may not exist under the mount; then the mount root is the process's group.
fn walk_up(
    base: &Path,
    path: &str,
    limit_file: &'static str,
    usage_file: &'static str,
    version: u8,
) -> Option<Committable> {
    let leaf = base.join(path.trim_start_matches('/'));
    let mut dir: PathBuf = if leaf.is_dir() {
        leaf
    } else {
        base.to_path_buf()
    };
    let mut best: Option<Committable> = None;
    loop {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        if let (Some(limit), Some(usage)) = (
            read(limit_file).and_then(|s| parse_cgroup_value(&s)),
            read(usage_file).and_then(|s| parse_cgroup_value(&s)),
        ) {
            let left = limit.saturating_sub(usage);
            if best.as_ref().is_none_or(|b| left < b.bytes) {
                best = Some(Committable {
                    bytes: left,
                    source: CommitSource::Cgroup {
                        version,
                        dir: dir.clone(),
                        limit_file,
                        limit,
                        usage_file,
                        usage,
                    },
                });
            }
        }
        if dir == base || !dir.pop() || !dir.starts_with(base) {
            break;
        }
    }
    best
}

/// `MemAvailable` from `/proc/meminfo` contents, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// A cgroup memory file's value in bytes; `None` for "max" (v2), for a v1
/// "unlimited" figure, and for anything unparsable.
pub fn parse_cgroup_value(s: &str) -> Option<u64> {
    let v: u64 = s.trim().parse().ok()?;
    (v < UNLIMITED).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Option<Committable> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/host_memory")
            .join(name);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("fixture file");
        committable_in(
            &read("meminfo"),
            &read("cgroup"),
            &dir.join("sys/fs/cgroup"),
        )
    }

    #[test]
    fn parses_meminfo_and_cgroup_values() {
        assert_eq!(
            parse_mem_available("MemTotal: 10 kB\nMemAvailable:    2048 kB\n"),
            Some(2 << 20)
        );
        assert_eq!(parse_mem_available("MemTotal: 10 kB\n"), None);
        assert_eq!(parse_cgroup_value("max\n"), None);
        assert_eq!(parse_cgroup_value("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_value("2147483648\n"), Some(2 << 30));
        assert_eq!(parse_cgroup_value("junk"), None);
    }

    #[test]
    fn cgroup_v2_limit_minus_usage_is_the_bound() {
        let c = fixture("v2").expect("a bound");
        // vm.scope: 2 GiB max − 512 MiB current; its parent has no limit and
        // MemAvailable (about 7.6 GiB) is larger.
        assert_eq!(c.bytes, (2 << 30) - (512 << 20));
        let shown = c.source.to_string();
        assert!(shown.contains("cgroup v2"), "{shown}");
        assert!(shown.contains("vm.scope"), "{shown}");
    }

    #[test]
    fn cgroup_v1_limit_minus_usage_is_the_bound() {
        let c = fixture("v1").expect("a bound");
        assert_eq!(c.bytes, 1 << 30);
        assert!(c.source.to_string().contains("cgroup v1"), "{}", c.source);
    }

    #[test]
    fn without_a_cgroup_limit_mem_available_is_the_bound() {
        // The process's v1 path is not under the mount (a cgroup namespace), and
        // the mount root is unlimited.
        let c = fixture("nolimit").expect("a bound");
        assert_eq!(c.bytes, 24126972 * 1024);
        assert_eq!(c.source, CommitSource::MemAvailable);
    }

    #[test]
    fn the_live_host_has_a_bound() {
        let c = committable().expect("/proc/meminfo is readable on Linux");
        assert!(c.bytes > 0, "{c:?}");
    }
}
