//! Phase 1, handshake: take the control connection, check the source's `Hello`
//! (version, this host's capacity, stream count) and answer `Welcome`.

use std::time::Instant;

use super::{protocol_error, refuse, setup_check, transport_error, Permit, ReceiveError, Receiver};
use crate::session::SessionToken;
use crate::transport::framed::FrameReader;
use crate::transport::{Acceptor, TransportError};
use crate::wire::control::RefuseCode;
use crate::wire::{ControlMsg, WireError, CAPABILITIES, PROTOCOL_MAJOR, PROTOCOL_MINOR};

/// What the handshake hands to setup and the phases after it.
pub(super) struct Handshake {
    /// The control stream, past `Welcome`.
    pub control: FrameReader,
    /// The session's token: every page stream must present it.
    pub session: SessionToken,
    /// Page streams the source will open.
    pub streams: u16,
    /// This migration's slot on the host (held until the receiver returns).
    pub permit: Option<Permit>,
    /// When the control connection arrived (the report's `total_ms` starts here).
    pub started: Instant,
}

impl Receiver {
    /// Accept the control stream and agree on version, capacity and streams.
    pub(super) fn handshake(&mut self, acceptor: &dyn Acceptor) -> Result<Handshake, ReceiveError> {
        const PHASE: &str = "handshake";
        let stream = acceptor
            .accept(self.config.accept_timeout)
            .map_err(transport_error("accept"))?;
        let started = Instant::now();
        let _ = stream.set_read_timeout(Some(self.config.accept_timeout));
        let mut control = FrameReader::new(stream, "control");
        let (magic, major, minor, session, streams) = match control.control() {
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
            )) => (magic, major, minor, session, streams),
            Ok((other, _)) => {
                return Err(protocol_error(
                    PHASE,
                    format!("expected hello, got {}", other.name()),
                ))
            }
            // A source of another version whose Hello differs beyond the version.
            Err(TransportError::Wire {
                source:
                    WireError::OtherVersion {
                        magic,
                        major,
                        minor,
                    },
                ..
            }) => {
                let message = setup_check::check_version(&magic, major, minor)
                    .err()
                    .unwrap_or_else(|| format!("unreadable hello of version {major}.{minor}"));
                return Err(refuse(&mut control, RefuseCode::Version, message));
            }
            Err(e) => return Err(transport_error(PHASE)(e)),
        };
        let permit = self.check_hello(&mut control, &magic, major, minor, streams)?;
        let welcome = ControlMsg::Welcome {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            capabilities: CAPABILITIES.iter().map(|s| s.to_string()).collect(),
        };
        control
            .send_control(&welcome, &[])
            .map_err(transport_error(PHASE))?;
        Ok(Handshake {
            control,
            session,
            streams,
            permit,
            started,
        })
    }

    /// Version, then this host's capacity (taking a slot), then the stream count;
    /// each failure is a refusal sent to the source.
    fn check_hello(
        &self,
        control: &mut FrameReader,
        magic: &str,
        major: u16,
        minor: u16,
        streams: u16,
    ) -> Result<Option<Permit>, ReceiveError> {
        if let Err(message) = setup_check::check_version(magic, major, minor) {
            return Err(refuse(control, RefuseCode::Version, message));
        }
        let permit = match &self.limiter {
            None => None,
            Some(l) => match l.try_acquire() {
                Some(p) => Some(p),
                None => {
                    return Err(refuse(
                        control,
                        RefuseCode::HostBusy,
                        format!(
                            "this host already runs {} incoming migration(s), its limit; retry when one finishes",
                            l.limit()
                        ),
                    ))
                }
            },
        };
        if streams == 0 || streams > self.config.max_streams {
            return Err(refuse(
                control,
                RefuseCode::Other,
                format!(
                    "{streams} page streams requested; this destination accepts 1 to {}",
                    self.config.max_streams
                ),
            ));
        }
        Ok(permit)
    }
}
