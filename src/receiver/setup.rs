//! Phase 2, setup: check the source's `Setup` (see [`super::setup_check`]), build
//! the skeleton VM's memory before any page arrives, answer `SetupOk`.

use std::sync::Arc;
use std::time::Instant;

use super::setup_check::Refusal;
use super::{
    is_timeout, protocol_error, refuse, send_veto, transport_error, Awaited, ReceiveError, Receiver,
};
use crate::memory::{GuestMemory, MemoryLayout};
use crate::session::Deadline;
use crate::transport::framed::FrameReader;
use crate::wire::control::RefuseCode;
use crate::wire::{ControlMsg, ProtocolViolation};

/// What setup hands to the page phases.
pub(super) struct Skeleton {
    /// Destination memory, sized to the source's layout.
    pub memory: Arc<GuestMemory>,
    /// Time spent checking and allocating (ms).
    pub setup_ms: f64,
    /// The memory was given before the migration; nothing was allocated.
    pub prepared: bool,
}

impl Receiver {
    /// Receive `Setup`, run every setup check, allocate memory, answer `SetupOk`.
    ///
    /// The source has [`super::ReceiverConfig::setup_timeout`] from the first byte
    /// of its `Hello` to the last byte of its `Setup`; a peer trickling bytes is cut
    /// there. Checking and allocating are the destination's own work and not bounded.
    pub(super) fn setup(
        &mut self,
        control: &mut FrameReader,
        deadline: &Deadline,
    ) -> Result<Skeleton, ReceiveError> {
        const PHASE: &str = "setup";
        let first_byte = deadline.first_byte_at().unwrap_or_else(Instant::now);
        deadline.arm(first_byte + self.config.setup_timeout);
        let received = control.control_capped(&self.config.setup_caps());
        deadline.disarm();
        let (msg, attachment) = received.map_err(|e| {
            if is_timeout(&e) {
                ReceiveError::TimedOut {
                    phase: PHASE,
                    what: Awaited::Source("the source's hello and setup did not arrive in full"),
                    after: self.config.setup_timeout,
                    stray_connections: 0,
                    last_stray: None,
                }
            } else {
                transport_error(PHASE)(e)
            }
        })?;
        let ControlMsg::Setup {
            layout,
            compat,
            config_len,
            participants,
        } = msg
        else {
            return Err(protocol_error(
                PHASE,
                ProtocolViolation::Unexpected {
                    expected: "setup",
                    got: msg.name(),
                },
            ));
        };
        let started = Instant::now();
        match self.check_setup(&layout, &compat, config_len, &participants, &attachment) {
            Ok(()) => {}
            Err(Refusal::Refuse(code, reason)) => return Err(refuse(control, code, reason)),
            Err(Refusal::Veto(v)) => {
                send_veto(control, &v);
                return Err(ReceiveError::Vetoed(v));
            }
        }
        let prepared = self.memory.is_some();
        let memory = match self.memory.clone() {
            Some(m) => m,
            None => self.allocate(control, &layout)?,
        };
        let setup_ms = started.elapsed().as_secs_f64() * 1e3;
        control
            .send_control(&ControlMsg::SetupOk, &[])
            .map_err(transport_error(PHASE))?;
        Ok(Skeleton {
            memory,
            setup_ms,
            prepared,
        })
    }

    /// Map memory for `layout` (committing all of it with `prealloc`); a failure is
    /// a `MemoryLayout` refusal sent to the source.
    fn allocate(
        &self,
        control: &mut FrameReader,
        layout: &MemoryLayout,
    ) -> Result<Arc<GuestMemory>, ReceiveError> {
        let refuse_memory = |control: &mut FrameReader, message: String| {
            let _ = control.send_control(
                &ControlMsg::Refuse {
                    code: RefuseCode::MemoryLayout,
                    message,
                },
                &[],
            );
        };
        let m = GuestMemory::from_layout(layout, self.config.huge_pages).inspect_err(|e| {
            refuse_memory(control, format!("cannot allocate: {e}"));
        })?;
        if self.config.prealloc {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            m.prefault(threads).inspect_err(|e| {
                refuse_memory(
                    control,
                    format!(
                        "cannot commit {} bytes of guest memory: {e}",
                        m.total_bytes()
                    ),
                );
            })?;
        }
        Ok(Arc::new(m))
    }
}
