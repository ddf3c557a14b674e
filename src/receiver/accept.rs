//! Phase 3, accept: take the source's page streams, each opened by a
//! `StreamHello` carrying the session's token and a stream index.
//!
//! A connection whose first frame is not a `StreamHello` for this session (a wrong
//! token, an index out of range or already taken, another message, garbage, a close
//! or silence past [`ReceiverConfig::hello_timeout`]) is dropped and counted;
//! accepting goes on until every stream is in or
//! [`ReceiverConfig::accept_timeout`] has passed since setup.
//!
//! Two connections of the session itself end the wait early: a `Hello` with
//! its token (the source lost its connection while setting up and starts over)
//! and a `Resume` with its token (the source lost it after opening the page
//! streams, before this side had taken them all, or while resuming). The caller
//! decides what each means in its phase.
//!
//! [`ReceiverConfig::hello_timeout`]: super::ReceiverConfig::hello_timeout
//! [`ReceiverConfig::accept_timeout`]: super::ReceiverConfig::accept_timeout

use std::time::Instant;

use super::handshake::{Caller, Hello};
use super::resume::ResumeRequest;
use super::{next_connection, Awaited, ReceiveError, Receiver, StrayReason};
use crate::session::{Deadline, DeadlineStream, SessionToken};
use crate::transport::framed::FrameReader;
use crate::transport::Acceptor;
use crate::wire::ControlMsg;

/// One accepted page stream, past its `StreamHello`.
pub(super) struct PageStream {
    /// The index the source gave it (0-based, unique in the session).
    pub index: u16,
    /// The stream, its read timeout set to the idle timeout.
    pub reader: FrameReader,
}

/// What accepting hands to the rounds.
pub(super) struct PageStreams {
    /// Every page stream of the session, in arrival order.
    pub streams: Vec<PageStream>,
    /// Connections dropped while accepting.
    pub stray_connections: u32,
}

/// How accepting ended.
pub(super) enum Accepted {
    /// Every page stream is in.
    Streams(PageStreams),
    /// The source starts the setup over: a `Hello` with the session's token.
    Restart {
        /// The new control connection, its `Hello` read.
        caller: Caller,
        /// Connections dropped before it.
        stray_connections: u32,
    },
    /// The source resumes the session: a `Resume` with its token.
    Resume {
        /// The new control connection, its `Resume` read.
        request: ResumeRequest,
        /// Connections dropped before it.
        stray_connections: u32,
    },
}

impl Receiver {
    /// Accept the `streams` page streams of session `session`, dropping strays,
    /// unless the session's source comes back first (see the module docs).
    /// `strays_before` (from the handshake) only goes into a timeout's message.
    pub(super) fn accept_page_streams(
        &self,
        acceptor: &dyn Acceptor,
        session: &SessionToken,
        streams: u16,
        strays_before: u32,
    ) -> Result<Accepted, ReceiveError> {
        const PHASE: &str = "accepting page streams";
        let give_up = Instant::now() + self.config.accept_timeout;
        let mut accepted = Vec::with_capacity(streams as usize);
        let mut seen = vec![false; streams as usize];
        let mut stray_connections = 0;
        let mut last_stray = None;
        while accepted.len() < streams as usize {
            let Some(stream) = next_connection(PHASE, acceptor, give_up)? else {
                return Err(ReceiveError::TimedOut {
                    phase: PHASE,
                    what: Awaited::PageStreams {
                        arrived: accepted.len(),
                        expected: streams,
                    },
                    after: self.config.accept_timeout,
                    stray_connections: strays_before + stray_connections,
                    last_stray,
                });
            };
            let started = Instant::now();
            let deadline = Deadline::new();
            deadline.arm(started + self.config.hello_timeout);
            let stream = DeadlineStream::new(stream, deadline.clone());
            let mut reader = FrameReader::new(Box::new(stream), "page");
            match reader.control() {
                Ok((
                    ControlMsg::Hello {
                        magic,
                        major,
                        minor,
                        session: s,
                        streams: n,
                        capabilities,
                    },
                    _,
                )) if s == *session => {
                    let hello = Hello::new(magic, major, minor, s, n, &capabilities);
                    return Ok(Accepted::Restart {
                        caller: Caller {
                            control: FrameReader::new(reader.into_stream(), "control"),
                            deadline,
                            hello,
                            started,
                        },
                        stray_connections,
                    });
                }
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
                    return Ok(Accepted::Resume {
                        request: ResumeRequest {
                            control: FrameReader::new(reader.into_stream(), "control"),
                            deadline,
                            magic,
                            major,
                            minor,
                            streams: n,
                            round,
                        },
                        stray_connections,
                    });
                }
                Ok((ControlMsg::StreamHello { session: s, index }, _))
                    if s == *session && seen.get(index as usize) == Some(&false) =>
                {
                    seen[index as usize] = true;
                    deadline.disarm();
                    let _ = reader
                        .stream()
                        .set_read_timeout(Some(self.config.idle_timeout));
                    accepted.push(PageStream { index, reader });
                }
                Ok((other, _)) => {
                    stray_connections += 1;
                    last_stray = Some(Box::new(match other {
                        ControlMsg::StreamHello { index, .. } => {
                            StrayReason::UnawaitedStream { index }
                        }
                        other => StrayReason::OpenedWith(other.name()),
                    }));
                    reader.stream().shutdown();
                }
                Err(e) => {
                    stray_connections += 1;
                    last_stray = Some(Box::new(StrayReason::Transport(e)));
                    reader.stream().shutdown();
                }
            }
        }
        Ok(Accepted::Streams(PageStreams {
            streams: accepted,
            stray_connections,
        }))
    }
}
