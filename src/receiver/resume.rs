//! Between rounds and rounds: a session whose connection broke before `Brownout`
//! waits for its source to come back (docs/PROTOCOL.md, "Resumption").
//!
//! The destination keeps everything it applied (memory, per-page round stamps,
//! ledger) and accepts connections for [`ReceiverConfig::resume_window`]. The one
//! that opens with `Resume` for this session gets `Resumed`: the rounds every
//! stream completed and the runs of pages applied completely since. Its page
//! streams follow, and the rounds go on from the source's fresh round number.
//! Outcome queries are answered meanwhile; a `Hello` of another migration is told
//! this destination is busy; anything else is stray.
//!
//! [`ReceiverConfig::resume_window`]: super::ReceiverConfig::resume_window

use std::time::Instant;

use super::accept::{Accepted, PageStream};
use super::apply::ApplyShared;
use super::setup_check::RefuseReason;
use super::{next_connection, refuse, setup_check, transport_error, ReceiveError, Receiver};
use crate::session::{Deadline, DeadlineStream, SessionToken};
use crate::transport::framed::FrameReader;
use crate::transport::Acceptor;
use crate::wire::control::RefuseCode;
use crate::wire::resume::encode_runs;
use crate::wire::ControlMsg;

const PHASE: &str = "resuming";

/// A resumed session: its new control stream and page streams, and the round
/// they start at.
pub(super) struct Resumed {
    /// The new control stream, past `Resumed`.
    pub control: FrameReader,
    /// The new page streams.
    pub streams: Vec<PageStream>,
    /// The round the source goes on with.
    pub round: u32,
    /// Connections dropped while waiting.
    pub stray_connections: u32,
}

/// A connection that opened with `Resume` for the session, that message's
/// fields.
pub(super) struct ResumeRequest {
    /// The new control stream, its `Resume` read.
    pub control: FrameReader,
    /// Bounds its first frame; disarmed once answered.
    pub deadline: Deadline,
    /// `Resume.magic`.
    pub magic: String,
    /// `Resume.major`.
    pub major: u16,
    /// `Resume.minor`.
    pub minor: u16,
    /// Page streams the source will open.
    pub streams: u16,
    /// The round the source goes on with.
    pub round: u32,
}

impl Receiver {
    /// Wait for the source of `session` to resume it, within the resume window,
    /// then take the resumption (see [`Receiver::take_resume`]). `cause` is why
    /// the connection broke; it is the error when nobody resumes.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn await_resume(
        &self,
        acceptor: &dyn Acceptor,
        session: &SessionToken,
        streams: u16,
        shared: &ApplyShared,
        cause: ReceiveError,
        resumes: &mut u32,
    ) -> Result<Resumed, ReceiveError> {
        let window = self.config.resume_window;
        let give_up = Instant::now() + window;
        let mut strays = 0u32;
        loop {
            let Some(stream) = next_connection(PHASE, acceptor, give_up)? else {
                return Err(ReceiveError::NotResumed {
                    after: window,
                    cause: Box::new(cause),
                });
            };
            let deadline = Deadline::new();
            deadline.arm(Instant::now() + self.config.hello_timeout);
            let stream = DeadlineStream::new(stream, deadline.clone());
            let mut control = FrameReader::new(Box::new(stream), "control");
            match control.control() {
                Ok((
                    ControlMsg::Resume {
                        magic,
                        major,
                        minor,
                        session: s,
                        streams: n,
                        round,
                    },
                    _,
                )) if s == *session => {
                    let request = ResumeRequest {
                        control,
                        deadline,
                        magic,
                        major,
                        minor,
                        streams: n,
                        round,
                    };
                    return self
                        .take_resume(acceptor, request, session, streams, shared, strays, resumes);
                }
                Ok((ControlMsg::QueryOutcome { session }, _)) => {
                    self.outcomes.answer(&mut control, session);
                    control.stream().shutdown();
                }
                Ok((ControlMsg::Hello { .. }, _)) => {
                    strays += 1;
                    let _ = refuse(
                        &mut control,
                        RefuseCode::HostBusy,
                        RefuseReason::SessionHeld(*session),
                    );
                    control.stream().shutdown();
                }
                Ok((ControlMsg::Resume { .. }, _)) => {
                    strays += 1;
                    let _ = refuse(&mut control, RefuseCode::Other, RefuseReason::NoSuchSession);
                    control.stream().shutdown();
                }
                Ok(_) | Err(_) => {
                    strays += 1;
                    control.stream().shutdown();
                }
            }
        }
    }

    /// Answer `request` with what the destination holds and take the page
    /// streams that follow. A source whose connection breaks again while it
    /// opens them comes back with another `Resume`, answered in turn. Each
    /// answered `Resume` counts in `resumes`, at most
    /// [`super::ReceiverConfig::max_resumes`]; `strays` were dropped before.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn take_resume(
        &self,
        acceptor: &dyn Acceptor,
        mut request: ResumeRequest,
        session: &SessionToken,
        streams: u16,
        shared: &ApplyShared,
        mut strays: u32,
        resumes: &mut u32,
    ) -> Result<Resumed, ReceiveError> {
        loop {
            if *resumes >= self.config.max_resumes {
                return Err(refuse(
                    &mut request.control,
                    RefuseCode::Other,
                    RefuseReason::ResumeLimit {
                        session: *session,
                        max: self.config.max_resumes,
                    },
                ));
            }
            let (control, round) = self.answer_resume(request, streams, shared)?;
            *resumes += 1;
            match self.accept_page_streams(acceptor, session, streams, strays)? {
                Accepted::Streams(p) => {
                    return Ok(Resumed {
                        control,
                        streams: p.streams,
                        round,
                        stray_connections: strays + p.stray_connections,
                    })
                }
                Accepted::Resume {
                    request: next,
                    stray_connections,
                } => {
                    strays += stray_connections;
                    request = next;
                }
                // Past setup, a source resumes: it never starts over.
                Accepted::Restart { mut caller, .. } => {
                    return Err(refuse(
                        &mut caller.control,
                        RefuseCode::Other,
                        RefuseReason::PastSetup(*session),
                    ))
                }
            }
        }
    }

    /// Check `request` against the session and answer `Resumed` with the rounds
    /// every stream completed and the runs held since; returns the control
    /// stream and the round the source goes on with.
    fn answer_resume(
        &self,
        request: ResumeRequest,
        streams: u16,
        shared: &ApplyShared,
    ) -> Result<(FrameReader, u32), ReceiveError> {
        let ResumeRequest {
            mut control,
            deadline,
            magic,
            major,
            minor,
            streams: n,
            round,
        } = request;
        if let Err(why) = setup_check::check_version(&magic, major, minor) {
            return Err(refuse(&mut control, RefuseCode::Version, why.into()));
        }
        if n != streams {
            return Err(refuse(
                &mut control,
                RefuseCode::Other,
                RefuseReason::ResumeStreams {
                    requested: n,
                    session: streams,
                },
            ));
        }
        let complete = shared.gate.rounds_done();
        let (runs, highest) = shared.held_since(complete);
        if round < complete || highest.is_some_and(|h| round <= h) {
            return Err(refuse(
                &mut control,
                RefuseCode::Other,
                RefuseReason::ResumeRound {
                    round,
                    complete,
                    highest,
                },
            ));
        }
        if round >= self.config.max_rounds {
            return Err(refuse(
                &mut control,
                RefuseCode::Other,
                RefuseReason::ResumeBeyondLimit {
                    round,
                    max: self.config.max_rounds,
                },
            ));
        }
        shared.reopen(round);
        let mut attachment = Vec::new();
        encode_runs(&runs, &mut attachment);
        control
            .send_control(
                &ControlMsg::Resumed {
                    complete_rounds: complete,
                    held_runs: runs.len() as u64,
                },
                &attachment,
            )
            .map_err(transport_error(PHASE))?;
        deadline.disarm();
        Ok((control, round))
    }
}
