//! Setup stage (source side): handshake, VM configuration, page streams.
//!
//! A connection lost before round 0 starts (closed, reset, silent past a
//! deadline: [`super::resume::is_lost_connection`]) does not fail the migration:
//! [`establish`] starts the setup over on new connections, with the same session
//! token, within [`MigrationConfig::reconnect_timeout`] and with the backoff of
//! resumption. Nothing was sent and the VM was not touched, so there is nothing
//! to keep. A refusal, a veto, a corrupt frame or a cancel ends it as before
//! (docs/PROTOCOL.md, "Setup restart").
//!
//! [`MigrationConfig::reconnect_timeout`]: super::MigrationConfig::reconnect_timeout

use std::time::{Duration, Instant};

use super::resume::{is_lost_connection, Retry};
use super::{Migration, MigrationError};
use crate::session::SessionToken;
use crate::stats::Event;
use crate::transport::framed::{FrameReader, FrameWriter};
use crate::transport::{Connector, TransportError};
use crate::wire::{
    ControlMsg, ProtocolViolation, CAPABILITIES, PROTOCOL_MAJOR, PROTOCOL_MINOR, SETUP_RESTART,
};

/// Longest a source waits in a serving destination's queue (`ControlMsg::Queued`
/// notices) before giving up; the destination bounds the wait too.
pub const MAX_QUEUE_WAIT: Duration = Duration::from_secs(3600);

/// An established session.
#[derive(Debug)]
pub struct Session {
    /// Control stream (bidirectional).
    pub control: FrameReader,
    /// Page streams.
    pub pages: Vec<FrameWriter>,
    /// This migration's token, sent in `Hello` and on every page stream.
    pub session: SessionToken,
    /// Round-trip time of the setup exchange (a floor for the commit round trip).
    pub rtt: Duration,
    /// The destination can resume this session after a broken connection
    /// (capability `resume`).
    pub resumable: bool,
    /// The destination answers `Drain` (capability `drain`).
    pub drains: bool,
    /// Times the setup started over after a lost connection.
    pub restarts: u32,
}

/// A session resumed on new connections (see [`reconnect`]).
#[derive(Debug)]
pub struct Reconnected {
    /// The new control stream.
    pub control: FrameReader,
    /// The new page streams.
    pub pages: Vec<FrameWriter>,
    /// Rounds every page stream completed at the destination.
    pub complete_rounds: u32,
    /// Pages of later rounds the destination holds.
    pub held: Vec<crate::wire::resume::HeldRun>,
}

fn transport_error(phase: &'static str) -> impl Fn(TransportError) -> MigrationError {
    move |source| MigrationError::Transport { phase, source }
}

/// Set up the session, starting over while the connection is lost before
/// round 0 (see the module docs). Nothing has touched the VM yet, so a failure
/// here needs no rollback.
pub fn establish(m: &Migration, connector: &dyn Connector) -> Result<Session, MigrationError> {
    let session = SessionToken::generate()?;
    let budget = m.config.reconnect_timeout;
    let first = match connect(m, connector, session, m.config.reply_timeout) {
        Ok(s) => return Ok(s),
        Err(f) => f,
    };
    // Never reached the destination (nothing to lose), or it will not take the
    // token again, or the failure is not a lost connection: fail as it is.
    if budget.is_zero() || !first.connected || !first.peer_restarts {
        return Err(first.error);
    }
    if !is_lost_connection(&first.error) {
        return Err(first.error);
    }
    let cause = first.error;
    if let Some(p) = &m.progress {
        p.on_event(&Event::Reconnecting {
            phase: "setup".into(),
            round: 0,
            error: cause.to_string(),
        });
    }
    let mut retry = Retry::new(budget);
    let mut last = None;
    loop {
        if m.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let Some(left) = retry.left() else {
            return Err(retry.failed(cause, last));
        };
        retry.attempts += 1;
        match connect(m, connector, session, m.config.reply_timeout.min(left)) {
            Ok(mut s) => {
                s.restarts = 1;
                return Ok(s);
            }
            Err(f) if f.peer_restarts && is_lost_connection(&f.error) => last = Some(f.error),
            // Refused (too many restarts, another session holds the
            // destination), vetoed, or a broken protocol.
            Err(f) => return Err(retry.failed(cause, Some(f.error))),
        }
        retry.back_off(&m.cancel);
    }
}

/// A setup attempt that failed, and how far it got.
#[derive(Debug)]
struct SetupFailed {
    error: MigrationError,
    /// The control connection was made (and the `Hello` perhaps delivered).
    connected: bool,
    /// The destination takes a `Hello` with this token again: its `Welcome`
    /// listed `setup-restart`, or no `Welcome` arrived (a destination that never
    /// read the `Hello` takes it as new).
    peer_restarts: bool,
}

/// One setup attempt for `session`: connect, negotiate, send the VM
/// configuration and open the page streams; every answer within `reply_timeout`.
fn connect(
    m: &Migration,
    connector: &dyn Connector,
    session: SessionToken,
    reply_timeout: Duration,
) -> Result<Session, SetupFailed> {
    let mut connected = false;
    let mut peer_restarts = true;
    attempt(
        m,
        connector,
        session,
        reply_timeout,
        &mut connected,
        &mut peer_restarts,
    )
    .map_err(|error| SetupFailed {
        error,
        connected,
        peer_restarts,
    })
}

/// The body of [`connect`], recording how far it got.
fn attempt(
    m: &Migration,
    connector: &dyn Connector,
    session: SessionToken,
    reply_timeout: Duration,
    connected: &mut bool,
    peer_restarts: &mut bool,
) -> Result<Session, MigrationError> {
    let stream = connector.connect().map_err(transport_error("connect"))?;
    *connected = true;
    stream
        .set_read_timeout(Some(reply_timeout))
        .map_err(|e| MigrationError::Transport {
            phase: "connect",
            source: TransportError::Io {
                what: "control",
                source: e,
            },
        })?;
    let mut control = FrameReader::new(stream, "control");
    // A source that never reconnects does not offer to start over.
    let restarts = !m.config.reconnect_timeout.is_zero();
    let hello = ControlMsg::Hello {
        magic: "livemig".into(),
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
        session,
        streams: m.config.streams,
        capabilities: CAPABILITIES
            .iter()
            .filter(|c| restarts || **c != SETUP_RESTART)
            .map(|s| s.to_string())
            .collect(),
    };
    let t0 = Instant::now();
    control
        .send_control(&hello, &[])
        .map_err(transport_error("handshake"))?;
    // A queued hello is answered `Queued` at once, so the first answer, whichever
    // it is, times the round trip.
    let mut rtt = None;
    let reply = loop {
        let reply = control.control().map_err(transport_error("handshake"))?.0;
        let rtt = *rtt.get_or_insert_with(|| t0.elapsed());
        match reply {
            ControlMsg::Queued { limit, waiting } => {
                if t0.elapsed() > MAX_QUEUE_WAIT {
                    return Err(MigrationError::QueuedTooLong {
                        after: MAX_QUEUE_WAIT,
                        limit,
                        waiting,
                    });
                }
            }
            other => break (other, rtt),
        }
    };
    let (reply, rtt) = reply;
    let (resumable, drains) = match reply {
        ControlMsg::Welcome { capabilities, .. } => {
            *peer_restarts = capabilities.iter().any(|c| c == SETUP_RESTART);
            if m.config.delta && !capabilities.iter().any(|c| c == "delta-xor") {
                return Err(MigrationError::Protocol {
                    phase: "handshake",
                    violation: ProtocolViolation::MissingCapability {
                        capability: "delta-xor",
                        wanted: "delta encoding",
                    },
                });
            }
            let has = |cap: &str| capabilities.iter().any(|c| c == cap);
            (has("resume"), has("drain"))
        }
        other => return Err(unexpected_answer(other, "handshake", "welcome or refuse")),
    };

    // Setup: layout + compat + opaque config + each participant's setup info.
    let mut attachment = m.config.vm_config.clone();
    let mut participants = Vec::new();
    for p in &m.participants {
        let info = p.setup_info();
        participants.push((p.id().to_string(), info.len() as u64));
        attachment.extend_from_slice(&info);
    }
    let setup = ControlMsg::Setup {
        layout: m.memory.layout(),
        compat: match &m.config.processor_compat {
            Some(common) => crate::compat::restrict_cpu_features(&m.config.compat, common),
            None => m.config.compat.clone(),
        },
        config_len: m.config.vm_config.len() as u64,
        participants,
    };
    control
        .send_control(&setup, &attachment)
        .map_err(transport_error("setup"))?;
    match control.control().map_err(transport_error("setup"))?.0 {
        ControlMsg::SetupOk => {}
        ControlMsg::Veto {
            participant,
            reason,
        } => {
            return Err(MigrationError::Vetoed(super::error::peer_veto(
                participant,
                reason,
            )))
        }
        other => {
            return Err(unexpected_answer(
                other,
                "setup",
                "setup-ok, refuse or veto",
            ))
        }
    }

    let pages = open_page_streams(m, connector, session)?;
    Ok(Session {
        control,
        pages,
        session,
        rtt,
        resumable,
        drains,
        restarts: 0,
    })
}

/// Open the page streams of `session`, each with its `StreamHello`.
fn open_page_streams(
    m: &Migration,
    connector: &dyn Connector,
    session: SessionToken,
) -> Result<Vec<FrameWriter>, MigrationError> {
    let mut pages = Vec::with_capacity(m.config.streams as usize);
    for index in 0..m.config.streams {
        let mut s = connector
            .connect()
            .map_err(transport_error("opening page streams"))?;
        if let Some(bucket) = &m.config.bandwidth {
            s = Box::new(crate::transport::shaped::ShapedStream::new(
                s,
                bucket.clone(),
            ));
        }
        let mut w = FrameWriter::new(s, "page");
        if m.config.splice {
            w.enable_splice();
        }
        w.send_control(&ControlMsg::StreamHello { session, index }, &[])
            .map_err(transport_error("opening page streams"))?;
        pages.push(w);
    }
    Ok(pages)
}

/// One attempt to resume `session` on new connections, going on with `round`:
/// `Resume` on a new control stream, the destination's `Resumed` (what it holds),
/// then the page streams. Each wait is bounded by `reply_timeout`.
pub fn reconnect(
    m: &Migration,
    connector: &dyn Connector,
    session: SessionToken,
    round: u32,
    reply_timeout: Duration,
) -> Result<Reconnected, MigrationError> {
    const PHASE: &str = "resuming";
    let stream = connector.connect().map_err(transport_error(PHASE))?;
    stream
        .set_read_timeout(Some(reply_timeout))
        .map_err(|e| MigrationError::Transport {
            phase: PHASE,
            source: TransportError::Io {
                what: "control",
                source: e,
            },
        })?;
    let mut control = FrameReader::new(stream, "control");
    let resume = ControlMsg::Resume {
        magic: "livemig".into(),
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
        session,
        streams: m.config.streams,
        round,
    };
    control
        .send_control(&resume, &[])
        .map_err(transport_error(PHASE))?;
    let (reply, attachment) = control
        .control_capped(&crate::wire::frame::AttachmentCaps::RESUMED)
        .map_err(transport_error(PHASE))?;
    let (complete_rounds, held) = match reply {
        ControlMsg::Resumed {
            complete_rounds,
            held_runs,
        } => {
            let held =
                crate::wire::resume::decode_runs(&attachment, held_runs, m.memory.total_pages())
                    .map_err(|e| MigrationError::Protocol {
                        phase: PHASE,
                        violation: e.into(),
                    })?;
            (complete_rounds, held)
        }
        other => return Err(unexpected_answer(other, PHASE, "resumed or refuse")),
    };
    let pages = open_page_streams(m, connector, session)?;
    Ok(Reconnected {
        control,
        pages,
        complete_rounds,
        held,
    })
}

/// The error for an answer other than the one expected: the destination's
/// refusal or error as it sent it, or a protocol violation naming what came.
fn unexpected_answer(
    msg: ControlMsg,
    phase: &'static str,
    expected: &'static str,
) -> MigrationError {
    match msg {
        ControlMsg::Refuse { code, message } => MigrationError::Refused {
            code,
            message: message.into(),
        },
        ControlMsg::Error { message } => MigrationError::Remote(message.into()),
        other => MigrationError::Protocol {
            phase,
            violation: ProtocolViolation::Unexpected {
                expected,
                got: other.name(),
            },
        },
    }
}
