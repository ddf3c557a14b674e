//! A model virtual-switch port: the device participant that reproduces Hyper-V's
//! extensible-switch port handoff, step by step, into a shared [`StepLog`].
//!
//! The spec's order ([`SPEC_ORDER`]) and where each step runs in livemig:
//!
//! | # | side        | step                          | livemig hook                      |
//! |---|-------------|-------------------------------|-----------------------------------|
//! | 1 | destination | PORT_CREATE (validation port) | `validate_setup` (setup stage)    |
//! | 2 | destination | policy check — **veto point** | `validate_setup`                  |
//! | 3 | destination | PORT_DELETE (validation port) | `validate_setup`                  |
//! | 3 | destination | PORT_CREATE (operational)     | `validate_setup`                  |
//! | 3 | destination | port policies added           | `validate_setup`                  |
//! | 4 | source      | save runtime data             | `save` (brownout, VM paused)      |
//! | 5 | source      | NIC_DISCONNECT, NIC_DELETE, PORT_TEARDOWN, PORT_DELETE | `release` (after `Prepared`) |
//! | 6 | destination | NIC_CREATE, NIC_CONNECT       | `restore` (after `Released`)      |
//! | 7 | destination | restore runtime data          | `restore`                         |
//!
//! The port's parameters are known at setup, so the policy check runs there and a
//! veto costs no page transfer. Off the success path: a veto logs
//! [`PortStep::Veto`] and deletes the validation port; a destination discard deletes
//! the operational port ([`PortStep::DiscardPort`]); a source rollback after
//! `release` re-creates the port and reconnects the NIC ([`PortStep::RollbackPortCreate`],
//! [`PortStep::RollbackNicCreate`], [`PortStep::RollbackNicConnect`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{ParticipantError, RestoreState, SaveState, Veto};

/// Which host logged a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The source host.
    Source,
    /// The destination host.
    Destination,
}

impl Side {
    /// Short name for printing.
    pub fn name(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// One step of the port handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortStep {
    /// Destination: PORT_CREATE of the validation port.
    ValidationPortCreate,
    /// Destination: extensions check the port's policy properties.
    PolicyCheck,
    /// Destination: PORT_DELETE of the validation port.
    ValidationPortDelete,
    /// Destination: PORT_CREATE of the operational port with the source's parameters.
    OperationalPortCreate,
    /// Destination: the port policies are added to the operational port.
    PoliciesAdd,
    /// Source: save the port's runtime data.
    Save,
    /// Source: NIC_DISCONNECT.
    NicDisconnect,
    /// Source: NIC_DELETE.
    NicDelete,
    /// Source: PORT_TEARDOWN.
    PortTeardown,
    /// Source: PORT_DELETE.
    PortDelete,
    /// Destination: NIC_CREATE on the operational port.
    NicCreate,
    /// Destination: NIC_CONNECT.
    NicConnect,
    /// Destination: restore the runtime data of the port and NIC connection.
    Restore,
    /// Destination: a policy property was rejected (off the success path).
    Veto,
    /// Destination: the migration was abandoned; the operational port is deleted.
    DiscardPort,
    /// Source: rollback after release — PORT_CREATE again.
    RollbackPortCreate,
    /// Source: rollback after release — NIC_CREATE again.
    RollbackNicCreate,
    /// Source: rollback after release — NIC_CONNECT again.
    RollbackNicConnect,
}

impl PortStep {
    /// The name the spec uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::ValidationPortCreate => "PORT_CREATE (validation port)",
            Self::PolicyCheck => "policy check",
            Self::ValidationPortDelete => "PORT_DELETE (validation port)",
            Self::OperationalPortCreate => "PORT_CREATE (operational port)",
            Self::PoliciesAdd => "port policies added",
            Self::Save => "save runtime data",
            Self::NicDisconnect => "NIC_DISCONNECT",
            Self::NicDelete => "NIC_DELETE",
            Self::PortTeardown => "PORT_TEARDOWN",
            Self::PortDelete => "PORT_DELETE",
            Self::NicCreate => "NIC_CREATE",
            Self::NicConnect => "NIC_CONNECT",
            Self::Restore => "restore runtime data",
            Self::Veto => "policy rejected (veto)",
            Self::DiscardPort => "PORT_DELETE (operational port, discarded)",
            Self::RollbackPortCreate => "PORT_CREATE (rollback)",
            Self::RollbackNicCreate => "NIC_CREATE (rollback)",
            Self::RollbackNicConnect => "NIC_CONNECT (rollback)",
        }
    }
}

/// The spec's handoff order for one port, both sides combined.
pub const SPEC_ORDER: [(Side, PortStep); 13] = [
    (Side::Destination, PortStep::ValidationPortCreate),
    (Side::Destination, PortStep::PolicyCheck),
    (Side::Destination, PortStep::ValidationPortDelete),
    (Side::Destination, PortStep::OperationalPortCreate),
    (Side::Destination, PortStep::PoliciesAdd),
    (Side::Source, PortStep::Save),
    (Side::Source, PortStep::NicDisconnect),
    (Side::Source, PortStep::NicDelete),
    (Side::Source, PortStep::PortTeardown),
    (Side::Source, PortStep::PortDelete),
    (Side::Destination, PortStep::NicCreate),
    (Side::Destination, PortStep::NicConnect),
    (Side::Destination, PortStep::Restore),
];

/// The combined log of a veto at the validation port.
pub const VETO_ORDER: [(Side, PortStep); 4] = [
    (Side::Destination, PortStep::ValidationPortCreate),
    (Side::Destination, PortStep::PolicyCheck),
    (Side::Destination, PortStep::Veto),
    (Side::Destination, PortStep::ValidationPortDelete),
];

/// One logged step.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// When (monotonic; both sides share one clock when they share a log).
    pub at: Instant,
    /// Which host.
    pub side: Side,
    /// Port id.
    pub port: String,
    /// What happened.
    pub step: PortStep,
    /// Free-form detail (parameters, reasons).
    pub detail: String,
}

/// A shared, timestamp-ordered step log (both sides append to one log when they run
/// in one process).
#[derive(Debug, Clone, Default)]
pub struct StepLog(Arc<Mutex<Vec<LogEntry>>>);

impl StepLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<LogEntry>> {
        // A panicking participant must not hide the log from the test that reads it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append a step (the timestamp is taken under the lock, so the log is ordered).
    pub fn record(&self, side: Side, port: &str, step: PortStep, detail: impl Into<String>) {
        let mut g = self.lock();
        g.push(LogEntry {
            at: Instant::now(),
            side,
            port: port.to_string(),
            step,
            detail: detail.into(),
        });
    }

    /// All entries in timestamp order.
    pub fn entries(&self) -> Vec<LogEntry> {
        let mut v = self.lock().clone();
        v.sort_by_key(|e| e.at);
        v
    }

    /// (side, step) of every entry in timestamp order.
    pub fn steps(&self) -> Vec<(Side, PortStep)> {
        self.entries().iter().map(|e| (e.side, e.step)).collect()
    }

    /// (side, step) of one port's entries in timestamp order.
    pub fn steps_of(&self, port: &str) -> Vec<(Side, PortStep)> {
        self.entries()
            .iter()
            .filter(|e| e.port == port)
            .map(|e| (e.side, e.step))
            .collect()
    }
}

/// A port's parameters: known at setup, sent as the participant's setup info.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortParams {
    /// Virtual switch the port belongs to.
    pub switch: String,
    /// The VM NIC's MAC address.
    pub mac: String,
    /// Access VLAN (0: untagged).
    pub vlan: u16,
    /// Port policy properties, e.g. `"acl:allow-dhcp"`, `"qos:100mbit"`.
    pub policies: Vec<String>,
}

/// A port's runtime data: saved at brownout, restored on the destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRuntime {
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Learned MAC table entries.
    pub mac_table: Vec<String>,
}

/// Format version of [`PortRuntime`] blobs.
pub const RUNTIME_VERSION: u32 = 1;

/// The source port's observable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePortState {
    /// The port exists and forwards traffic.
    pub port_operational: bool,
    /// The VM's NIC is connected to the port.
    pub nic_connected: bool,
    /// `save` ran (and no rollback since).
    pub saved: bool,
    /// The destination committed: the port now lives there.
    pub migrated: bool,
    /// Runtime data.
    pub runtime: PortRuntime,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A cloneable view of a participant's state, kept by the caller after the
/// participant moved into a migration.
#[derive(Debug, Clone)]
pub struct Handle<T>(Arc<Mutex<T>>);

impl<T: Clone> Handle<T> {
    /// A snapshot of the state.
    pub fn get(&self) -> T {
        lock(&self.0).clone()
    }
}

/// Source side of a switch port.
#[derive(Debug)]
pub struct SourcePort {
    id: String,
    params: PortParams,
    log: StepLog,
    state: Arc<Mutex<SourcePortState>>,
}

impl SourcePort {
    /// An operational port with a connected NIC.
    pub fn new(id: &str, params: PortParams, runtime: PortRuntime, log: StepLog) -> Self {
        Self {
            id: id.to_string(),
            params,
            log,
            state: Arc::new(Mutex::new(SourcePortState {
                port_operational: true,
                nic_connected: true,
                saved: false,
                migrated: false,
                runtime,
            })),
        }
    }

    /// A view of the port's state that outlives the participant.
    pub fn handle(&self) -> Handle<SourcePortState> {
        Handle(self.state.clone())
    }

    fn log(&self, step: PortStep, detail: impl Into<String>) {
        self.log.record(Side::Source, &self.id, step, detail);
    }
}

impl SaveState for SourcePort {
    fn id(&self) -> &str {
        &self.id
    }
    fn version(&self) -> u32 {
        RUNTIME_VERSION
    }
    fn setup_info(&self) -> Vec<u8> {
        serde_json::to_vec(&self.params).expect("port parameters serialize")
    }
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError> {
        let mut s = lock(&self.state);
        if !s.port_operational || !s.nic_connected {
            return Err(ParticipantError::Failed {
                participant: self.id.clone(),
                message: "the port is not operational".into(),
            });
        }
        serde_json::to_writer(&mut *out, &s.runtime)
            .map_err(|e| ParticipantError::device(self.id.clone(), e))?;
        s.saved = true;
        drop(s);
        self.log(PortStep::Save, format!("{} bytes", out.len()));
        Ok(())
    }
    fn release(&mut self) -> Result<(), ParticipantError> {
        // Ordering requirement (spec step 5): NIC first, then the port.
        let mut s = lock(&self.state);
        s.nic_connected = false;
        self.log(PortStep::NicDisconnect, "");
        self.log(PortStep::NicDelete, "");
        s.port_operational = false;
        self.log(PortStep::PortTeardown, "");
        self.log(PortStep::PortDelete, "");
        Ok(())
    }
    fn committed(&mut self) {
        lock(&self.state).migrated = true;
    }
    fn rolled_back(&mut self) {
        let mut s = lock(&self.state);
        s.saved = false;
        if !s.port_operational {
            s.port_operational = true;
            self.log(PortStep::RollbackPortCreate, "source keeps the VM");
        }
        if !s.nic_connected {
            s.nic_connected = true;
            self.log(PortStep::RollbackNicCreate, "");
            self.log(PortStep::RollbackNicConnect, "");
        }
    }
}

/// The destination port's observable state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestPortState {
    /// A validation port exists (only during the policy check).
    pub validation_port: bool,
    /// The operational port, created with the source's parameters.
    pub operational_port: Option<PortParams>,
    /// Its policies were added.
    pub policies_added: bool,
    /// The VM's NIC exists on the operational port and is connected.
    pub nic_connected: bool,
    /// Restored runtime data.
    pub runtime: Option<PortRuntime>,
    /// `discard` ran.
    pub discarded: bool,
}

/// Destination side of a switch port.
#[derive(Debug)]
pub struct DestPort {
    id: String,
    switches: Vec<String>,
    rejected_policies: Vec<String>,
    fail_restore: bool,
    log: StepLog,
    state: Arc<Mutex<DestPortState>>,
}

impl DestPort {
    /// A destination port participant on a host with these virtual switches.
    pub fn new(id: &str, switches: Vec<String>, log: StepLog) -> Self {
        Self {
            id: id.to_string(),
            switches,
            rejected_policies: Vec::new(),
            fail_restore: false,
            log,
            state: Arc::new(Mutex::new(DestPortState::default())),
        }
    }

    /// Extensions on this host reject these policy properties (the veto).
    pub fn reject_policies(mut self, p: Vec<String>) -> Self {
        self.rejected_policies = p;
        self
    }

    /// Make `restore` fail after NIC_CONNECT (fault injection for tests).
    pub fn fail_restore(mut self, yes: bool) -> Self {
        self.fail_restore = yes;
        self
    }

    /// A view of the port's state that outlives the participant.
    pub fn handle(&self) -> Handle<DestPortState> {
        Handle(self.state.clone())
    }

    fn log(&self, step: PortStep, detail: impl Into<String>) {
        self.log.record(Side::Destination, &self.id, step, detail);
    }

    fn veto(&self, reason: String) -> Veto {
        Veto {
            participant: self.id.clone(),
            reason,
        }
    }
}

impl RestoreState for DestPort {
    fn id(&self) -> &str {
        &self.id
    }
    fn validate_setup(&mut self, info: &[u8]) -> Result<(), Veto> {
        let params: PortParams = serde_json::from_slice(info)
            .map_err(|e| self.veto(format!("unreadable port parameters: {e}")))?;
        if !self.switches.contains(&params.switch) {
            return Err(self.veto(format!(
                "PORT_CREATE of the validation port failed: no virtual switch {:?}",
                params.switch
            )));
        }
        let mut s = lock(&self.state);
        s.validation_port = true;
        self.log(PortStep::ValidationPortCreate, format!("{params:?}"));
        let rejected: Vec<_> = params
            .policies
            .iter()
            .filter(|p| self.rejected_policies.contains(p))
            .cloned()
            .collect();
        self.log(PortStep::PolicyCheck, params.policies.join(","));
        if !rejected.is_empty() {
            let reason = format!(
                "a switch extension rejected the port policy {}",
                rejected.join(", ")
            );
            self.log(PortStep::Veto, reason.clone());
            s.validation_port = false;
            self.log(PortStep::ValidationPortDelete, "");
            return Err(self.veto(reason));
        }
        s.validation_port = false;
        self.log(PortStep::ValidationPortDelete, "");
        s.operational_port = Some(params.clone());
        self.log(PortStep::OperationalPortCreate, format!("{params:?}"));
        s.policies_added = true;
        self.log(PortStep::PoliciesAdd, params.policies.join(","));
        Ok(())
    }
    fn validate_state(&mut self, version: u32, blob: &[u8]) -> Result<(), Veto> {
        if version != RUNTIME_VERSION {
            return Err(self.veto(format!(
                "port runtime data version {version} is not supported (this host reads {RUNTIME_VERSION})"
            )));
        }
        serde_json::from_slice::<PortRuntime>(blob)
            .map_err(|e| self.veto(format!("unreadable port runtime data: {e}")))?;
        if lock(&self.state).operational_port.is_none() {
            return Err(self.veto("no operational port was prepared at setup".into()));
        }
        Ok(())
    }
    fn restore(&mut self, _version: u32, blob: &[u8]) -> Result<(), ParticipantError> {
        let runtime: PortRuntime = serde_json::from_slice(blob)
            .map_err(|e| ParticipantError::device(self.id.clone(), e))?;
        let mut s = lock(&self.state);
        self.log(PortStep::NicCreate, "");
        s.nic_connected = true;
        self.log(PortStep::NicConnect, "");
        if self.fail_restore {
            return Err(ParticipantError::Failed {
                participant: self.id.clone(),
                message: "an extension failed to reserve resources for the port".into(),
            });
        }
        s.runtime = Some(runtime);
        self.log(PortStep::Restore, "");
        Ok(())
    }
    fn discard(&mut self) {
        let mut s = lock(&self.state);
        s.discarded = true;
        s.validation_port = false;
        s.nic_connected = false;
        s.runtime = None;
        s.policies_added = false;
        if s.operational_port.take().is_some() {
            self.log(PortStep::DiscardPort, "");
        }
    }
}
