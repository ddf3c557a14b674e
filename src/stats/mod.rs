//! Progress events, per-round statistics and the final report.

pub mod estimator;
pub mod host_load;
pub mod progress;
pub mod rss;
pub mod sink;

use serde::Serialize;

/// Statistics of one finished round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundStats {
    /// Round number (0 = full copy).
    pub round: u32,
    /// Pages sent this round (zero pages included).
    pub pages: u64,
    /// Zero pages (sent as header bits only).
    pub zero_pages: u64,
    /// Bytes put on the wire this round (frames, headers included).
    pub wire_bytes: u64,
    /// Round duration in milliseconds.
    pub duration_ms: f64,
    /// Wire bandwidth this round (bytes/s).
    pub bandwidth_bps: f64,
    /// Pages found dirty at the end of the round (to send next).
    pub dirty_after: u64,
    /// Dirty rate measured over the round (pages/s).
    pub dirty_rate_pps: f64,
    /// Predicted downtime if we browned out now (ms).
    pub predicted_downtime_ms: f64,
    /// Throttle in force during the round (percent of guest CPU taken away).
    pub throttle_percent: u8,
    /// Writable working set: pages dirtied in this round and in the previous one.
    pub wws_pages: u64,
    /// Hot pages held back for the final round (counted in the prediction).
    pub deferred_pages: u64,
    /// Smoothed dirty rate (pages/s).
    pub ewma_dirty_rate_pps: f64,
    /// Smoothed bandwidth expected for the final round (bytes/s).
    pub ewma_bandwidth_bps: f64,
    /// Time the harvest after this round took (ms).
    pub harvest_ms: f64,
    /// Of the predicted downtime, the part that does not depend on the page count (ms).
    pub predicted_fixed_ms: f64,
    /// The prediction before its margin (ms); `predicted_downtime_ms` has the margin.
    pub predicted_downtime_raw_ms: f64,
    /// The margin on the time-dependent terms (see `stats::estimator`).
    pub prediction_margin: f64,
    /// This round's time ÷ the time the model predicted for it (0: no prediction,
    /// as for round 0 and rounds too small to judge).
    pub prediction_error: f64,
}

/// Where the downtime went. The parts from `pause_ms` to `commit_ms` run back to
/// back, each from the end of the one before: their sum is the downtime.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DowntimeBreakdown {
    /// Pausing the VM (the `VmControl::pause` call).
    pub pause_ms: f64,
    /// Final harvest, and with `verify=full` the rescan of memory (with the
    /// brownout's deadline armed).
    pub final_harvest_ms: f64,
    /// Telling the destination the brownout began, sending the final dirty pages
    /// and closing the page streams.
    pub final_pages_ms: f64,
    /// Saving and sending device state.
    pub device_state_ms: f64,
    /// Reading the source's running digest (µs-scale: it is kept up to date as
    /// pages are sent).
    pub digest_ms: f64,
    /// Commit round trip: destination verify + restore + reply (or, when the reply
    /// was lost, until the outcome was learned by query).
    pub commit_ms: f64,
    /// Of `commit_ms`, the destination's digest verification.
    pub dest_verify_ms: f64,
    /// Of `commit_ms`, the destination's device validation + restore.
    pub dest_restore_ms: f64,
    /// Of `commit_ms`, the source participants' `release` (between the
    /// destination's `Prepared` and the source's `Released`).
    pub release_ms: f64,
    /// Per destination participant: (id, restore ms), from the `Committed` reply.
    pub dest_participants: Vec<(String, f64)>,
    /// Device-state bytes.
    pub device_state_bytes: u64,
    /// Per participant: (id, save ms, bytes).
    pub participants: Vec<(String, f64, u64)>,
}

/// The result of a successful migration (source side).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationReport {
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Transport mode name.
    pub mode: String,
    /// Page streams.
    pub streams: u16,
    /// Tracker backend.
    pub tracker: String,
    /// Codec.
    pub codec: String,
    /// Page streams that sent raw guest pages with vmsplice + splice (no sender copy).
    pub spliced_streams: u16,
    /// For guest memory that is all image files: whether raw pages are copied out
    /// of the files with `pread` (`"copy"`: tmpfs in 4 KiB pages) or read through
    /// the mapping (`"mapping"`: other files, and with `--splice`, `--delta` or a
    /// fixed compressing mode); `null` for other memory. Under `auto`, compressed
    /// batches read the mapping either way.
    pub image_read: Option<crate::engine::ImageRead>,
    /// Rounds including the final one.
    pub rounds: u32,
    /// From start to commit (ms).
    pub total_ms: f64,
    /// From pause to commit acknowledged (ms).
    pub downtime_ms: f64,
    /// Predicted downtime at the moment of brownout, with its margin (ms): what
    /// the policy judged against the target.
    pub predicted_downtime_ms: f64,
    /// The same prediction before the margin (ms).
    pub predicted_downtime_raw_ms: f64,
    /// The margin applied to the time-dependent terms (final harvest, final pages):
    /// the model's worst recent error on this host, or its prior.
    pub prediction_margin: f64,
    /// Breakdown of the downtime.
    pub downtime_breakdown: DowntimeBreakdown,
    /// Bytes on the wire, all streams, headers included.
    pub bytes_on_wire: u64,
    /// Pages sent (all rounds, zero pages included).
    pub pages_sent: u64,
    /// Zero pages elided.
    pub zero_pages: u64,
    /// Pages sent as deltas against their previously sent version.
    pub delta_pages: u64,
    /// Bytes delta records saved against full-page records (before block codec).
    pub delta_bytes_saved: u64,
    /// Pages in the final (brownout) round.
    pub final_pages: u64,
    /// Guest bytes ÷ total time, GiB/s.
    pub guest_gib_per_s: f64,
    /// Wire bytes ÷ total time, Gbit/s.
    pub wire_gbit_per_s: f64,
    /// Wire bytes of the rounds ÷ the rounds' duration, Gbit/s: the transport's
    /// rate while pages flow, without setup (e.g. the destination committing its
    /// memory) and the brownout's fixed costs.
    pub transfer_wire_gbit_per_s: f64,
    /// True when the policy chose brownout because the target was met.
    pub converged: bool,
    /// True when the destination's digest matched.
    pub verified: bool,
    /// Verification mode.
    pub verify: String,
    /// Pages that the full verification found changed but not reported by the tracker.
    pub tracker_misses: u64,
    /// Highest throttle applied (percent).
    pub throttle_max_percent: u8,
    /// Why brownout began.
    pub brownout_reason: String,
    /// The memory digest both sides agreed on (32 hex digits).
    pub digest: String,
    /// Per-round table.
    pub round_table: Vec<RoundStats>,
    /// What `auto` mode decided, and why (empty in fixed modes).
    pub auto_decisions: Vec<String>,
    /// The migration's session id (what `livemig resolve --session` takes).
    pub session: String,
    /// The `Committed` answer was lost and the outcome was learned by asking the
    /// destination afterwards (see docs/PROTOCOL.md, "Commit and ownership").
    pub resolved_by_query: bool,
    /// Clean pages the sampled audit re-hashed during the rounds.
    pub audit_pages_checked: u64,
    /// Pages the sampled audit found stale that no later harvest reported: writes
    /// the tracker missed (each was re-sent).
    pub audit_misses: u64,
    /// Time the sampled audit took, all rounds (ms; between rounds, so it adds to
    /// the total time).
    pub audit_ms: f64,
    /// The tracker was replaced by a safe one (∪ hash scan against what was sent)
    /// after the sampled audit caught a miss.
    pub tracker_fallback: bool,
    /// The audit of the paused source after switchover (`None` when turned off).
    pub post_audit: Option<PostAudit>,
    /// The connection broke during the rounds and the migration went on from
    /// where it was (see docs/PROTOCOL.md, "Resumption").
    pub resumed: bool,
    /// Successful reconnections after a lost connection: resumptions of the
    /// rounds, and setups started over (`setup_restarts`).
    pub reconnects: u32,
    /// Of `reconnects`, those that started the setup over because the
    /// connection broke before round 0 (see docs/PROTOCOL.md, "Setup restart").
    pub setup_restarts: u32,
    /// Pages sent again because a broken connection lost them: pages written
    /// whole to a stream before the break that the destination did not hold when
    /// the session resumed (pages still queued, or in a batch cut mid-write, are
    /// sent for the first time, not again).
    pub resent_pages: u64,
}

/// The full audit of the paused source's memory against what was sent, run after
/// the destination committed (outside the downtime).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostAudit {
    /// Pages checked (all of guest memory).
    pub pages: u64,
    /// Pages whose content differs from what the destination holds.
    pub mismatches: u64,
    /// Time the audit took (ms).
    pub ms: f64,
}

/// A progress event.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Setup accepted, round 0 begins.
    Started {
        /// Pages in guest memory.
        pages: u64,
        /// Page streams.
        streams: u16,
        /// The migration's session id (as in [`MigrationReport::session`]).
        session: String,
    },
    /// Some batches of a round were sent (for progress bars). See [`progress`]
    /// for the definition of `fraction`.
    Progress {
        /// Round.
        round: u32,
        /// Pages sent so far in the round.
        sent: u64,
        /// Pages the round will send.
        total: u64,
        /// Pages sent so far, all rounds.
        sent_total: u64,
        /// Pages still owed to the destination (estimate).
        remaining: u64,
        /// Monotone progress in 0..=1.
        fraction: f64,
        /// Bytes put on the wire so far, all rounds (frames, headers included).
        /// Two events give the live transfer rate: Δ`wire_bytes` ÷ Δ`elapsed_ms`.
        wire_bytes: u64,
        /// Time since the migration started (ms).
        elapsed_ms: f64,
    },
    /// A round finished.
    RoundFinished(RoundStats),
    /// Throttle changed.
    Throttled {
        /// New percent.
        percent: u8,
    },
    /// Brownout began (VM paused).
    Brownout {
        /// Final round number.
        round: u32,
        /// Pages left to send.
        pages: u64,
        /// Predicted downtime (ms).
        predicted_downtime_ms: f64,
        /// Why.
        reason: String,
    },
    /// Device state sent.
    DeviceState {
        /// Participants.
        participants: usize,
        /// Bytes.
        bytes: u64,
    },
    /// Success.
    Completed(Box<MigrationReport>),
    /// Failure; the source VM keeps running.
    Failed {
        /// Phase.
        phase: String,
        /// Error.
        error: String,
        /// Whether the source VM was resumed / is running.
        source_running: bool,
    },
    /// The sampled audit caught writes the tracker missed (a tracker defect). The
    /// pages were re-sent; the migration goes on with a safe tracker.
    TrackerMiss {
        /// Round after which the miss was confirmed.
        round: u32,
        /// Pages missed.
        pages: u64,
        /// Their guest frame numbers (at most 16).
        gfns: Vec<u64>,
        /// The tracker used from now on (empty if already fallen back).
        fallback: String,
    },
    /// The audit of the paused source after switchover finished.
    PostAudit(PostAudit),
    /// The connection broke before `Commit`; the source is reconnecting, to
    /// resume the rounds or to start the setup over.
    Reconnecting {
        /// Where it broke: `setup` (before round 0; the setup starts over with
        /// the same session token) or `rounds` (the session resumes).
        phase: String,
        /// Round in progress when it broke (0 during setup).
        round: u32,
        /// Why it broke.
        error: String,
    },
    /// The session resumed on a new connection.
    Resumed {
        /// The round the migration goes on with (a fresh number).
        round: u32,
        /// Connection attempts it took.
        attempts: u32,
        /// Pages of the rounds in flight the destination already held.
        held_pages: u64,
        /// Pages sent again because the destination did not hold them.
        resent_pages: u64,
    },
    /// Before the pause, the source waited for the destination to apply every
    /// round sent (`Drain`); the policy then decided again.
    Drained {
        /// The last round sent.
        round: u32,
        /// Whether the destination had applied it all when it answered.
        applied: bool,
        /// How long the source waited for the answer, in milliseconds.
        waited_ms: f64,
        /// Pages the VM is expected to have dirtied meanwhile (the model's dirty
        /// rate × the wait); the next harvest collects the real ones.
        expected_dirty_pages: u64,
    },
}

/// Receives events (called from the migration thread; keep it fast).
pub trait ProgressSink: Send + Sync {
    /// One event.
    fn on_event(&self, event: &Event);
}

impl<F: Fn(&Event) + Send + Sync> ProgressSink for F {
    fn on_event(&self, event: &Event) {
        self(event)
    }
}
