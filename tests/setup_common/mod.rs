//! Fixtures shared by the setup-stage, switch-port and envelope tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use livemig::engine::{Migration, MigrationError, VmControl};
use livemig::receiver::{ReceiveError, Received, Receiver};
use livemig::stats::{Event, MigrationReport};
use livemig::workload::{self, Content};
use livemig::GuestMemory;

/// A filled guest of `mib` MiB.
pub fn guest(mib: usize) -> Arc<GuestMemory> {
    let m = Arc::new(GuestMemory::anonymous(mib << 20, false).expect("guest memory"));
    workload::fill(&m, Content::Mix, 11, 2).expect("fill");
    m
}

/// The source VM's observable run state.
#[derive(Debug, Default)]
pub struct VmState {
    pub paused: AtomicBool,
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
}

impl VmState {
    /// Running now and never paused.
    pub fn never_paused(&self) -> bool {
        !self.paused.load(Ordering::SeqCst) && self.pauses.load(Ordering::SeqCst) == 0
    }
    /// Running now (paused at most transiently and resumed).
    pub fn running(&self) -> bool {
        !self.paused.load(Ordering::SeqCst)
    }
}

/// A model source VM recording pause/resume.
pub struct ModelVm(pub Arc<VmState>);

impl VmControl for ModelVm {
    fn pause(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.0.paused.store(true, Ordering::SeqCst);
        self.0.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.0.paused.store(false, Ordering::SeqCst);
        self.0.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn throttle(&mut self, _percent: u8) -> Result<(), livemig::engine::VmControlError> {
        Ok(())
    }
}

/// Counts pre-copy progress: a refusal at setup must leave all of these at zero.
#[derive(Debug, Default)]
pub struct Counter {
    pub started: AtomicU64,
    pub rounds: AtomicU64,
    pub pages: AtomicU64,
}

impl Counter {
    /// No round started and no page sent.
    pub fn nothing_sent(&self) -> bool {
        self.started.load(Ordering::SeqCst) == 0
            && self.rounds.load(Ordering::SeqCst) == 0
            && self.pages.load(Ordering::SeqCst) == 0
    }
}

impl livemig::stats::ProgressSink for Counter {
    fn on_event(&self, e: &Event) {
        match e {
            Event::Started { .. } => {
                self.started.fetch_add(1, Ordering::SeqCst);
            }
            Event::RoundFinished(r) => {
                self.rounds.fetch_add(1, Ordering::SeqCst);
                self.pages.fetch_add(r.pages, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

/// A migration source with a model VM and a counter attached.
pub fn source(mem: Arc<GuestMemory>) -> (Migration, Arc<VmState>, Arc<Counter>) {
    let vm = Arc::new(VmState::default());
    let counter = Arc::new(Counter::default());
    let m = Migration::new(mem)
        .vm_control(Box::new(ModelVm(vm.clone())))
        .progress(counter.clone());
    (m, vm, counter)
}

/// Run `m` against `r` over the in-memory transport.
pub fn migrate(
    m: Migration,
    r: Receiver,
) -> (
    Result<MigrationReport, MigrationError>,
    Result<Received, ReceiveError>,
) {
    let (connector, acceptor) = livemig::transport::mem::pair();
    let dest = std::thread::spawn(move || r.run(&acceptor));
    let res = m.run(&connector);
    (res, dest.join().expect("receiver thread"))
}
