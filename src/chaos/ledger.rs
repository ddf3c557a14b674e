//! Who runs the VM, at every instant: the source's `VmControl` pause/resume and
//! the destination's restore/discard (and death) mark running or stopped here,
//! and any instant at which both run is recorded.

use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Default)]
struct State {
    source_running: bool,
    dest_running: bool,
    dest_dead: bool,
    dest_took_vm: bool,
    both: Vec<String>,
    events: Vec<(u64, String)>,
}

/// The running state of the migrated VM on both sides.
#[derive(Debug)]
pub struct Ledger {
    start: Instant,
    state: Mutex<State>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    /// The source runs the VM; the destination does not.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            state: Mutex::new(State {
                source_running: true,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, s: &mut State, what: String) {
        let ms = self.start.elapsed().as_millis() as u64;
        s.events.push((ms, what.clone()));
        if s.source_running && s.dest_running {
            s.both.push(format!("{ms} ms: {what}"));
        }
    }

    /// The source VM stopped (`running` false) or runs again.
    pub fn source(&self, running: bool, why: &str) {
        let mut s = self.lock();
        s.source_running = running;
        let what = format!("source {} ({why})", if running { "runs" } else { "stops" });
        self.note(&mut s, what);
    }

    /// The destination took the VM (`running`) or dropped it. Ignored once the
    /// destination is dead: what a dead process does no longer runs anything.
    pub fn dest(&self, running: bool, why: &str) {
        let mut s = self.lock();
        if s.dest_dead {
            return;
        }
        s.dest_running = running;
        s.dest_took_vm |= running;
        let what = format!(
            "destination {} ({why})",
            if running { "runs" } else { "stops" }
        );
        self.note(&mut s, what);
    }

    /// The destination process died: whatever it ran stops.
    pub fn dest_killed(&self) {
        let mut s = self.lock();
        s.dest_running = false;
        s.dest_dead = true;
        self.note(&mut s, "destination killed".into());
    }

    /// A harness observation for the timeline.
    pub fn event(&self, what: String) {
        let mut s = self.lock();
        self.note(&mut s, what);
    }

    /// Whether the source runs the VM now.
    pub fn source_running(&self) -> bool {
        self.lock().source_running
    }

    /// Whether the destination runs the VM now.
    pub fn dest_running(&self) -> bool {
        self.lock().dest_running
    }

    /// Whether the destination ever ran the VM.
    pub fn dest_took_vm(&self) -> bool {
        self.lock().dest_took_vm
    }

    /// The instants at which both ran the VM (empty: never).
    pub fn both_running(&self) -> Vec<String> {
        self.lock().both.clone()
    }

    /// The timeline, one `"<ms> ms: <what>"` line per change.
    pub fn timeline(&self) -> Vec<String> {
        self.lock()
            .events
            .iter()
            .map(|(ms, w)| format!("{ms} ms: {w}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlap_is_recorded_and_a_dead_destination_runs_nothing() {
        let l = Ledger::new();
        l.source(false, "pause");
        l.dest(true, "restore");
        assert!(l.both_running().is_empty());
        l.source(true, "resume");
        assert_eq!(l.both_running().len(), 1, "{:?}", l.timeline());

        let l = Ledger::new();
        l.source(false, "pause");
        l.dest(true, "restore");
        l.dest_killed();
        l.dest(true, "zombie restore");
        l.source(true, "resume");
        assert!(l.both_running().is_empty(), "{:?}", l.timeline());
        assert!(l.dest_took_vm());
        assert!(!l.dest_running());
    }
}
