//! Phase 1, handshake: wait for the migration's control connection, check the
//! source's `Hello` (version, this host's capacity, stream count) and answer
//! `Welcome`.
//!
//! Until a `Hello` arrives, any other connection is stray (a port scan, a health
//! check, a client of something else): one that closes, sends something other than
//! a `Hello`, or stays silent past [`ReceiverConfig::hello_timeout`] is dropped,
//! counted, and the receiver keeps waiting until
//! [`ReceiverConfig::accept_timeout`]. A `Hello` the receiver must refuse (another
//! version, a busy host) is not stray: it comes from a livemig source, which is told
//! why.
//!
//! A session whose connection broke during setup waits here again, for its
//! source's next `Hello` (the same token) within
//! [`ReceiverConfig::resume_window`]; see [`super::restart`].
//!
//! [`ReceiverConfig::hello_timeout`]: super::ReceiverConfig::hello_timeout
//! [`ReceiverConfig::accept_timeout`]: super::ReceiverConfig::accept_timeout
//! [`ReceiverConfig::resume_window`]: super::ReceiverConfig::resume_window

use std::time::{Duration, Instant};

use super::setup_check::{RefuseReason, VersionRefusal};
use super::{
    next_connection, refuse, setup_check, transport_error, Awaited, Permit, ReceiveError, Receiver,
    StrayReason,
};
use crate::session::{Deadline, DeadlineStream, SessionToken};
use crate::transport::framed::FrameReader;
use crate::transport::{Acceptor, TransportError};
use crate::wire::control::RefuseCode;
use crate::wire::{
    ControlMsg, WireError, CAPABILITIES, PROTOCOL_MAJOR, PROTOCOL_MINOR, SETUP_RESTART,
};

/// What the handshake hands to setup and the phases after it.
pub(super) struct Handshake {
    /// The control stream, past `Welcome`.
    pub control: FrameReader,
    /// Bounds reads on the control stream while armed (setup arms it).
    pub deadline: Deadline,
    /// The session's token: every page stream must present it.
    pub session: SessionToken,
    /// Page streams the source will open.
    pub streams: u16,
}

/// The fields of a `Hello` the receiver checks.
pub(super) struct Hello {
    magic: String,
    major: u16,
    minor: u16,
    pub session: SessionToken,
    streams: u16,
    /// The source offered `setup-restart`.
    pub restarts: bool,
}

impl Hello {
    /// The checked fields of a `Hello` message.
    pub fn new(
        magic: String,
        major: u16,
        minor: u16,
        session: SessionToken,
        streams: u16,
        capabilities: &[String],
    ) -> Self {
        Self {
            magic,
            major,
            minor,
            session,
            streams,
            restarts: capabilities.iter().any(|c| c == SETUP_RESTART),
        }
    }
}

/// The control connection, its first frame (a `Hello`) read.
pub(super) struct Caller {
    pub control: FrameReader,
    pub deadline: Deadline,
    pub hello: Hello,
    /// When the connection arrived.
    pub started: Instant,
}

/// What [`Receiver::await_hello`] waits for.
pub(super) enum HelloFor<'a> {
    /// A new migration: any session, within the accept timeout.
    New,
    /// The session `session`, whose setup broke (`cause`), starting over within
    /// `window`; a `Hello` of another session is refused as busy.
    Restart {
        /// Its token.
        session: &'a SessionToken,
        /// How long to wait.
        window: Duration,
        /// Why its setup broke (the error when nobody comes back).
        cause: ReceiveError,
    },
}

impl Receiver {
    /// Check the caller's `Hello` (taking a slot on the host unless `permit`
    /// already holds one) and answer `Welcome`.
    pub(super) fn welcome(
        &self,
        caller: Caller,
        permit: &mut Option<Permit>,
    ) -> Result<Handshake, ReceiveError> {
        let Caller {
            mut control,
            deadline,
            hello,
            ..
        } = caller;
        self.check_hello(&mut control, &hello, permit)?;
        let welcome = ControlMsg::Welcome {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            capabilities: CAPABILITIES.iter().map(|s| s.to_string()).collect(),
        };
        control
            .send_control(&welcome, &[])
            .map_err(transport_error("handshake"))?;
        Ok(Handshake {
            control,
            deadline,
            session: hello.session,
            streams: hello.streams,
        })
    }

    /// Accept connections until one opens with a `Hello` (of the session, for a
    /// restart); drop and count the rest (added to `strays`), answer outcome
    /// queries.
    pub(super) fn await_hello(
        &self,
        acceptor: &dyn Acceptor,
        strays: &mut u32,
        awaited: HelloFor<'_>,
    ) -> Result<Caller, ReceiveError> {
        let wait = match &awaited {
            HelloFor::New => self.config.accept_timeout,
            HelloFor::Restart { window, .. } => *window,
        };
        let give_up = Instant::now() + wait;
        let mut last_stray = None;
        loop {
            let Some(stream) = next_connection("accept", acceptor, give_up)? else {
                return Err(match awaited {
                    HelloFor::New => ReceiveError::TimedOut {
                        phase: "accept",
                        what: Awaited::Hello,
                        after: wait,
                        stray_connections: *strays,
                        last_stray,
                    },
                    HelloFor::Restart { cause, .. } => ReceiveError::NotResumed {
                        after: wait,
                        cause: Box::new(cause),
                    },
                });
            };
            let started = Instant::now();
            // The whole Hello must arrive in time, however it is spread over reads;
            // it is part of the setup the setup deadline bounds, too.
            let deadline = Deadline::new();
            deadline.arm(started + self.config.hello_timeout.min(self.config.setup_timeout));
            let stream = DeadlineStream::new(stream, deadline.clone());
            let mut control = FrameReader::new(Box::new(stream), "control");
            match control.control() {
                Ok((ControlMsg::Hello { session: other, .. }, _)) if matches!(&awaited, HelloFor::Restart { session, .. } if other != **session) =>
                {
                    *strays += 1;
                    last_stray = Some(Box::new(StrayReason::OtherSession));
                    let _ = refuse(
                        &mut control,
                        RefuseCode::HostBusy,
                        RefuseReason::HeldForRestart,
                    );
                    control.stream().shutdown();
                }
                Ok((
                    ControlMsg::Hello {
                        magic,
                        major,
                        minor,
                        session,
                        streams,
                        capabilities,
                    },
                    _,
                )) => {
                    let hello = Hello::new(magic, major, minor, session, streams, &capabilities);
                    return Ok(Caller {
                        control,
                        deadline,
                        hello,
                        started,
                    });
                }
                // A livemig source of another version whose Hello differs beyond
                // the version fields: not stray, it is told why it is refused.
                Err(TransportError::Wire {
                    source:
                        WireError::OtherVersion {
                            magic,
                            major,
                            minor,
                        },
                    ..
                }) => {
                    let why = setup_check::check_version(magic.as_str(), major, minor)
                        .err()
                        .unwrap_or(VersionRefusal::Unreadable { major, minor });
                    return Err(refuse(&mut control, RefuseCode::Version, why.into()));
                }
                // A source in doubt (or `livemig resolve`) asking for an outcome.
                Ok((ControlMsg::QueryOutcome { session }, _)) => {
                    self.outcomes.answer(&mut control, session);
                    control.stream().shutdown();
                }
                // Closed, silent, garbage, or another message: not a migration.
                Ok((other, _)) => {
                    *strays += 1;
                    last_stray = Some(Box::new(StrayReason::OpenedWith(other.name())));
                    control.stream().shutdown();
                }
                Err(e) => {
                    *strays += 1;
                    last_stray = Some(Box::new(StrayReason::Transport(e)));
                    control.stream().shutdown();
                }
            }
        }
    }

    /// Version, then this host's capacity (taking a slot), then the stream count;
    /// each failure is a refusal sent to the source.
    fn check_hello(
        &self,
        control: &mut FrameReader,
        hello: &Hello,
        permit: &mut Option<Permit>,
    ) -> Result<(), ReceiveError> {
        if let Err(why) = setup_check::check_version(&hello.magic, hello.major, hello.minor) {
            return Err(refuse(control, RefuseCode::Version, why.into()));
        }
        if permit.is_none() {
            if let Some(l) = &self.limiter {
                match l.try_acquire() {
                    Some(p) => *permit = Some(p),
                    None => {
                        return Err(refuse(
                            control,
                            RefuseCode::HostBusy,
                            RefuseReason::HostBusy { limit: l.limit() },
                        ))
                    }
                }
            }
        }
        let streams = hello.streams;
        if streams == 0 || streams > self.config.max_streams {
            return Err(refuse(
                control,
                RefuseCode::Other,
                RefuseReason::Streams {
                    requested: streams,
                    max: self.config.max_streams,
                },
            ));
        }
        Ok(())
    }
}
