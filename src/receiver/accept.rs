//! Phase 3, accept: take the source's page streams, each opened by a
//! `StreamHello` carrying the session's token and a stream index.

use super::{protocol_error, transport_error, ReceiveError, Receiver};
use crate::session::SessionToken;
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

impl Receiver {
    /// Accept `streams` page streams of session `session`.
    pub(super) fn accept_page_streams(
        &self,
        acceptor: &dyn Acceptor,
        session: &SessionToken,
        streams: u16,
    ) -> Result<Vec<PageStream>, ReceiveError> {
        const PHASE: &str = "accepting page streams";
        let mut accepted = Vec::with_capacity(streams as usize);
        let mut seen = vec![false; streams as usize];
        for _ in 0..streams {
            let stream = acceptor
                .accept(self.config.accept_timeout)
                .map_err(transport_error(PHASE))?;
            let mut reader = FrameReader::new(stream, "page");
            match reader.control().map_err(transport_error(PHASE))?.0 {
                ControlMsg::StreamHello { session: s, index }
                    if s == *session && (index as usize) < seen.len() && !seen[index as usize] =>
                {
                    seen[index as usize] = true;
                    let _ = reader
                        .stream()
                        .set_read_timeout(Some(self.config.idle_timeout));
                    accepted.push(PageStream { index, reader });
                }
                other => {
                    return Err(protocol_error(
                        PHASE,
                        format!("bad stream hello ({other:?})"),
                    ))
                }
            }
        }
        Ok(accepted)
    }
}
