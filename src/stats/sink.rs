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
