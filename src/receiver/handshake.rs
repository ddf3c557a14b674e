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
//! [`ReceiverConfig::hello_timeout`]: super::ReceiverConfig::hello_timeout
//! [`ReceiverConfig::accept_timeout`]: super::ReceiverConfig::accept_timeout

use std::time::Instant;

use super::setup_check::{RefuseReason, VersionRefusal};
use super::{
    next_connection, refuse, setup_check, transport_error, Awaited, Permit, ReceiveError, Receiver,
    StrayReason,
};
use crate::session::{Deadline, DeadlineStream, SessionToken};
use crate::transport::framed::FrameReader;
use crate::transport::{Acceptor, TransportError};
use crate::wire::control::RefuseCode;
use crate::wire::{ControlMsg, WireError, CAPABILITIES, PROTOCOL_MAJOR, PROTOCOL_MINOR};

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
    /// This migration's slot on the host (held until the receiver returns).
    pub permit: Option<Permit>,
    /// When the control connection arrived (the report's `total_ms` starts here).
    pub started: Instant,
    /// Connections dropped before the `Hello`.
    pub stray_connections: u32,
}

/// The fields of a `Hello` the receiver checks.
struct Hello {
    magic: String,
    major: u16,
    minor: u16,
    session: SessionToken,
    streams: u16,
}

/// The control connection, its first frame read.
struct Caller {
    control: FrameReader,
    deadline: Deadline,
    hello: Hello,
    started: Instant,
}

impl Receiver {
    /// Wait for the control connection and agree on version, capacity and streams.
    pub(super) fn handshake(&mut self, acceptor: &dyn Acceptor) -> Result<Handshake, ReceiveError> {
        let mut stray_connections = 0;
        let Caller {
            mut control,
            deadline,
            hello,
            started,
        } = self.await_hello(acceptor, &mut stray_connections)?;
        let permit = self.check_hello(&mut control, &hello)?;
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
            permit,
            started,
            stray_connections,
        })
    }

    /// Accept connections until one opens with a `Hello`; drop and count the rest.
    fn await_hello(
        &self,
        acceptor: &dyn Acceptor,
        strays: &mut u32,
    ) -> Result<Caller, ReceiveError> {
        let give_up = Instant::now() + self.config.accept_timeout;
        let mut last_stray = None;
        loop {
            let Some(stream) = next_connection("accept", acceptor, give_up)? else {
                return Err(ReceiveError::TimedOut {
                    phase: "accept",
                    what: Awaited::Hello,
                    after: self.config.accept_timeout,
                    stray_connections: *strays,
                    last_stray,
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
                Ok((
                    ControlMsg::Hello {
                        magic,
                        major,
                        minor,
                        session,
                        streams,
                        ..
                    },
                    _,
                )) => {
                    let hello = Hello {
                        magic,
                        major,
                        minor,
                        session,
                        streams,
                    };
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
    ) -> Result<Option<Permit>, ReceiveError> {
        if let Err(why) = setup_check::check_version(&hello.magic, hello.major, hello.minor) {
            return Err(refuse(control, RefuseCode::Version, why.into()));
        }
        let permit = match &self.limiter {
            None => None,
            Some(l) => match l.try_acquire() {
                Some(p) => Some(p),
                None => {
                    return Err(refuse(
                        control,
                        RefuseCode::HostBusy,
                        RefuseReason::HostBusy { limit: l.limit() },
                    ))
                }
            },
        };
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
        Ok(permit)
    }
}
