//! Phases 1 to 3 as one: handshake, setup and accept, started over while the
//! connection is lost before the rounds (docs/PROTOCOL.md, "Setup restart").
//!
//! Nothing is applied before the rounds (the appliers start with them), so a
//! setup whose connection breaks (closed, reset, silent past the setup deadline)
//! leaves nothing worth keeping: its skeleton memory and the page streams taken
//! so far are dropped, and the destination waits again for a `Hello` with the
//! same token, within [`ReceiverConfig::resume_window`], at most
//! [`ReceiverConfig::max_resumes`] times. It waits only for a source that
//! offered `setup-restart` in its `Hello`; for any other source a lost setup
//! fails at once, as it always did. Meanwhile it answers outcome queries and
//! refuses a `Hello` of another session as busy.
//!
//! The source may also come back before this side noticed anything: a `Hello`
//! with the session's token while page streams are being accepted starts the
//! setup over at once, and a `Resume` with it (the source had opened every page
//! stream and lost the connection in round 0 before they all arrived here) is
//! answered as a resumption with nothing held.
//!
//! [`ReceiverConfig::resume_window`]: super::ReceiverConfig::resume_window
//! [`ReceiverConfig::max_resumes`]: super::ReceiverConfig::max_resumes

use std::sync::Arc;
use std::time::Instant;

use super::accept::{Accepted, PageStream};
use super::apply::ApplyShared;
use super::handshake::{Caller, Handshake, HelloFor};
use super::setup::Skeleton;
use super::setup_check::RefuseReason;
use super::{refuse, Permit, ReceiveError, Receiver};
use crate::session::SessionToken;
use crate::transport::framed::FrameReader;
use crate::transport::Acceptor;
use crate::wire::control::RefuseCode;

/// What the setup phases hand to the rounds.
pub(super) struct Established {
    /// The control stream of the attempt that got through.
    pub control: FrameReader,
    /// The session's token.
    pub session: SessionToken,
    /// Page streams.
    pub streams: u16,
    /// This migration's slot on the host (held until the receiver returns).
    pub permit: Option<Permit>,
    /// When the first control connection arrived (the report's `total_ms`).
    pub started: Instant,
    /// The skeleton VM.
    pub skeleton: Skeleton,
    /// Page application state (nothing applied yet, unless resumed).
    pub shared: Arc<ApplyShared>,
    /// The page streams.
    pub page_streams: Vec<PageStream>,
    /// The round the rounds start at (0, or the round of a resumption).
    pub first_round: u32,
    /// Connections dropped as stray.
    pub stray_connections: u32,
    /// Times the setup started over.
    pub restarts: u32,
    /// Resumptions taken while accepting (a source already in round 0).
    pub resumes: u32,
}

impl Receiver {
    /// Handshake, setup and page streams, started over after a lost connection
    /// (see the module docs).
    pub(super) fn establish(
        &mut self,
        acceptor: &dyn Acceptor,
    ) -> Result<Established, ReceiveError> {
        let mut strays = 0u32;
        let mut permit = None;
        let mut restarts = 0u32;
        let mut caller = self.await_hello(acceptor, &mut strays, HelloFor::New)?;
        let started = caller.started;
        loop {
            let session = caller.hello.session;
            self.session = Some(session);
            let lost = match self.attempt(acceptor, caller, &mut permit, &mut strays)? {
                Attempt::Done(through) => {
                    let Through {
                        control,
                        streams,
                        skeleton,
                        shared,
                        page_streams,
                        first_round,
                        resumes,
                    } = *through;
                    return Ok(Established {
                        control,
                        session,
                        streams,
                        permit,
                        started,
                        skeleton,
                        shared,
                        page_streams,
                        first_round,
                        stray_connections: strays,
                        restarts,
                        resumes,
                    });
                }
                Attempt::Lost(error) => error,
                Attempt::Restarted(mut next) => {
                    if restarts >= self.config.max_resumes {
                        return Err(refuse(
                            &mut next.control,
                            RefuseCode::Other,
                            RefuseReason::RestartLimit {
                                session,
                                max: self.config.max_resumes,
                            },
                        ));
                    }
                    restarts += 1;
                    caller = next;
                    continue;
                }
            };
            if lost.restarts_denied || restarts >= self.config.max_resumes {
                return Err(lost.error);
            }
            restarts += 1;
            caller = self.await_hello(
                acceptor,
                &mut strays,
                HelloFor::Restart {
                    session: &session,
                    window: self.config.resume_window,
                    cause: lost.error,
                },
            )?;
        }
    }

    /// One setup from `caller`'s `Hello` to the last page stream.
    fn attempt(
        &mut self,
        acceptor: &dyn Acceptor,
        caller: Caller,
        permit: &mut Option<Permit>,
        strays: &mut u32,
    ) -> Result<Attempt, ReceiveError> {
        // Only a source that said it starts over is waited for.
        let restarts = caller.hello.restarts && !self.config.resume_window.is_zero();
        let lost = |error: ReceiveError| {
            if link_lost(&error) {
                Ok(Attempt::Lost(Lost {
                    error,
                    restarts_denied: !restarts,
                }))
            } else {
                Err(error)
            }
        };
        let Handshake {
            mut control,
            deadline,
            session,
            streams,
        } = match self.welcome(caller, permit) {
            Ok(h) => h,
            Err(e) => return lost(e),
        };
        let skeleton = match self.setup(&mut control, &deadline) {
            Ok(s) => s,
            Err(e) => return lost(e),
        };
        let shared = Arc::new(
            ApplyShared::new(
                skeleton.memory.clone(),
                streams as usize,
                self.config.max_rounds,
            )
            .caller_memory(self.memory.is_some() && !self.memory_zero),
        );
        match self.accept_page_streams(acceptor, &session, streams, *strays)? {
            Accepted::Streams(p) => {
                *strays += p.stray_connections;
                Ok(Attempt::Done(Box::new(Through {
                    control,
                    streams,
                    skeleton,
                    shared,
                    page_streams: p.streams,
                    first_round: 0,
                    resumes: 0,
                })))
            }
            Accepted::Restart {
                caller,
                stray_connections,
            } => {
                *strays += stray_connections;
                if !restarts {
                    let mut caller = caller;
                    return Err(refuse(
                        &mut caller.control,
                        RefuseCode::Other,
                        RefuseReason::AlreadySetUp(session),
                    ));
                }
                Ok(Attempt::Restarted(caller))
            }
            Accepted::Resume {
                request,
                stray_connections,
            } => {
                *strays += stray_connections;
                let mut resumes = 0;
                let r = self.take_resume(
                    acceptor,
                    request,
                    &session,
                    streams,
                    &shared,
                    *strays,
                    &mut resumes,
                )?;
                *strays = r.stray_connections;
                Ok(Attempt::Done(Box::new(Through {
                    control: r.control,
                    streams,
                    skeleton,
                    shared,
                    page_streams: r.streams,
                    first_round: r.round,
                    resumes,
                })))
            }
        }
    }
}

/// A setup attempt's end.
enum Attempt {
    /// Every page stream is in.
    Done(Box<Through>),
    /// Its connection was lost.
    Lost(Lost),
    /// The source started over while its page streams were accepted.
    Restarted(Caller),
}

/// A setup attempt that got through.
struct Through {
    control: FrameReader,
    streams: u16,
    skeleton: Skeleton,
    shared: Arc<ApplyShared>,
    page_streams: Vec<PageStream>,
    first_round: u32,
    resumes: u32,
}

/// A setup whose connection was lost.
struct Lost {
    error: ReceiveError,
    /// The source did not offer to start over (or this side keeps no window).
    restarts_denied: bool,
}

/// Whether a failure of the handshake or setup is a lost connection: closed,
/// reset, or silent past the setup deadline (not a refusal, a malformed frame or
/// a failure of this side).
fn link_lost(e: &ReceiveError) -> bool {
    match e {
        ReceiveError::Transport { source, .. } => source.is_link_loss(),
        ReceiveError::TimedOut { .. } => true,
        _ => false,
    }
}
