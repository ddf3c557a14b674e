//! A seeded random fault plan: the guest a run migrates, and which faults it
//! injects, where and when. The same seed always gives the same plan
//! ([`Plan::from_seed`]), so a run that breaks an invariant is replayed with
//! `livemig chaos --runs 1 --seed S`.
//!
//! Why over 600 lines: the fault classes, phases and triggers are one table that the
//! seeded draw walks; splitting it would scatter that table. Its tests are the rest.

use std::fmt;
use std::time::Duration;

use crate::rng::splitmix;

/// A small deterministic generator (SplitMix64, the crate's own
/// [`crate::workload::splitmix`]): plans must be reproducible from a printed seed
/// and need no cryptographic quality, so no extra dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        splitmix(&mut self.0)
    }
    /// Uniform in `0..n` (`n` = 0 gives 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// One element of `xs` (which must not be empty).
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// The deadlines every run uses (shortened so that a run takes a fraction of a
/// second and a thousand runs a few minutes). Fault durations are drawn against
/// them: a short stall stays well under every deadline, a long one outlasts the
/// peer timeout.
#[derive(Debug, Clone)]
pub struct Deadlines {
    /// `MigrationConfig::peer_timeout` (also the TCP peer timeout of every stream).
    pub peer_timeout: Duration,
    /// `MigrationConfig::reply_timeout`.
    pub reply_timeout: Duration,
    /// `MigrationConfig::brownout_timeout`.
    pub brownout_timeout: Duration,
    /// `MigrationConfig::outcome_timeout`.
    pub outcome_timeout: Duration,
    /// `MigrationConfig::reconnect_timeout`.
    pub reconnect_timeout: Duration,
    /// `ReceiverConfig::resume_window`.
    pub resume_window: Duration,
    /// `ReceiverConfig::idle_timeout`.
    pub idle_timeout: Duration,
    /// `ReceiverConfig::accept_timeout` (and `setup_timeout`).
    pub accept_timeout: Duration,
    /// `ReceiverConfig::hello_timeout`.
    pub hello_timeout: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            peer_timeout: Duration::from_millis(600),
            reply_timeout: Duration::from_millis(500),
            brownout_timeout: Duration::from_millis(1500),
            outcome_timeout: Duration::from_secs(3),
            reconnect_timeout: Duration::from_millis(1500),
            resume_window: Duration::from_secs(2),
            idle_timeout: Duration::from_millis(1200),
            accept_timeout: Duration::from_millis(1500),
            hello_timeout: Duration::from_millis(500),
        }
    }
}

/// Which way the affected bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// What the source sends (acted on at the source's end of the stream, or for
    /// a page stream stall, where the destination reads it).
    SourceToDest,
    /// What the destination sends (acted on where the source reads it; a page
    /// stream carries nothing this way, so there the destination's end acts).
    DestToSource,
}

impl Dir {
    fn arrow(self) -> &'static str {
        match self {
            Self::SourceToDest => "s->d",
            Self::DestToSource => "d->s",
        }
    }
}

/// Where in the migration a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Handshake, setup, page streams opening.
    Setup,
    /// The full copy.
    Round0,
    /// A pre-copy round after the first.
    LaterRounds,
    /// Between the pause and the `Commit` frame.
    Brownout,
    /// `Commit` … `Committed`.
    Commit,
}

impl Phase {
    /// Name in tables and plans.
    pub fn name(self) -> &'static str {
        match self {
            Self::Setup => "setup",
            Self::Round0 => "round0",
            Self::LaterRounds => "later_rounds",
            Self::Brownout => "brownout",
            Self::Commit => "commit",
        }
    }
}

/// Which stream a fault acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The control stream.
    Control,
    /// Page stream `i` (0-based, as in `StreamHello.index`).
    Page(u16),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Control => write!(f, "control"),
            Self::Page(i) => write!(f, "page{i}"),
        }
    }
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// A page stream is cut (both ends shut down).
    StreamKill,
    /// The control connection is cut (both ends shut down; a frame the source was
    /// about to read is lost).
    ControlReset,
    /// The destination dies: every stream it holds is cut and it accepts nothing.
    /// A restarted destination answers outcome queries from the outcome record it
    /// left, `restart_after` later (`None`: only when the operator resolves).
    DestKill {
        /// Downtime before the restart.
        restart_after: Option<Duration>,
    },
    /// The source's next read or write on the stream fails (and every later one),
    /// the peer seeing nothing.
    SourceError,
    /// The stream stops moving bytes for `hold`; `long` when that outlasts the
    /// peer timeout.
    Stall {
        /// How long nothing moves.
        hold: Duration,
        /// Beyond the peer timeout.
        long: bool,
    },
    /// One bit of the `skip`-th byte moved after the trigger is flipped.
    Corrupt {
        /// Bytes let through first.
        skip: u32,
        /// Bit flipped (0..8).
        bit: u8,
    },
    /// The destination's participant takes `delay` to restore (beyond the reply
    /// timeout).
    SlowRestore {
        /// Restore time.
        delay: Duration,
    },
}

/// Fault classes, as the campaign's table counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// [`FaultKind::StreamKill`].
    StreamKill,
    /// [`FaultKind::ControlReset`].
    ControlReset,
    /// [`FaultKind::DestKill`].
    DestKill,
    /// [`FaultKind::SourceError`].
    SourceError,
    /// [`FaultKind::Stall`], under the peer timeout.
    StallShort,
    /// [`FaultKind::Stall`], beyond the peer timeout.
    StallLong,
    /// [`FaultKind::Corrupt`].
    Corrupt,
    /// [`FaultKind::SlowRestore`].
    SlowRestore,
}

impl Class {
    /// Every class, in table order.
    pub const ALL: [Class; 8] = [
        Class::StreamKill,
        Class::ControlReset,
        Class::DestKill,
        Class::SourceError,
        Class::StallShort,
        Class::StallLong,
        Class::Corrupt,
        Class::SlowRestore,
    ];

    /// Name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::StreamKill => "stream_kill",
            Self::ControlReset => "control_reset",
            Self::DestKill => "dest_kill",
            Self::SourceError => "source_error",
            Self::StallShort => "stall_short",
            Self::StallLong => "stall_long",
            Self::Corrupt => "corrupt",
            Self::SlowRestore => "slow_restore",
        }
    }

    /// A fault a resuming migration should ride out: a reset, a killed stream,
    /// a short stall.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::StreamKill | Self::ControlReset | Self::StallShort
        )
    }
}

impl FaultKind {
    /// The table class.
    pub fn class(self) -> Class {
        match self {
            Self::StreamKill => Class::StreamKill,
            Self::ControlReset => Class::ControlReset,
            Self::DestKill { .. } => Class::DestKill,
            Self::SourceError => Class::SourceError,
            Self::Stall { long: false, .. } => Class::StallShort,
            Self::Stall { long: true, .. } => Class::StallLong,
            Self::Corrupt { .. } => Class::Corrupt,
            Self::SlowRestore { .. } => Class::SlowRestore,
        }
    }
}

/// When a fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// At a frame named `name` (the control message's `type`) on stream
    /// `stream`: before its first byte is written (`SourceToDest`) or before the
    /// source is handed it (`DestToSource`).
    Frame {
        /// Which way the frame goes.
        dir: Dir,
        /// Its `type`.
        name: &'static str,
        /// The stream it goes on.
        stream: Target,
    },
    /// Once the source has written `bytes` page-stream bytes in pre-copy round
    /// `round`, or when that round ends.
    Round {
        /// Round number (0 = the full copy).
        round: u32,
        /// Page bytes into the round.
        bytes: u64,
    },
    /// Once the source has written `bytes` page-stream bytes after the pause, or
    /// just before it writes `Commit`.
    Paused {
        /// Page bytes into the final round.
        bytes: u64,
    },
    /// When the destination restores (the slow restore needs no other trigger).
    Restore,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Frame { dir, name, stream } => match dir {
                Dir::SourceToDest => write!(f, "before {stream} writes {name}"),
                Dir::DestToSource => write!(f, "when {stream} reads {name}"),
            },
            Self::Round { round, bytes } => write!(f, "{bytes} B into round {round}"),
            Self::Paused { bytes } => write!(f, "{bytes} B after the pause"),
            Self::Restore => write!(f, "at the restore"),
        }
    }
}

/// One fault of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What it does.
    pub kind: FaultKind,
    /// The phase it was drawn for.
    pub phase: Phase,
    /// Which bytes it affects.
    pub dir: Dir,
    /// The stream it acts on.
    pub target: Target,
    /// When it fires.
    pub trigger: Trigger,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind.class().name())?;
        match self.kind {
            FaultKind::DestKill { restart_after } => match restart_after {
                Some(d) => write!(f, "(restart after {} ms)", d.as_millis())?,
                None => write!(f, "(no restart)")?,
            },
            FaultKind::Stall { hold, .. } => write!(f, "({} ms)", hold.as_millis())?,
            FaultKind::Corrupt { skip, bit } => write!(f, "(byte +{skip}, bit {bit})")?,
            FaultKind::SlowRestore { delay } => write!(f, "({} ms)", delay.as_millis())?,
            _ => {}
        }
        write!(
            f,
            " {} {} in {} {}",
            self.dir.arrow(),
            self.target,
            self.phase.name(),
            self.trigger
        )
    }
}

/// Everything a run does, drawn from one seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The seed it was drawn from.
    pub seed: u64,
    /// Guest memory, in pages.
    pub pages: u64,
    /// Page streams.
    pub streams: u16,
    /// Pre-copy rounds before the pause (≥ 2).
    pub rounds: u32,
    /// Guest writes per second (whole pages).
    pub dirty_pages_per_s: u64,
    /// Pages the guest writes to (the first ones).
    pub hot_pages: u64,
    /// Cap on the page streams' rate (bits/s), so a round takes tens of ms.
    pub bandwidth_bps: u64,
    /// Compress mode (lz4) rather than raw multichannel.
    pub compress: bool,
    /// The faults, one or more.
    pub faults: Vec<Fault>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} KiB guest, {} stream(s) {}, {} rounds, {} writes/s over {} pages, {} Mbit/s; faults: ",
            self.seed,
            self.pages * 4,
            self.streams,
            if self.compress { "lz4" } else { "raw" },
            self.rounds,
            self.dirty_pages_per_s,
            self.hot_pages,
            self.bandwidth_bps / 1_000_000
        )?;
        for (i, x) in self.faults.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

impl Plan {
    /// The plan of seed `seed` under deadlines `d`.
    pub fn from_seed(seed: u64, d: &Deadlines) -> Self {
        let mut rng = Rng::new(seed ^ 0x6368_616f_735f_706c); // "chaos_pl"
        let pages = rng.range(512, 1536); // 2–6 MiB
        let streams = rng.range(1, 3) as u16;
        let rounds = rng.range(2, 4) as u32;
        let hot_pages = rng.range(64, 256);
        let dirty_pages_per_s = rng.range(500, 4000);
        let bandwidth_bps = rng.range(300, 900) * 1_000_000;
        let compress = rng.chance(20);
        let n = match rng.below(100) {
            0..=69 => 1,
            70..=94 => 2,
            _ => 3,
        };
        let mut plan = Self {
            seed,
            pages,
            streams,
            rounds,
            dirty_pages_per_s,
            hot_pages,
            bandwidth_bps,
            compress,
            faults: Vec::new(),
        };
        for _ in 0..n {
            let fault = plan.draw_fault(&mut rng, d);
            plan.faults.push(fault);
        }
        plan
    }

    /// Bytes round 0 puts on the page streams, roughly (a quarter of the pages
    /// start as zero pages, which cost a header bit).
    fn round0_bytes(&self) -> u64 {
        self.pages * 3 / 4 * 4096
    }

    fn draw_fault(&self, rng: &mut Rng, d: &Deadlines) -> Fault {
        let class = rng.pick(&Class::ALL);
        let ms = |x: u64| Duration::from_millis(x);
        let peer = d.peer_timeout.as_millis() as u64;
        let shortest = d
            .peer_timeout
            .min(d.reply_timeout)
            .min(d.idle_timeout)
            .as_millis() as u64;
        let kind = match class {
            Class::StreamKill => FaultKind::StreamKill,
            Class::ControlReset => FaultKind::ControlReset,
            Class::DestKill => FaultKind::DestKill {
                restart_after: rng
                    .chance(60)
                    .then(|| ms(rng.range(50, d.outcome_timeout.as_millis() as u64))),
            },
            Class::SourceError => FaultKind::SourceError,
            Class::StallShort => FaultKind::Stall {
                hold: ms(rng.range(shortest / 10, shortest * 2 / 5)),
                long: false,
            },
            Class::StallLong => FaultKind::Stall {
                hold: ms(rng.range(peer * 3 / 2, peer * 5 / 2)),
                long: true,
            },
            Class::Corrupt => FaultKind::Corrupt {
                skip: 0,
                bit: rng.below(8) as u8,
            },
            Class::SlowRestore => FaultKind::SlowRestore {
                // From just past the reply timeout (the source learns the
                // outcome by asking) to beyond its outcome deadline (in doubt,
                // resolved by the operator).
                delay: ms(rng.range(
                    d.reply_timeout.as_millis() as u64 * 6 / 5,
                    d.outcome_timeout.as_millis() as u64,
                )),
            },
        };
        if class == Class::SlowRestore {
            return Fault {
                kind,
                phase: Phase::Commit,
                dir: Dir::DestToSource,
                target: Target::Control,
                trigger: Trigger::Restore,
            };
        }
        let phase = rng.pick(&[
            Phase::Setup,
            Phase::Round0,
            Phase::LaterRounds,
            Phase::Brownout,
            Phase::Commit,
        ]);
        let mut dir = rng.pick(&[Dir::SourceToDest, Dir::DestToSource]);
        let page = Target::Page(rng.below(self.streams as u64) as u16);
        let target = match class {
            Class::StreamKill => page,
            Class::ControlReset | Class::DestKill => Target::Control,
            _ => rng.pick(&[Target::Control, page]),
        };
        if class == Class::SourceError && target != Target::Control {
            // The source only writes page streams.
            dir = Dir::SourceToDest;
        }
        if class == Class::Corrupt && target != Target::Control {
            // Page streams carry nothing from the destination.
            dir = Dir::SourceToDest;
        }
        let kind = match kind {
            FaultKind::Corrupt { bit, .. } => FaultKind::Corrupt {
                skip: match target {
                    // Into a frame's header or message.
                    Target::Control => rng.below(48) as u32,
                    // Anywhere in the next batch or two.
                    Target::Page(_) => rng.below(8192) as u32,
                },
                bit,
            },
            k => k,
        };
        let trigger = match phase {
            Phase::Setup => match target {
                Target::Page(_) => Trigger::Frame {
                    dir: Dir::SourceToDest,
                    name: "stream_hello",
                    stream: target,
                },
                Target::Control => match dir {
                    Dir::SourceToDest => Trigger::Frame {
                        dir,
                        name: rng.pick(&["hello", "setup"]),
                        stream: target,
                    },
                    Dir::DestToSource => Trigger::Frame {
                        dir,
                        name: rng.pick(&["welcome", "setup_ok"]),
                        stream: target,
                    },
                },
            },
            Phase::Round0 => Trigger::Round {
                round: 0,
                bytes: rng.below(self.round0_bytes()),
            },
            Phase::LaterRounds => Trigger::Round {
                round: rng.range(1, self.rounds as u64 - 1) as u32,
                bytes: rng.below(self.hot_pages * 4096),
            },
            Phase::Brownout => Trigger::Paused {
                bytes: rng.below(self.hot_pages * 4096 / 2),
            },
            Phase::Commit => match dir {
                Dir::SourceToDest => Trigger::Frame {
                    dir,
                    name: rng.pick(&["commit", "released"]),
                    stream: Target::Control,
                },
                Dir::DestToSource => Trigger::Frame {
                    dir,
                    name: rng.pick(&["prepared", "committed"]),
                    stream: Target::Control,
                },
            },
        };
        Fault {
            kind,
            phase,
            dir,
            target,
            trigger,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let d = Deadlines::default();
        for seed in [0u64, 1, 7, 12345, u64::MAX] {
            let a = Plan::from_seed(seed, &d);
            let b = Plan::from_seed(seed, &d);
            assert_eq!(a, b);
            assert_eq!(a.to_string(), b.to_string());
            assert!(!a.faults.is_empty() && a.faults.len() <= 3, "{a}");
        }
        // Different seeds give different plans (not all equal to the first).
        let first = Plan::from_seed(1, &d);
        assert!((2..50).any(|s| Plan::from_seed(s, &d).faults != first.faults));
    }

    #[test]
    fn plans_cover_every_class_and_phase_and_stay_in_range() {
        let d = Deadlines::default();
        let mut classes = std::collections::BTreeSet::new();
        let mut phases = std::collections::BTreeSet::new();
        for seed in 0..2000 {
            let p = Plan::from_seed(seed, &d);
            assert!(p.rounds >= 2 && p.streams >= 1);
            for f in &p.faults {
                classes.insert(f.kind.class());
                phases.insert(f.phase);
                if let Target::Page(i) = f.target {
                    assert!(i < p.streams, "{p}");
                }
                match f.kind {
                    FaultKind::Stall { hold, long: false } => {
                        assert!(hold < d.peer_timeout.min(d.reply_timeout), "{p}")
                    }
                    FaultKind::Stall { hold, long: true } => {
                        assert!(hold > d.peer_timeout, "{p}")
                    }
                    FaultKind::SlowRestore { delay } => assert!(delay > d.reply_timeout),
                    _ => {}
                }
                if let Trigger::Round { round, .. } = f.trigger {
                    assert!(round < p.rounds, "{p}");
                }
            }
        }
        assert_eq!(classes.len(), Class::ALL.len());
        assert_eq!(phases.len(), 5);
    }
}
