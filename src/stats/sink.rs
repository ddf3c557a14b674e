//! Ready-made progress sinks.

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::{Event, ProgressSink};

/// Writes every event as one JSON object per line (`--events FILE`).
#[derive(Debug)]
pub struct JsonLinesSink<W: Write + Send> {
    out: Mutex<W>,
}

impl<W: Write + Send> JsonLinesSink<W> {
    /// Sink writing to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out: Mutex::new(out),
        }
    }
    /// Flush buffered lines.
    pub fn flush(&self) -> std::io::Result<()> {
        self.out.lock().expect("sink lock").flush()
    }
}

impl<W: Write + Send> ProgressSink for JsonLinesSink<W> {
    fn on_event(&self, event: &Event) {
        let mut out = self.out.lock().expect("sink lock");
        if let Ok(line) = serde_json::to_string(event) {
            // A full disk must not fail the migration: events are advisory.
            let _ = writeln!(out, "{line}");
        }
        if matches!(event, Event::Completed(_) | Event::Failed { .. }) {
            let _ = out.flush();
        }
    }
}

/// Forwards every event to several sinks in order.
#[derive(Clone, Default)]
pub struct Tee(pub Vec<Arc<dyn ProgressSink>>);

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tee({} sinks)", self.0.len())
    }
}

impl ProgressSink for Tee {
    fn on_event(&self, event: &Event) {
        for s in &self.0 {
            s.on_event(event);
        }
    }
}

/// Collects events in memory (tests, embedding).
#[derive(Debug, Default)]
pub struct Collect(pub Mutex<Vec<Event>>);

impl Collect {
    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().expect("collect lock").clone()
    }
}

impl ProgressSink for Collect {
    fn on_event(&self, event: &Event) {
        self.0.lock().expect("collect lock").push(event.clone());
    }
}

/// Turns every event into a `tracing` event inside one `migration` span that
/// carries the session id (recorded when [`Event::Started`] names it).
///
/// Levels: `Progress` at TRACE; `DeviceState` at DEBUG; `Started`, `RoundFinished`,
/// `Throttled`, `Brownout`, `Reconnecting`, `Resumed`, `PostAudit` without
/// mismatches and `Completed` at INFO; `TrackerMiss` at WARN; `Failed` at WARN
/// while the source VM runs and at ERROR when it does not (in doubt, or not
/// resumed), like a `PostAudit` that found stale pages. The library prints
/// nothing itself: what is shown depends on the subscriber the embedder installs.
///
/// ```
/// use std::sync::Arc;
/// use livemig::stats::sink::TracingSink;
/// let memory = Arc::new(livemig::GuestMemory::anonymous(1 << 20, false).unwrap());
/// let migration = livemig::engine::Migration::new(memory)
///     .progress(Arc::new(TracingSink::new()));
/// # drop(migration);
/// ```
#[derive(Debug)]
pub struct TracingSink {
    span: tracing::Span,
}

impl TracingSink {
    /// A sink whose `migration` span is a child of the current span.
    pub fn new() -> Self {
        Self {
            span: tracing::info_span!("migration", session = tracing::field::Empty),
        }
    }
    /// The span the events go to (to run other work inside it).
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}

impl Default for TracingSink {
    fn default() -> Self {
        Self::new()
    }
}

impl ProgressSink for TracingSink {
    fn on_event(&self, event: &Event) {
        let span = &self.span;
        match event {
            Event::Started {
                pages,
                streams,
                session,
            } => {
                span.record("session", tracing::field::display(session));
                tracing::info!(parent: span, pages, streams, "migration started");
            }
            Event::Progress {
                round,
                sent,
                total,
                wire_bytes,
                elapsed_ms,
                ..
            } => {
                tracing::trace!(parent: span, round, sent, total, wire_bytes, elapsed_ms, "progress")
            }
            Event::RoundFinished(r) => tracing::info!(
                parent: span,
                round = r.round,
                pages = r.pages,
                duration_ms = r.duration_ms,
                dirty_after = r.dirty_after,
                predicted_downtime_ms = r.predicted_downtime_ms,
                "round finished"
            ),
            Event::Throttled { percent } => {
                tracing::info!(parent: span, percent, "guest throttled")
            }
            Event::Brownout {
                round,
                pages,
                predicted_downtime_ms,
                reason,
            } => tracing::info!(
                parent: span,
                round,
                pages,
                predicted_downtime_ms,
                reason = reason.as_str(),
                "brownout: VM paused"
            ),
            Event::DeviceState {
                participants,
                bytes,
            } => tracing::debug!(parent: span, participants, bytes, "device state sent"),
            Event::Completed(r) => tracing::info!(
                parent: span,
                session = r.session.as_str(),
                rounds = r.rounds,
                total_ms = r.total_ms,
                downtime_ms = r.downtime_ms,
                verified = r.verified,
                "migration committed"
            ),
            Event::Failed {
                phase,
                error,
                source_running: true,
            } => tracing::warn!(
                parent: span,
                phase = phase.as_str(),
                error = error.as_str(),
                source_running = true,
                "migration failed"
            ),
            Event::Failed {
                phase,
                error,
                source_running: false,
            } => tracing::error!(
                parent: span,
                phase = phase.as_str(),
                error = error.as_str(),
                source_running = false,
                "migration failed"
            ),
            Event::TrackerMiss {
                round,
                pages,
                fallback,
                ..
            } => tracing::warn!(
                parent: span,
                round,
                pages,
                fallback = fallback.as_str(),
                "tracker missed writes; pages re-sent"
            ),
            Event::PostAudit(a) if a.mismatches == 0 => tracing::info!(
                parent: span,
                pages = a.pages,
                ms = a.ms,
                "post-switchover audit clean"
            ),
            Event::PostAudit(a) => tracing::error!(
                parent: span,
                pages = a.pages,
                mismatches = a.mismatches,
                "post-switchover audit found stale pages"
            ),
            Event::Reconnecting {
                phase,
                round,
                error,
            } => tracing::info!(
                parent: span,
                phase = phase.as_str(),
                round,
                error = error.as_str(),
                "connection broke; reconnecting"
            ),
            Event::Resumed {
                round,
                attempts,
                held_pages,
                resent_pages,
            } => tracing::info!(
                parent: span,
                round,
                attempts,
                held_pages,
                resent_pages,
                "session resumed"
            ),
            Event::Drained {
                round,
                applied,
                waited_ms,
                expected_dirty_pages,
            } => tracing::debug!(
                parent: span,
                round,
                applied,
                waited_ms,
                expected_dirty_pages,
                "destination drained before the pause"
            ),
        }
    }
}

/// Record a receive's outcome in `span` (a `receive` span with an empty `session`
/// field, see [`receive_span`]): the session id and an INFO event on success, a
/// WARN event naming the error on failure (the destination discarded the VM).
pub fn trace_receive_outcome(
    span: &tracing::Span,
    result: &Result<crate::receiver::Received, crate::receiver::ReceiveError>,
) {
    match result {
        Ok(r) => {
            span.record("session", tracing::field::display(&r.report.session));
            tracing::info!(
                parent: span,
                rounds = r.report.rounds,
                pages_applied = r.report.pages_applied,
                verified = r.report.verified,
                total_ms = r.report.total_ms,
                "migration received and committed"
            );
        }
        Err(e) => {
            tracing::warn!(parent: span, error = %e, "receive failed; the incoming VM was discarded")
        }
    }
}

/// A `receive` span whose `session` field [`trace_receive_outcome`] fills in.
pub fn receive_span() -> tracing::Span {
    tracing::info_span!("receive", session = tracing::field::Empty)
}
