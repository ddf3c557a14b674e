//! The codec policy of `auto` mode: the decision rules and their thresholds,
//! apart from the mechanism that measures and obeys (`engine::auto::AutoTuner`).
//!
//! The tuner hands this module plain measurements (a window's rates and write
//! time, the probes' compression speed and ratio, the CPU headroom) and gets back
//! decisions: how many streams to keep, what the link delivers, which codec to send
//! with and how often to probe. Nothing here touches atomics, clocks or threads, so
//! each rule is a function a test can call with numbers. The reasoning behind each
//! threshold is in the `engine::auto` module docs (src/engine/auto.rs).

use crate::codec::CodecId;

/// Length of one measurement window.
pub const WINDOW: std::time::Duration = std::time::Duration::from_millis(60);
/// Fewer streams than the maximum must beat it by this factor to be kept (one
/// 60 ms window on a shared machine is noisy; more streams cost little).
pub const FEWER_STREAMS_MARGIN: f64 = 1.3;
/// Probe spacing (in batches) while the decision is open.
pub const PROBE_EVERY: u64 = 8;
/// Probe spacing once raw clearly wins.
pub const PROBE_EVERY_SETTLED: u64 = 64;
/// Raw "clearly wins" when predicted this many times faster than every codec.
pub const CLEAR_MARGIN: f64 = 1.5;
/// A codec replaces the current one only when predicted this much faster
/// (hysteresis).
pub const SWITCH_MARGIN: f64 = 1.10;
/// Share of the workers' time blocked in `write` above which the link is the
/// bottleneck (the window is *saturated*).
pub const SATURATED_BUSY: f64 = 0.5;
/// Consecutive saturated windows that confirm the link before raw is left.
pub const CONFIRM_WINDOWS: u32 = 2;

/// Whether a window was link-bound: `busy` is the share of the active workers'
/// time spent blocked in writes.
pub fn saturated(busy: f64) -> bool {
    busy > SATURATED_BUSY
}

/// A raw window this many times slower than the migration's raw average so far
/// is taken for contention, not for the link.
pub const CONTENTION_MARGIN: f64 = 1.3;

/// Whether a blocked raw window measured contention rather than the link: its
/// rate is below the raw average of this migration so far by more than
/// [`CONTENTION_MARGIN`]. Writes also block when the receiver (or the sender's
/// own workers) is starved of CPU by other processes; taking that for a slow link
/// makes `auto` compress, which spends more of the CPU that was the bottleneck
/// (measured: 0.21–0.28 GB/s of "link" a second after 0.46–0.96 GB/s raw, on a
/// loaded host; lz4 then ran at 0.3× raw). A real link does not slow by a third
/// within seconds; a busy neighbour does. The average includes the start's burst
/// into empty socket buffers, so on a slow link the first windows are discounted
/// too, until the average settles near the link rate (a few windows).
pub fn contended(window_rate: f64, raw_average: Option<f64>) -> bool {
    raw_average.is_some_and(|avg| window_rate * CONTENTION_MARGIN < avg)
}

/// With the destination on this host (a loopback peer), the stream count at
/// which exploration stops once writes block. Both ends then share the CPUs, each
/// stream one sending and one receiving thread, and blocked writes say the
/// receiving end is the bottleneck: past half the CPUs another stream only
/// time-shares them. Measured on the project's 2-CPU machine, `bench --memory 2G
/// --dirty-rate 0` on a guest backed by huge pages (writes blocked): one stream
/// 241–293 ms, two 325–345 ms (medians of 3 and 5, three sittings), and `auto`,
/// which kept two, 343 ms. One 60 ms window cannot tell such a difference from
/// noise reliably (see [`FEWER_STREAMS_MARGIN`]). Where the sending end is the
/// bottleneck, writes do not block and exploration goes on: `send` of a
/// file-backed image into `recv` on the same machine ran at 5.8 GiB/s with two
/// streams and 4.2–4.8 with one.
pub fn local_stream_cap(max: usize, cpus: usize) -> usize {
    (cpus / 2).clamp(1, max.max(1))
}

/// What stream-count exploration does after a window measured with `count`
/// streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExploreStep {
    /// Measure the next window with one more stream.
    MoreStreams,
    /// Stop and keep `count` streams: writes blocked with the destination on this
    /// host at [`local_stream_cap`] streams (its receiving end is the bottleneck).
    ReceiverBound,
    /// Stop and keep what [`streams_after_exploring`] picks.
    Done,
}

/// The next exploration step. `saturated`: the window's writes blocked;
/// `local_cap`: [`local_stream_cap`] when the destination is on this host. A
/// blocked window ends exploring with a remote destination (the link is the
/// limit), but not with a local one below its cap (another receiving thread may
/// use an idle CPU).
pub fn explore_step(
    count: usize,
    max: usize,
    saturated: bool,
    local_cap: Option<usize>,
) -> ExploreStep {
    if saturated && local_cap.is_some_and(|cap| count >= cap) {
        ExploreStep::ReceiverBound
    } else if count < max && (!saturated || local_cap.is_some()) {
        ExploreStep::MoreStreams
    } else {
        ExploreStep::Done
    }
}

/// The stream count to keep after exploring: `results` holds (streams, guest
/// bytes/s) per window. All `max` streams unless fewer were clearly faster; `max`
/// too when exploration stopped early (saturated) before measuring `max`.
pub fn streams_after_exploring(results: &[(usize, f64)], max: usize) -> usize {
    match results.iter().find(|r| r.0 == max).map(|r| r.1) {
        Some(full) => results
            .iter()
            .filter(|r| r.1 >= full * FEWER_STREAMS_MARGIN)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(max, |r| r.0),
        None => max,
    }
}

/// The link rate (bytes/s): what was observed when saturated; otherwise at least
/// that, keeping an earlier higher estimate (with none, twice the observed rate:
/// the link is assumed not to be the bottleneck).
pub fn link_rate(observed: f64, saturated: bool, earlier: Option<f64>) -> f64 {
    if saturated {
        observed
    } else {
        earlier.map_or(observed * 2.0, |l| l.max(observed))
    }
}

/// A codec's measured speed (input bytes per CPU second) and ratio (output ÷ input).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecEstimate {
    /// Bytes compressed per CPU second (copy and hash included).
    pub speed: f64,
    /// Output bytes per input byte.
    pub ratio: f64,
}

/// Predicted guest throughput of sending with a codec: limited by `workers` ×
/// `headroom` × speed (CPU) and by link ÷ ratio (wire).
pub fn codec_rate(e: CodecEstimate, workers: f64, headroom: f64, link: f64) -> f64 {
    (workers * headroom * e.speed).min(link / e.ratio)
}

/// What the tuner knows at the end of a window.
#[derive(Debug, Clone, Copy)]
pub struct CodecInputs {
    /// The codec in use.
    pub current: CodecId,
    /// Link rate (bytes/s), from [`link_rate`].
    pub link: f64,
    /// Share of the CPUs not used by other processes, in [0.1, 1].
    pub headroom: f64,
    /// Workers that compress when a codec is chosen (all of them).
    pub workers: f64,
    /// lz4's estimate, once probed.
    pub lz4: Option<CodecEstimate>,
    /// zstd's estimate, once probed.
    pub zstd: Option<CodecEstimate>,
    /// Consecutive saturated windows, this one included.
    pub saturated_streak: u32,
}

/// What the policy decided for the next window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecDecision {
    /// Switch to this codec: (codec, its predicted rate, the current one's).
    pub switch: Option<(CodecId, f64, f64)>,
    /// Probe every this many batches.
    pub probe_every: u64,
}

/// Choose the codec: the best predicted rate wins when it beats the current one by
/// [`SWITCH_MARGIN`]; raw is left only once the link is confirmed by
/// [`CONFIRM_WINDOWS`] saturated windows. Probing thins out to
/// [`PROBE_EVERY_SETTLED`] while raw beats both measured codecs by [`CLEAR_MARGIN`].
pub fn choose_codec(i: &CodecInputs) -> CodecDecision {
    let rate = |e: CodecEstimate| codec_rate(e, i.workers, i.headroom, i.link);
    let mut best = (CodecId::Raw, i.link);
    for (id, est) in [(CodecId::Lz4, i.lz4), (CodecId::Zstd, i.zstd)] {
        if let Some(r) = est.map(rate) {
            if r > best.1 {
                best = (id, r);
            }
        }
    }
    // Both codecs measured: the better of them; otherwise keep probing densely.
    let best_codec = match (i.lz4, i.zstd) {
        (Some(a), Some(b)) => Some(rate(a).max(rate(b)).max(0.0)),
        _ => None,
    };
    let raw_clearly_wins =
        i.current == CodecId::Raw && best_codec.is_some_and(|b| i.link >= CLEAR_MARGIN * b);
    let current_rate = match i.current {
        CodecId::Raw => i.link,
        CodecId::Lz4 => i.lz4.map_or(i.link, rate),
        CodecId::Zstd => i.zstd.map_or(i.link, rate),
    };
    let confirmed_link = i.saturated_streak >= CONFIRM_WINDOWS;
    let switch = (best.0 != i.current
        && best.1 > current_rate * SWITCH_MARGIN
        && (i.current != CodecId::Raw || confirmed_link))
        .then_some((best.0, best.1, current_rate));
    CodecDecision {
        switch,
        probe_every: if raw_clearly_wins {
            PROBE_EVERY_SETTLED
        } else {
            PROBE_EVERY
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LZ4: CodecEstimate = CodecEstimate {
        speed: 2e9,
        ratio: 0.3,
    };
    const ZSTD: CodecEstimate = CodecEstimate {
        speed: 0.67e9,
        ratio: 0.25,
    };

    fn inputs(current: CodecId, link: f64, streak: u32) -> CodecInputs {
        CodecInputs {
            current,
            link,
            headroom: 1.0,
            workers: 1.0,
            lz4: Some(LZ4),
            zstd: Some(ZSTD),
            saturated_streak: streak,
        }
    }

    #[test]
    fn a_window_far_below_the_raw_average_is_contention_not_the_link() {
        assert!(!contended(0.25e9, None), "no raw average yet");
        assert!(contended(0.25e9, Some(0.7e9)), "a third of the raw rate");
        assert!(!contended(0.6e9, Some(0.7e9)), "within the margin");
        assert!(
            !contended(0.7e9 / CONTENTION_MARGIN, Some(0.7e9)),
            "at the margin"
        );
    }

    #[test]
    fn a_slow_confirmed_link_compresses_and_an_unconfirmed_one_does_not() {
        let d = choose_codec(&inputs(CodecId::Raw, 125e6, 1));
        assert_eq!(d.switch, None, "one saturated window is not proof");
        let d = choose_codec(&inputs(CodecId::Raw, 125e6, CONFIRM_WINDOWS));
        let (codec, rate, current) = d.switch.expect("compressing wins on 125 MB/s");
        assert_ne!(codec, CodecId::Raw);
        assert!(rate > current * SWITCH_MARGIN);
        assert_eq!(d.probe_every, PROBE_EVERY);
    }

    #[test]
    fn a_fast_link_goes_back_to_raw_and_probes_rarely_once_raw_clearly_wins() {
        let d = choose_codec(&inputs(CodecId::Lz4, 5e9, 0));
        assert_eq!(d.switch.map(|s| s.0), Some(CodecId::Raw));
        assert_eq!(
            d.probe_every, PROBE_EVERY,
            "not settled in the switching window"
        );
        let d = choose_codec(&inputs(CodecId::Raw, 5e9, 0));
        assert_eq!(d.switch, None);
        assert_eq!(d.probe_every, PROBE_EVERY_SETTLED);
        // Unmeasured codecs keep probing dense.
        let mut i = inputs(CodecId::Raw, 5e9, 0);
        i.zstd = None;
        assert_eq!(choose_codec(&i).probe_every, PROBE_EVERY);
    }

    #[test]
    fn a_destination_on_this_host_stops_at_half_the_cpus() {
        assert_eq!(local_stream_cap(2, 2), 1);
        assert_eq!(local_stream_cap(4, 8), 4);
        assert_eq!(local_stream_cap(8, 8), 4);
        assert_eq!(local_stream_cap(2, 1), 1);
        assert_eq!(local_stream_cap(1, 64), 1);
    }

    #[test]
    fn exploring_steps() {
        use ExploreStep::*;
        // Remote destination: a blocked window ends it; otherwise on to `max`.
        assert_eq!(explore_step(1, 2, true, None), Done);
        assert_eq!(explore_step(1, 2, false, None), MoreStreams);
        assert_eq!(explore_step(2, 2, false, None), Done);
        // On this host with two CPUs (cap 1): blocked at one stream keeps one.
        assert_eq!(explore_step(1, 2, true, Some(1)), ReceiverBound);
        assert_eq!(explore_step(1, 2, false, Some(1)), MoreStreams);
        // Eight CPUs (cap 4): blocked below the cap goes on, at the cap stops.
        assert_eq!(explore_step(1, 8, true, Some(4)), MoreStreams);
        assert_eq!(explore_step(4, 8, true, Some(4)), ReceiverBound);
        assert_eq!(explore_step(8, 8, false, Some(4)), Done);
    }

    #[test]
    fn fewer_streams_only_when_clearly_faster() {
        assert_eq!(streams_after_exploring(&[(1, 610e6), (2, 560e6)], 2), 2);
        assert_eq!(streams_after_exploring(&[(1, 1e9), (2, 5e8)], 2), 1);
        assert_eq!(
            streams_after_exploring(&[(1, 1e9)], 2),
            2,
            "saturated early"
        );
    }

    #[test]
    fn the_link_is_what_a_saturated_window_shows_and_at_least_that_otherwise() {
        assert_eq!(link_rate(1e9, true, Some(5e9)), 1e9);
        assert_eq!(link_rate(1e9, false, Some(5e9)), 5e9);
        assert_eq!(link_rate(1e9, false, Some(5e8)), 1e9);
        assert_eq!(link_rate(1e9, false, None), 2e9);
    }
}
