//! Phase 5, commit: verify memory against the source's digest, validate every
//! participant's state, `Prepared` → `Released`, restore, `Committed`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handoff::{DestEvent, DestState};
use super::outcomes;
use super::rounds::{CommitRequest, RoundsDone};
use super::{protocol_error, read_error, send_veto, transport_error, ReceiveError, Receiver};
use crate::device::{envelope, Veto};
use crate::memory::GuestMemory;
use crate::proof::MemoryDigest;
use crate::transport::framed::FrameReader;
use crate::wire::control::SessionOutcome;
use crate::wire::{ControlMsg, ProtocolViolation};

const PHASE: &str = "commit";

/// What a completed commit reports.
pub(super) struct Committed {
    /// The verified memory digest.
    pub digest: MemoryDigest,
    /// Digest verification (µs).
    pub verify_us: u64,
    /// Device-state validation plus restore (µs).
    pub restore_us: u64,
    /// Per participant, in restore order: (id, restore time in µs).
    pub participants_us: Vec<(String, u64)>,
    /// The source said it learned the outcome.
    pub outcome_known: bool,
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
        let digest = verify_memory(control, memory, rounds.shared.applied.digest(), request)?;
        let verify_us = t_verify.elapsed().as_micros() as u64;

        // Device state: validate every participant before restoring any.
        let t_validate = Instant::now();
        let entries = self.validate_device_state(control, request.device_state.as_deref())?;
        let validate_us = t_validate.elapsed().as_micros() as u64;
        // Everything is validated: let the source release its devices (switch-port
        // step 5) before restoring ours (steps 6–7). See `ControlMsg::Prepared`.
        // From `Prepared` on the source may send Released and be in doubt: the
        // session enters the outcome record first (in progress until committed or
        // discarded).
        let session = self
            .session
            .ok_or_else(|| protocol_error(PHASE, ProtocolViolation::NoSession("commit")))?;
        self.handoff(DestEvent::PreparedSent)?;
        control
            .send_control(
                &ControlMsg::Prepared {
                    verify_us,
                    validate_us,
                },
                &[],
            )
            .map_err(transport_error(PHASE))?;
        if let Err(e) = await_release(control, self.config.idle_timeout) {
            if matches!(e, ReceiveError::Aborted(_)) {
                // A source that aborts has not released: it resumes, never asks.
                self.outcomes.mark_known(session);
            }
            return Err(e);
        }
        self.handoff(DestEvent::Released)?;

        let t_restore = Instant::now();
        let participants_us = match self.restore_all(control, &entries) {
            Ok(p) => p,
            Err(e) => {
                // Discarded (recorded) before the source hears of it (restore_all
                // sent the Error); wait for its acknowledgement.
                let _ = self.handoff(DestEvent::RestoreFailed);
                self.outcomes
                    .await_known(control, session, outcomes::KNOWN_WAIT);
                return Err(e);
            }
        };
        let restore_us = validate_us + t_restore.elapsed().as_micros() as u64;
        // The commit point: recorded (on disk, with a file) before `Committed` is
        // sent. Without a record the source could not learn the outcome if
        // `Committed` were lost, so a failed record discards instead.
        if let Err(e) = self.handoff(DestEvent::Restored) {
            self.handoff = DestState::Restoring.on(DestEvent::RestoreFailed);
            let _ = self.outcomes.record(session, SessionOutcome::Discarded);
            let _ = control.send_control(
                &ControlMsg::Error {
                    message: format!("the destination could not record the commit: {e}"),
                },
                &[],
            );
            return Err(e.into());
        }
        // Committed: the VM is ours whether or not the source hears it (a source
        // that does not is in doubt and asks).
        let delivered = control
            .send_control(
                &ControlMsg::Committed {
                    verify_us,
                    restore_us,
                    participants_us: participants_us.clone(),
                },
                &[],
            )
            .is_ok();
        if delivered {
            self.outcomes
                .await_known(control, session, outcomes::KNOWN_WAIT);
        }
        Ok(Committed {
            digest,
            verify_us,
            restore_us,
            participants_us,
            outcome_known: self.outcomes.awaiting_query_for(session) == Some(false),
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

/// The running digest of everything applied (`ours`) must equal the source's
/// digest of everything sent (two fixed-size values, see `proof::digest`); a
/// mismatch is a `memory` veto sent to the source.
fn verify_memory(
    control: &mut FrameReader,
    memory: &GuestMemory,
    ours: MemoryDigest,
    request: &CommitRequest,
) -> Result<MemoryDigest, ReceiveError> {
    if request.pages != memory.total_pages() || ours != request.digest {
        let mismatch = super::DigestMismatch {
            sent: request.digest,
            sent_pages: request.pages,
            applied: ours,
            pages: memory.total_pages(),
        };
        send_veto(
            control,
            &Veto {
                participant: "memory".into(),
                reason: mismatch.to_string(),
            },
        );
        return Err(ReceiveError::VerifyFailed(mismatch));
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
        ControlMsg::Abort { reason } => Err(ReceiveError::Aborted(reason.into())),
        other => Err(protocol_error(
            PHASE,
            ProtocolViolation::Unexpected {
                expected: "released or abort",
                got: other.name(),
            },
        )),
    }
}
