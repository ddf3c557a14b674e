//! A connection's first frame: what the connection opens.
//!
//! Nothing in it is trusted: it is read under a deadline, with a bound far below
//! the protocol's control-frame limits, and its checksum and JSON are checked
//! before the service acts on it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::route::{token_of, Token};
use crate::wire::{ControlMsg, FrameHeader, FrameKind, WireError, FRAME_HEADER_LEN};

/// Largest meta section accepted in a connection's first frame. A `Hello` is a few
/// hundred bytes of JSON (magic, versions, token, stream count, capability names);
/// 4 KiB leaves room for many more capabilities while a peer that has not yet
/// said who it is cannot make the service allocate more than that.
pub const MAX_OPENING_META: usize = 4096;

/// What a connection's first frame asks for.
#[derive(Debug)]
pub enum Opening {
    /// A control stream's `Hello`: a new migration.
    Session {
        /// The session token the source drew.
        token: Token,
        /// Page streams the source will open.
        streams: u16,
        /// Optional features the source offers.
        capabilities: Vec<String>,
        /// The frame as read, to replay to the receiver.
        bytes: Vec<u8>,
    },
    /// A control stream's `Resume`, to resume the session with `token` after its
    /// connection broke.
    Resume {
        /// The session it names.
        token: Token,
        /// The frame as read, to replay to the receiver.
        bytes: Vec<u8>,
    },
    /// A page stream's `StreamHello`, to join the session with `token`.
    Stream {
        /// The session it names.
        token: Token,
        /// Its index.
        index: u16,
        /// The frame as read, to replay to the receiver.
        bytes: Vec<u8>,
    },
}

/// Why a connection's first frame was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum OpeningError {
    /// The peer closed before a whole frame arrived (a port scan, a health check).
    #[error("closed before its first frame was complete")]
    Closed,
    /// The peer stayed silent (or trickled) past the deadline.
    #[error("no complete first frame within {0:?}")]
    TimedOut(Duration),
    /// Reading failed.
    #[error("reading its first frame failed: {0}")]
    Io(#[source] std::io::Error),
    /// Not a well-formed livemig control frame.
    #[error("its first frame is not a valid livemig control frame: {0}")]
    Wire(#[source] WireError),
    /// A well-formed frame that opens nothing.
    #[error("its first frame is a {0}, not a hello, a resume or a stream hello")]
    Unexpected(&'static str),
}

/// Read the first frame from `r` within `deadline`.
pub async fn read_opening<R: AsyncRead + Unpin>(
    r: &mut R,
    deadline: Duration,
) -> Result<Opening, OpeningError> {
    tokio::time::timeout(deadline, read(r))
        .await
        .map_err(|_| OpeningError::TimedOut(deadline))?
}

async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Opening, OpeningError> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => OpeningError::Closed,
        _ => OpeningError::Io(e),
    };
    let mut head = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut head).await.map_err(io)?;
    let h = FrameHeader::decode(&head).map_err(OpeningError::Wire)?;
    if h.kind != FrameKind::Control {
        return Err(OpeningError::Unexpected(match h.kind {
            FrameKind::Control => "control frame",
            FrameKind::Batch => "batch frame",
            FrameKind::RoundEnd => "round-end frame",
            FrameKind::StreamEnd => "stream-end frame",
        }));
    }
    // Neither hello carries an attachment.
    if h.data_len != 0 {
        return Err(OpeningError::Wire(WireError::TooLong {
            what: "first frame's data",
            len: h.data_len as usize,
            max: 0,
        }));
    }
    if h.meta_len as usize > MAX_OPENING_META {
        return Err(OpeningError::Wire(WireError::TooLong {
            what: "first frame's meta",
            len: h.meta_len as usize,
            max: MAX_OPENING_META,
        }));
    }
    let mut bytes = Vec::with_capacity(FRAME_HEADER_LEN + h.meta_len as usize);
    bytes.extend_from_slice(&head);
    bytes.resize(FRAME_HEADER_LEN + h.meta_len as usize, 0);
    r.read_exact(&mut bytes[FRAME_HEADER_LEN..])
        .await
        .map_err(io)?;
    let meta = &bytes[FRAME_HEADER_LEN..];
    h.verify(meta, &[]).map_err(OpeningError::Wire)?;
    let msg = ControlMsg::decode(meta).map_err(OpeningError::Wire)?;
    match msg {
        ControlMsg::Hello {
            streams,
            ref capabilities,
            ..
        } => Ok(Opening::Session {
            token: token_of(&msg).expect("a hello carries a token"),
            streams,
            capabilities: capabilities.clone(),
            bytes,
        }),
        ControlMsg::Resume { .. } => Ok(Opening::Resume {
            token: token_of(&msg).expect("a resume carries a token"),
            bytes,
        }),
        ControlMsg::StreamHello { index, .. } => Ok(Opening::Stream {
            token: token_of(&msg).expect("a stream hello carries a token"),
            index,
            bytes,
        }),
        other => Err(OpeningError::Unexpected(other.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionToken;
    use crate::transport::framed::write_frame;

    fn frame(msg: &ControlMsg) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, FrameKind::Control, 0, &msg.encode(), &[]).unwrap();
        v
    }

    fn open(bytes: &[u8]) -> Result<Opening, OpeningError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut r = bytes;
        rt.block_on(read_opening(&mut r, Duration::from_secs(5)))
    }

    #[test]
    fn classifies_hellos_and_keeps_their_bytes() {
        let hello = ControlMsg::Hello {
            magic: "livemig".into(),
            major: crate::wire::PROTOCOL_MAJOR,
            minor: crate::wire::PROTOCOL_MINOR,
            session: SessionToken::from_bytes([7; 16]),
            streams: 3,
            capabilities: vec![],
        };
        let bytes = frame(&hello);
        match open(&bytes).unwrap() {
            Opening::Session {
                token,
                streams,
                bytes: b,
                ..
            } => {
                assert_eq!((token, streams), (SessionToken::from_bytes([7; 16]), 3));
                assert_eq!(b, bytes);
            }
            other => panic!("{other:?}"),
        }
        let sh = frame(&ControlMsg::StreamHello {
            session: SessionToken::from_bytes([7; 16]),
            index: 2,
        });
        assert!(matches!(
            open(&sh).unwrap(),
            Opening::Stream {
                token,
                index: 2,
                ..
            } if token == SessionToken::from_bytes([7; 16])
        ));
    }

    #[test]
    fn refuses_everything_else_by_name() {
        assert!(matches!(open(b""), Err(OpeningError::Closed)));
        assert!(matches!(
            open(b"GET / HTTP/1.1\r\n\r\n"),
            Err(OpeningError::Wire(WireError::BadMagic(_)))
        ));
        let mut bad_crc = frame(&ControlMsg::SetupOk);
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 1;
        assert!(matches!(
            open(&bad_crc),
            Err(OpeningError::Wire(WireError::Checksum { .. }))
        ));
        assert!(matches!(
            open(&frame(&ControlMsg::SetupOk)),
            Err(OpeningError::Unexpected("setup_ok"))
        ));
        // A large declared meta is refused from the header alone.
        let big = FrameHeader::seal(FrameKind::Control, 0, &[b' '; MAX_OPENING_META + 1], &[]);
        assert!(matches!(
            open(&big.encode()),
            Err(OpeningError::Wire(WireError::TooLong { .. }))
        ));
        let with_data = FrameHeader::seal(FrameKind::Control, 0, b"{}", b"x");
        assert!(matches!(
            open(&with_data.encode()),
            Err(OpeningError::Wire(WireError::TooLong { max: 0, .. }))
        ));
    }

    #[test]
    fn a_silent_peer_times_out() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mut a, _b) = tokio::io::duplex(64);
        let r = rt.block_on(read_opening(&mut a, Duration::from_millis(50)));
        assert!(matches!(r, Err(OpeningError::TimedOut(_))));
    }
}
