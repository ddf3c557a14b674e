//! `auto` mode: per-batch codec choice and stream count from measurements.
//!
//! Why over 600 lines: about 150 of them are the unit tests that drive the tuner
//! window by window; the mechanism itself is under 460.
//!
//! Mechanism and policy are split the same way as elsewhere: workers *report*
//! (bytes written and time blocked in writes, compression samples) and *obey* (the
//! current codec, whether they are active); the controller, ticked from the round
//! loop, *decides*:
//!
//! - **Link rate** `L`: when the workers spend more than half of their time blocked
//!   in `write` (back-pressure: the link is the bottleneck), `L` is the observed wire
//!   rate. Otherwise the link is only known to be at least the observed rate, and
//!   the earlier estimate (or, with none, twice the observed rate) is kept.
//! - **Compression speed and ratio** per codec, from samples: every 8th batch a worker
//!   copies, hashes and compresses up to 64 KiB of the batch's *non-zero* pages with
//!   lz4 or zstd (alternating), the same per-page work as the compress path. Zero
//!   pages are excluded because they cost nothing in any mode; all rates in the model
//!   are rates of non-zero payload. Probes cost CPU that raw sending needs, so once
//!   both codecs are measured and raw is predicted at least 1.5× faster than either,
//!   probing slows to every 64th batch: still enough to notice a content or link
//!   change within a round, at an eighth of the cost.
//! - **CPU headroom** `h`: the share of the machine's CPUs not used by *other*
//!   processes (from `/proc/stat` minus `/proc/self/stat`). Like Hyper-V, compression
//!   only uses idle CPU: when other work needs the cores, `h` falls and so does the
//!   predicted gain of compressing.
//!
//! Predicted guest throughput: raw = `L`; codec c = `min(k·h·S_c, L / r_c)` with `k`
//! workers (all of them: compressing is CPU-parallel, so choosing a codec activates
//! every worker), speed `S_c` and ratio `r_c`. The controller switches to the best
//! prediction when it beats the current one by 10 % (hysteresis).
//!
//! **Stream count**: the migration opens `max` streams; the controller activates 1,
//! then 2, … for one 60 ms window each during round 0, measuring guest bytes per
//! second. It keeps all `max` streams unless fewer were at least 30 % faster: one
//! 60 ms window on a shared machine is noisy (a 9 % dip of the 2-stream window once
//! pinned a whole uncapped migration to 1 stream at 60 % of the speed, and a 17 %
//! dip did the same at 10 Gbit/s), and more streams cost little. When the first window already shows writes blocking, the
//! exploration ends at once with all streams: a link-bound transfer gains nothing by
//! measuring further (on a long-latency link more streams help), and over loopback
//! one stream blocks because its single receiver thread is the bottleneck, which
//! more streams fix. Except with the destination on this host (a loopback peer):
//! both ends then share the CPUs, so once writes block at half the CPUs in streams
//! (`codec_policy::local_stream_cap`: one stream on two CPUs) exploration stops
//! there, since the receiving end is the bottleneck and more streams would only
//! time-share its CPUs.
//!
//! **Leaving raw** needs the link confirmed: writes blocked in two consecutive
//! windows. One blocked window proves little (the one-stream window above, a
//! start-up stall of the destination); acting on it once sent an uncapped loopback
//! migration to lz4 at a third of the raw speed, and compressing hides the link
//! rate, so such a mistake is not undone.
//!
//! **Probe schedule**: the first two batches probe lz4 and zstd, so both estimates
//! exist by the first decision; then every 8th batch (every 64th once raw clearly
//! wins, see above).
//!
//! The thresholds and decision rules live in [`super::codec_policy`]; this module
//! is the mechanism: counters the workers update, the probes, the windows, and
//! applying what the policy decides.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::codec_policy::{self as policy, CodecEstimate, CodecInputs, PROBE_EVERY, WINDOW};
use crate::codec::{CodecId, CodecSet};

/// Bytes compressed per probe.
pub const PROBE_BYTES: usize = 64 * 1024;

#[derive(Debug, Default, Clone, Copy)]
struct CodecStats {
    input: f64,
    output: f64,
    secs: f64,
}

impl CodecStats {
    fn speed(&self) -> Option<f64> {
        (self.secs > 0.0 && self.input > 0.0).then(|| self.input / self.secs)
    }
    fn ratio(&self) -> Option<f64> {
        (self.input > 0.0).then(|| (self.output / self.input).clamp(0.01, 1.2))
    }
    fn estimate(&self) -> Option<CodecEstimate> {
        Some(CodecEstimate {
            speed: self.speed()?,
            ratio: self.ratio()?,
        })
    }
}

#[derive(Debug)]
enum Phase {
    Exploring {
        count: usize,
        results: Vec<(usize, f64)>,
    },
    Settled,
}

#[derive(Debug)]
struct Controller {
    window_start: Instant,
    phase: Phase,
    cpu: CpuSampler,
    headroom: f64,
    link_est: Option<f64>,
    /// Consecutive windows in which writes blocked on the link (the link was the
    /// bottleneck; contention excluded, see [`policy::contended`]).
    saturated_streak: u32,
    /// Guest bytes and seconds of every raw window so far (the raw average).
    raw_sent: (f64, f64),
    /// Streams chosen by exploration (used while sending raw).
    raw_streams: usize,
    /// With the destination on this host: streams beyond this only time-share the
    /// CPUs when the receiving end is the bottleneck (`peer_on_this_host`).
    local_cap: Option<usize>,
    /// This host's CPUs (for the decision's message).
    cpus: usize,
    decisions: Vec<String>,
}

/// CPU time of the calling thread, seconds. Compression probes are timed with it:
/// a probe lasts ~0.1 ms, so one preemption (a 4 ms tick on 2 shared cores) would
/// inflate a wall-clock sample 40-fold and make compression look slow.
pub fn thread_cpu_secs() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Shared state of the auto tuner (also used, disabled, by fixed modes).
#[derive(Debug)]
pub struct AutoTuner {
    enabled: bool,
    max_workers: usize,
    active: AtomicUsize,
    codec: AtomicU8,
    write_ns: AtomicU64,
    wire_bytes: AtomicU64,
    guest_bytes: AtomicU64,
    batches: AtomicU64,
    probe_every: AtomicU64,
    probes: Mutex<[CodecStats; 2]>,
    ctl: Mutex<Controller>,
    settled: AtomicBool,
}

fn codec_from(v: u8) -> CodecId {
    CodecId::from_u8(v).unwrap_or(CodecId::Raw)
}

impl AutoTuner {
    /// A tuner for `max_workers` workers; `enabled` false = fixed `codec`, all active.
    pub fn new(enabled: bool, max_workers: usize, codec: CodecId) -> Self {
        Self {
            enabled,
            max_workers,
            active: AtomicUsize::new(if enabled { 1 } else { max_workers }),
            codec: AtomicU8::new(if enabled {
                CodecId::Raw as u8
            } else {
                codec as u8
            }),
            write_ns: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            guest_bytes: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            probe_every: AtomicU64::new(PROBE_EVERY),
            probes: Mutex::new([CodecStats::default(); 2]),
            ctl: Mutex::new(Controller {
                window_start: Instant::now(),
                phase: if enabled && max_workers > 1 {
                    Phase::Exploring {
                        count: 1,
                        results: Vec::new(),
                    }
                } else {
                    Phase::Settled
                },
                cpu: CpuSampler::new(),
                headroom: 1.0,
                link_est: None,
                saturated_streak: 0,
                raw_sent: (0.0, 0.0),
                raw_streams: max_workers,
                local_cap: None,
                cpus: 0,
                decisions: Vec::new(),
            }),
            settled: AtomicBool::new(!enabled || max_workers <= 1),
        }
    }

    /// The destination shares this host's `cpus` CPUs (a loopback peer). Call
    /// before the first batch. Then a window in which one more stream's writes
    /// blocked stops exploring at [`policy::local_stream_cap`] streams (see the
    /// module docs).
    pub fn peer_on_this_host(&mut self, cpus: usize) {
        if self.enabled {
            let c = self.ctl.get_mut().expect("ctl lock");
            c.local_cap = Some(policy::local_stream_cap(self.max_workers, cpus));
            c.cpus = cpus;
        }
    }

    /// Whether this tuner decides (auto mode) rather than holding a fixed codec.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Codec for the next batch.
    #[inline]
    pub fn codec(&self) -> CodecId {
        codec_from(self.codec.load(Ordering::Relaxed))
    }

    /// Should worker `index` take batches now?
    #[inline]
    pub fn is_active(&self, index: usize) -> bool {
        index < self.active.load(Ordering::Relaxed)
    }

    /// Active workers.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// A worker sent a batch: `wire` bytes for `guest` bytes of pages, `write` time in write calls.
    pub fn record(&self, wire: u64, guest: u64, write: Duration) {
        if !self.enabled {
            return;
        }
        self.wire_bytes.fetch_add(wire, Ordering::Relaxed);
        self.guest_bytes.fetch_add(guest, Ordering::Relaxed);
        self.write_ns
            .fetch_add(write.as_nanos() as u64, Ordering::Relaxed);
    }

    /// If this batch should carry a compression probe, the codec to probe with.
    pub fn probe_codec(&self) -> Option<CodecId> {
        if !self.enabled {
            return None;
        }
        let n = self.batches.fetch_add(1, Ordering::Relaxed);
        match n {
            0 => return Some(CodecId::Lz4),
            1 => return Some(CodecId::Zstd),
            _ => {}
        }
        let every = self.probe_every.load(Ordering::Relaxed).max(1);
        if !n.is_multiple_of(every) {
            return None;
        }
        Some(if (n / every).is_multiple_of(2) {
            CodecId::Lz4
        } else {
            CodecId::Zstd
        })
    }

    /// Compress `sample` with `codec` and record speed and ratio.
    /// `copy_secs` is the CPU time the sample took to copy out of guest memory and
    /// hash, which the compress path pays per page on top of compressing. Speeds are
    /// bytes per CPU second (see [`thread_cpu_secs`]).
    pub fn probe(
        &self,
        codecs: &mut CodecSet,
        codec: CodecId,
        sample: &[u8],
        out: &mut Vec<u8>,
        copy_secs: f64,
    ) {
        if sample.is_empty() {
            return;
        }
        let t = thread_cpu_secs();
        let ok = codecs.get(codec).encode(sample, out);
        let secs = (thread_cpu_secs() - t).max(0.0) + copy_secs;
        let produced = match ok {
            Ok(true) => out.len(),
            _ => sample.len(),
        };
        let i = if codec == CodecId::Lz4 { 0 } else { 1 };
        let mut p = self.probes.lock().expect("probe lock");
        // Exponential forgetting so the estimate follows content changes.
        let s = &mut p[i];
        s.input = s.input * 0.9 + sample.len() as f64;
        s.output = s.output * 0.9 + produced as f64;
        s.secs = s.secs * 0.9 + secs;
    }

    /// Decisions taken so far (for the report).
    pub fn decisions(&self) -> Vec<String> {
        self.ctl.lock().expect("ctl lock").decisions.clone()
    }

    /// Let the controller decide if a window has passed (called from the round loop).
    pub fn tick(&self) {
        if !self.enabled {
            return;
        }
        let mut c = self.ctl.lock().expect("ctl lock");
        if self.guest_bytes.load(Ordering::Relaxed) == 0 {
            // Nothing sent yet (start-up, a stall): a window starts with data, or
            // set-up time would read as an idle link.
            c.window_start = Instant::now();
            return;
        }
        let elapsed = c.window_start.elapsed();
        if elapsed < WINDOW {
            return;
        }
        let secs = elapsed.as_secs_f64();
        let wire = self.wire_bytes.swap(0, Ordering::Relaxed) as f64;
        let guest = self.guest_bytes.swap(0, Ordering::Relaxed) as f64;
        let write_s = self.write_ns.swap(0, Ordering::Relaxed) as f64 / 1e9;
        c.window_start = Instant::now();
        if let Some(h) = c.cpu.sample() {
            c.headroom = h;
        }
        let k = self.active() as f64;
        let guest_rate = guest / secs;
        // Writes block when the link is the bottleneck: then write time measures it.
        // When they mostly do not (CPU-bound, e.g. while compressing), the link is
        // only known to be at least the observed wire rate: keep the earlier estimate.
        let busy = if wire > 0.0 && write_s > 0.0 {
            write_s / (k.max(1.0) * secs)
        } else {
            0.0
        };
        let saturated = policy::saturated(busy);
        let raw = self.codec() == CodecId::Raw;
        let raw_average = (c.raw_sent.1 > 0.0).then(|| c.raw_sent.0 / c.raw_sent.1);
        let contended = raw && saturated && policy::contended(guest_rate, raw_average);
        if raw {
            c.raw_sent.0 += guest;
            c.raw_sent.1 += secs;
        }
        // Blocked by contention: neither confirms nor lowers the link.
        let link_bound = saturated && !contended;
        c.saturated_streak = if link_bound {
            c.saturated_streak + 1
        } else {
            0
        };
        // Stream-count exploration (raw, during the first windows).
        let (local_cap, cpus) = (c.local_cap, c.cpus);
        if let Phase::Exploring { count, results } = &mut c.phase {
            results.push((*count, guest_rate));
            let max = self.max_workers;
            let step = policy::explore_step(*count, max, saturated, local_cap);
            if step == policy::ExploreStep::MoreStreams {
                *count += 1;
                self.active.store(*count, Ordering::Relaxed);
                return;
            }
            let (pick, note) = if step == policy::ExploreStep::ReceiverBound {
                (
                    *count,
                    format!(
                        " (writes blocked, destination on this host: {cpus} CPUs shared by both ends)"
                    ),
                )
            } else {
                let note = if saturated && !results.iter().any(|r| r.0 == max) {
                    " (link saturated)"
                } else {
                    ""
                };
                (
                    policy::streams_after_exploring(results, max),
                    note.to_string(),
                )
            };
            let msg = format!(
                "streams: measured {}{note} → using {pick}",
                results
                    .iter()
                    .map(|(n, r)| format!("{n}:{:.2} GB/s", r / 1e9))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            c.decisions.push(msg);
            self.active.store(pick, Ordering::Relaxed);
            c.raw_streams = pick;
            c.phase = Phase::Settled;
            self.settled.store(true, Ordering::Relaxed);
            // This window ran with fewer streams than are now active: its rate says
            // nothing about the link the next windows will measure.
            return;
        }
        if wire <= 0.0 || write_s <= 0.0 {
            return;
        }
        let link = policy::link_rate(wire / secs, link_bound, c.link_est);
        c.link_est = Some(link);
        let probes = *self.probes.lock().expect("probe lock");
        let current = self.codec();
        let decision = policy::choose_codec(&CodecInputs {
            current,
            link,
            headroom: c.headroom,
            // Compression is CPU-parallel: it runs on every worker, whatever stream
            // count raw sending settled on (a capped link gives one stream as much
            // as two).
            workers: self.max_workers as f64,
            lz4: probes[0].estimate(),
            zstd: probes[1].estimate(),
            saturated_streak: c.saturated_streak,
        });
        self.probe_every
            .store(decision.probe_every, Ordering::Relaxed);
        if let Some((codec, predicted, current_est)) = decision.switch {
            self.codec.store(codec as u8, Ordering::Relaxed);
            let streams = if codec == CodecId::Raw {
                c.raw_streams
            } else {
                self.max_workers
            };
            self.active.store(streams, Ordering::Relaxed);
            let msg = format!(
                "codec {} → {}: link {:.2} GB/s, headroom {:.0} %, predicted {:.2} vs {:.2} GB/s",
                current.name(),
                codec.name(),
                link / 1e9,
                c.headroom * 100.0,
                predicted / 1e9,
                current_est / 1e9
            );
            if c.decisions.len() < 64 {
                c.decisions.push(msg);
            }
        }
    }
}

/// Samples CPU use of other processes: `/proc/stat` totals minus our own.
#[derive(Debug)]
struct CpuSampler {
    last: Option<(u64, u64, u64, Instant)>,
    ncpu: f64,
}

impl CpuSampler {
    fn new() -> Self {
        let ncpu = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        Self { last: None, ncpu }
    }

    fn read() -> Option<(u64, u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total: u64 = cpu.iter().sum();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        let me = std::fs::read_to_string("/proc/self/stat").ok()?;
        let rest = me.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the comm field: state is index 0, utime is 11, stime 12.
        let own = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((total, idle, own))
    }

    /// Headroom in [0.1, 1] when at least 200 ms passed since the last sample.
    fn sample(&mut self) -> Option<f64> {
        let now = Instant::now();
        if let Some((_, _, _, t)) = self.last {
            if now.duration_since(t) < Duration::from_millis(200) {
                return None;
            }
        }
        let (total, idle, own) = Self::read()?;
        let prev = self.last.replace((total, idle, own, now));
        let (t0, i0, o0, _) = prev?;
        let dt = total.saturating_sub(t0) as f64;
        if dt <= 0.0 {
            return None;
        }
        let busy = dt - idle.saturating_sub(i0) as f64;
        let others = (busy - own.saturating_sub(o0) as f64).max(0.0);
        // Fraction of all CPUs used by others → headroom per CPU.
        let _ = self.ncpu;
        Some((1.0 - others / dt).clamp(0.1, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::codec_policy::PROBE_EVERY_SETTLED;

    #[test]
    fn disabled_tuner_is_fixed() {
        let t = AutoTuner::new(false, 3, CodecId::Lz4);
        assert_eq!(t.codec(), CodecId::Lz4);
        assert!(t.is_active(2));
        assert!(t.probe_codec().is_none());
    }

    #[test]
    fn slow_link_and_compressible_data_pick_a_codec() {
        let t = AutoTuner::new(true, 1, CodecId::Raw);
        assert_eq!(t.codec(), CodecId::Raw);
        {
            let mut p = t.probes.lock().unwrap();
            p[0] = CodecStats {
                input: 1e9,
                output: 3e8,
                secs: 0.5,
            }; // lz4: 2 GB/s, ratio 0.3
            p[1] = CodecStats {
                input: 1e9,
                output: 2.5e8,
                secs: 1.5,
            }; // zstd: 0.67 GB/s, 0.25
        }
        // A 125 MB/s link: over a 1 s window the worker was blocked in writes for
        // 0.9 s and moved 125 MB. Twice: one blocked window does not confirm a link.
        t.record(125_000_000, 125_000_000, Duration::from_millis(900));
        t.ctl.lock().unwrap().window_start -= Duration::from_secs(1);
        t.tick();
        assert_eq!(t.codec(), CodecId::Raw, "{:?}", t.decisions());
        t.record(125_000_000, 125_000_000, Duration::from_millis(900));
        t.ctl.lock().unwrap().window_start -= Duration::from_secs(1);
        t.tick();
        assert_ne!(t.codec(), CodecId::Raw, "{:?}", t.decisions());
        assert_eq!(t.probe_every.load(Ordering::Relaxed), PROBE_EVERY);
        // A fast link (5 GB in 1 s, writes rarely block): raw wins again.
        t.record(5_000_000_000, 5_000_000_000, Duration::from_millis(100));
        t.ctl.lock().unwrap().window_start -= Duration::from_secs(1);
        t.tick();
        assert_eq!(t.codec(), CodecId::Raw, "{:?}", t.decisions());
        // Raw now won, but the switch happened in this window: probing stays dense
        // until a window confirms raw beats every codec by the margin.
        assert_eq!(t.probe_every.load(Ordering::Relaxed), PROBE_EVERY);
        t.record(5_000_000_000, 5_000_000_000, Duration::from_millis(100));
        t.ctl.lock().unwrap().window_start -= Duration::from_secs(1);
        t.tick();
        assert_eq!(t.probe_every.load(Ordering::Relaxed), PROBE_EVERY_SETTLED);
        // The first two batches always probe, one codec each.
        assert_eq!(t.probe_codec(), Some(CodecId::Lz4));
        assert_eq!(t.probe_codec(), Some(CodecId::Zstd));
        let probes = (0..PROBE_EVERY_SETTLED)
            .filter(|_| t.probe_codec().is_some())
            .count();
        assert_eq!(probes, 1, "one probe per {PROBE_EVERY_SETTLED} batches");
    }

    /// Feed one window: `guest` and `wire` bytes in 1 s, writes blocked `write_ms`.
    fn window(t: &AutoTuner, guest: u64, wire: u64, write_ms: u64) {
        t.record(wire, guest, Duration::from_millis(write_ms));
        t.ctl.lock().unwrap().window_start -= Duration::from_secs(1);
        t.tick();
    }

    fn compressible(t: &AutoTuner) {
        let mut p = t.probes.lock().unwrap();
        p[0] = CodecStats {
            input: 1e9,
            output: 3e8,
            secs: 0.5,
        };
        p[1] = CodecStats {
            input: 1e9,
            output: 2.5e8,
            secs: 1.5,
        };
    }

    #[test]
    fn a_destination_on_this_host_keeps_one_stream_when_its_writes_block() {
        // Two CPUs shared by both ends, one stream's writes blocked 90 %: the
        // receiving end is the bottleneck; a second stream would share its CPUs.
        let mut t = AutoTuner::new(true, 2, CodecId::Raw);
        t.peer_on_this_host(2);
        compressible(&t);
        window(&t, 125_000_000, 125_000_000, 900);
        assert_eq!(t.active(), 1, "{:?}", t.decisions());
        assert!(
            t.decisions()[0].contains("destination on this host"),
            "{:?}",
            t.decisions()
        );
        // A slow link (shaped here), confirmed by a second blocked window, makes
        // compressing win, and compressing still runs on every worker.
        window(&t, 125_000_000, 125_000_000, 900);
        assert_ne!(t.codec(), CodecId::Raw, "{:?}", t.decisions());
        assert_eq!(t.active(), 2);
        // Writes not blocked (the sending end is the bottleneck): explore on.
        let mut t = AutoTuner::new(true, 2, CodecId::Raw);
        t.peer_on_this_host(2);
        window(&t, 600_000_000, 600_000_000, 50);
        assert_eq!(t.active(), 2, "second window tries 2 streams");
        window(&t, 700_000_000, 700_000_000, 50);
        assert_eq!(t.active(), 2, "{:?}", t.decisions());
        // Eight CPUs: a blocked first window goes on to a second stream.
        let mut t = AutoTuner::new(true, 2, CodecId::Raw);
        t.peer_on_this_host(8);
        window(&t, 600_000_000, 600_000_000, 900);
        assert_eq!(t.active(), 2, "{:?}", t.decisions());
        // A fixed mode is never changed.
        let mut t = AutoTuner::new(false, 2, CodecId::Raw);
        t.peer_on_this_host(2);
        assert_eq!(t.active(), 2);
    }

    #[test]
    fn noisy_windows_do_not_pin_fewer_streams() {
        // CPU-bound (writes rarely block): 1 stream measured 9 % above 2 streams in
        // one noisy window. Not a 30 % win: keep both.
        let t = AutoTuner::new(true, 2, CodecId::Raw);
        assert_eq!(t.active(), 1);
        window(&t, 610_000_000, 610_000_000, 50);
        assert_eq!(t.active(), 2, "second window tries 2 streams");
        window(&t, 560_000_000, 560_000_000, 100);
        assert_eq!(t.active(), 2, "{:?}", t.decisions());
        // A clear win for fewer streams is still taken.
        let t = AutoTuner::new(true, 2, CodecId::Raw);
        window(&t, 1_000_000_000, 1_000_000_000, 50);
        window(&t, 500_000_000, 500_000_000, 100);
        assert_eq!(t.active(), 1, "{:?}", t.decisions());
    }

    #[test]
    fn a_saturated_first_window_ends_exploration_and_a_confirmed_link_compresses() {
        let t = AutoTuner::new(true, 2, CodecId::Raw);
        compressible(&t);
        // 125 MB/s, the one active worker blocked in writes 90 % of the window.
        window(&t, 125_000_000, 125_000_000, 900);
        assert_eq!(t.active(), 2, "{:?}", t.decisions());
        assert!(
            t.decisions()[0].contains("link saturated"),
            "{:?}",
            t.decisions()
        );
        assert_eq!(t.codec(), CodecId::Raw, "one blocked window is not proof");
        // Both workers blocked 90 % of the next window: the link is confirmed.
        window(&t, 125_000_000, 125_000_000, 1800);
        assert_ne!(t.codec(), CodecId::Raw, "{:?}", t.decisions());
    }

    #[test]
    fn blocked_windows_far_below_the_raw_rate_are_contention_and_keep_raw() {
        // Raw ran at 0.7 GB/s; then writes block at 0.25 GB/s (the receiver starved
        // of CPU on a loaded host): not a link to compress for.
        let t = AutoTuner::new(true, 2, CodecId::Raw);
        compressible(&t);
        window(&t, 700_000_000, 700_000_000, 100);
        window(&t, 700_000_000, 700_000_000, 100);
        for _ in 0..4 {
            window(&t, 250_000_000, 250_000_000, 1800);
        }
        assert_eq!(t.codec(), CodecId::Raw, "{:?}", t.decisions());
        // Once the slow rate has lasted long enough to be the average's own, the
        // link is believed and compression wins.
        for _ in 0..12 {
            window(&t, 250_000_000, 250_000_000, 1800);
        }
        assert_ne!(t.codec(), CodecId::Raw, "{:?}", t.decisions());
    }

    #[test]
    fn one_blocked_window_does_not_leave_raw() {
        // Loopback: one stream blocks (its receiver thread is the bottleneck), two
        // streams do not. Compression must not be chosen from the first window.
        let t = AutoTuner::new(true, 2, CodecId::Raw);
        compressible(&t);
        window(&t, 610_000_000, 430_000_000, 800);
        assert_eq!(t.active(), 2);
        window(&t, 2_000_000_000, 1_400_000_000, 300);
        window(&t, 2_000_000_000, 1_400_000_000, 300);
        assert_eq!(t.codec(), CodecId::Raw, "{:?}", t.decisions());
    }
}
