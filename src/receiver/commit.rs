//! Phase 5, commit: verify memory against the source's digest, validate every
//! participant's state, `Prepared` → `Released`, restore, `Committed`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::rounds::{CommitRequest, RoundsDone};
use super::{protocol_error, read_error, send_veto, transport_error, ReceiveError, Receiver};
use crate::device::{envelope, Veto};
use crate::memory::{digest_of_table, GuestMemory};
use crate::transport::framed::FrameReader;
use crate::wire::ControlMsg;

const PHASE: &str = "commit";

/// What a completed commit reports.
pub(super) struct Committed {
    /// The verified memory digest.
    pub digest: u64,
    /// Digest verification (µs).
    pub verify_us: u64,
    /// Device-state validation plus restore (µs).
    pub restore_us: u64,
    /// Per participant, in restore order: (id, restore time in µs).
    pub participants_us: Vec<(String, u64)>,
}

impl Receiver {
    /// Verify, validate, let the source release its devices, restore ours.
    pub(super) fn commit(
        &mut self,
        control: &mut FrameReader,
        memory: &Arc<GuestMemory>,
        rounds: &RoundsDone,
    ) -> Result<Committed, ReceiveError> {
        let request = &rounds.commit;
        let t_verify = Instant::now();
        let digest = verify_memory(control, memory, &rounds.shared.hash_table(), request)?;
        let verify_us = t_verify.elapsed().as_micros() as u64;

        // Device state: validate every participant before restoring any.
        let t_validate = Instant::now();
        let entries = self.validate_device_state(control, request.device_state.as_deref())?;
        let validate_us = t_validate.elapsed().as_micros() as u64;
        // Everything is validated: let the source release its devices (switch-port
        // step 5) before restoring ours (steps 6–7). See `ControlMsg::Prepared`.
        control
            .send_control(
                &ControlMsg::Prepared {
                    verify_us,
                    validate_us,
                },
                &[],
            )
            .map_err(transport_error(PHASE))?;
        await_release(control, self.config.idle_timeout)?;

        let t_restore = Instant::now();
        let participants_us = self.restore_all(control, &entries)?;
        let restore_us = validate_us + t_restore.elapsed().as_micros() as u64;
        control
            .send_control(
                &ControlMsg::Committed {
                    verify_us,
                    restore_us,
                    participants_us: participants_us.clone(),
                },
                &[],
            )
            .map_err(transport_error(PHASE))?;
        Ok(Committed {
            digest,
            verify_us,
            restore_us,
            participants_us,
        })
    }

    /// Decode the device-state envelope and let every participant validate its
    /// entry; a failure is a veto sent to the source. Nothing is restored here.
    fn validate_device_state(
        &mut self,
        control: &mut FrameReader,
        blob: Option<&[u8]>,
    ) -> Result<Vec<envelope::Entry>, ReceiveError> {
        let entries = envelope::decode(blob.unwrap_or(&[])).map_err(|e| Veto {
            participant: "envelope".into(),
            reason: format!("device-state envelope rejected: {e}"),
        });
        match entries.and_then(|entries| self.validate_all(&entries).map(|()| entries)) {
            Ok(entries) => Ok(entries),
            Err(v) => {
                send_veto(control, &v);
                Err(ReceiveError::Vetoed(v))
            }
        }
    }

    /// Both sides must have the same participants; each validates its state.
    fn validate_all(&mut self, entries: &[envelope::Entry]) -> Result<(), Veto> {
        for p in self.participants.iter() {
            if !entries.iter().any(|e| e.id == p.id()) {
                return Err(Veto {
                    participant: p.id().into(),
                    reason: "no state arrived for this device".into(),
                });
            }
        }
        for e in entries {
            let Some(p) = self.participants.iter_mut().find(|p| p.id() == e.id) else {
                return Err(Veto {
                    participant: e.id.clone(),
                    reason: "state for a device this host does not have".into(),
                });
            };
            p.validate_state(e.version, &e.blob)?;
        }
        Ok(())
    }

    /// Restore every validated entry in envelope order; returns each one's time.
    fn restore_all(
        &mut self,
        control: &mut FrameReader,
        entries: &[envelope::Entry],
    ) -> Result<Vec<(String, u64)>, ReceiveError> {
        let mut participants_us = Vec::with_capacity(entries.len());
        for e in entries {
            let p = self
                .participants
                .iter_mut()
                .find(|p| p.id() == e.id)
                .expect("validated above");
            let t_p = Instant::now();
            let r = p.restore(e.version, &e.blob);
            participants_us.push((e.id.clone(), t_p.elapsed().as_micros() as u64));
            if let Err(err) = r {
                let _ = control.send_control(
                    &ControlMsg::Error {
                        message: err.to_string(),
                    },
                    &[],
                );
                return Err(err.into());
            }
        }
        Ok(participants_us)
    }
}

/// One digest over the per-page hashes of everything applied must equal the
/// source's; a mismatch is a `memory` veto sent to the source.
fn verify_memory(
    control: &mut FrameReader,
    memory: &GuestMemory,
    hash_table: &[u64],
    request: &CommitRequest,
) -> Result<u64, ReceiveError> {
    let ours = digest_of_table(hash_table);
    if request.pages != memory.total_pages() || ours != request.digest {
        let reason = format!(
            "memory digest mismatch: source {:016x} over {} pages, destination {ours:016x} over {} pages",
            request.digest,
            request.pages,
            memory.total_pages()
        );
        send_veto(
            control,
            &Veto {
                participant: "memory".into(),
                reason: reason.clone(),
            },
        );
        return Err(ReceiveError::VerifyFailed(reason));
    }
    Ok(ours)
}

/// Wait up to `idle` for the source's `Released` (its devices are torn down).
fn await_release(control: &mut FrameReader, idle: Duration) -> Result<(), ReceiveError> {
    let released = control.control().map_err(read_error(
        PHASE,
        "the source did not answer prepared with released",
        idle,
    ))?;
    match released.0 {
        ControlMsg::Released => Ok(()),
        ControlMsg::Abort { reason } => Err(ReceiveError::Aborted(reason)),
        other => Err(protocol_error(
            PHASE,
            format!("expected released, got {}", other.name()),
        )),
    }
}
