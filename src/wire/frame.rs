//! The 16-byte frame header.

use super::{WireError, MAX_BATCH_DATA, MAX_BATCH_META, MAX_CONTROL_DATA, MAX_CONTROL_META};

/// Header length in bytes.
pub const FRAME_HEADER_LEN: usize = 16;
/// "LM" little-endian.
pub const FRAME_MAGIC: u16 = u16::from_le_bytes(*b"LM");

/// What a frame carries. 0 is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON control message in meta, optional binary attachment in data.
    Control = 1,
    /// A batch of pages: [`super::BatchMeta`] in meta, encoded payload in data.
    Batch = 2,
    /// End of a round on this stream: meta = round u32, batches u32, pages u64.
    RoundEnd = 3,
    /// This page stream is finished (after the final round).
    StreamEnd = 4,
}

impl FrameKind {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => Self::Control,
            2 => Self::Batch,
            3 => Self::RoundEnd,
            4 => Self::StreamEnd,
            other => return Err(WireError::BadKind(other)),
        })
    }

    /// (max meta, max data) for this kind.
    pub fn bounds(self) -> (usize, usize) {
        match self {
            Self::Control => (MAX_CONTROL_META, MAX_CONTROL_DATA),
            Self::Batch => (MAX_BATCH_META, MAX_BATCH_DATA),
            Self::RoundEnd => (16, 0),
            Self::StreamEnd => (16, 0),
        }
    }
}

/// How large a control frame's attachment may be, by message. The protocol bound
/// ([`MAX_CONTROL_DATA`]) is the ceiling; a reader passes the caps of the phase it
/// is in, and every message other than `Setup` and `DeviceState` carries none.
/// The header's `data_len` is checked against [`AttachmentCaps::largest`] before a
/// byte of the frame body is read or allocated, and against the message's own cap
/// once the message is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttachmentCaps {
    /// Largest `Setup` attachment (VM config blob plus participants' setup info).
    pub setup: usize,
    /// Largest `DeviceState` attachment (the device-state envelope).
    pub device_state: usize,
    /// Largest `Resumed` attachment (the held runs).
    pub resumed: usize,
}

impl AttachmentCaps {
    /// No attachment at all (every control message but `Setup` and `DeviceState`).
    pub const NONE: Self = Self {
        setup: 0,
        device_state: 0,
        resumed: 0,
    };

    /// A source's cap when resuming: the largest held-run list.
    pub const RESUMED: Self = Self {
        setup: 0,
        device_state: 0,
        resumed: super::resume::MAX_HELD_RUNS * super::resume::HELD_RUN_LEN,
    };

    /// The largest attachment any message may carry under these caps.
    pub fn largest(&self) -> usize {
        self.setup
            .max(self.device_state)
            .max(self.resumed)
            .min(MAX_CONTROL_DATA)
    }

    /// The cap for `msg`, and a name for it in errors.
    pub fn for_message(&self, msg: &super::ControlMsg) -> (usize, &'static str) {
        match msg {
            super::ControlMsg::Setup { .. } => (self.setup, "setup attachment"),
            super::ControlMsg::DeviceState => (self.device_state, "device-state attachment"),
            super::ControlMsg::Resumed { .. } => (self.resumed, "held-run list"),
            _ => (0, "control attachment"),
        }
    }

    /// Check a declared attachment length against the phase's largest cap.
    pub fn check_declared(&self, data_len: u32) -> Result<(), WireError> {
        if data_len as usize > self.largest() {
            return Err(WireError::TooLong {
                what: "control attachment",
                len: data_len as usize,
                max: self.largest(),
            });
        }
        Ok(())
    }

    /// Check a received attachment against `msg`'s own cap.
    pub fn check_message(&self, msg: &super::ControlMsg, len: usize) -> Result<(), WireError> {
        let (max, what) = self.for_message(msg);
        if len > max {
            return Err(WireError::TooLong { what, len, max });
        }
        Ok(())
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame kind.
    pub kind: FrameKind,
    /// Kind-specific flags (0 for now).
    pub flags: u8,
    /// Meta section length.
    pub meta_len: u32,
    /// Data section length.
    pub data_len: u32,
    /// crc32c (see module docs).
    pub crc: u32,
}

impl FrameHeader {
    /// Serialize; `crc` must already be set (see [`FrameHeader::seal`]).
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..2].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[2] = self.kind as u8;
        b[3] = self.flags;
        b[4..8].copy_from_slice(&self.meta_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.data_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Build a header for `meta`/`data` and compute its checksum.
    pub fn seal(kind: FrameKind, flags: u8, meta: &[u8], data: &[u8]) -> Self {
        let mut h = Self {
            kind,
            flags,
            meta_len: meta.len() as u32,
            data_len: data.len() as u32,
            crc: 0,
        };
        h.crc = h.compute_crc(
            meta,
            if kind == FrameKind::Control {
                data
            } else {
                &[]
            },
        );
        h
    }

    /// The checksum over header bytes 0..12, `meta` and (control frames) `data`.
    pub fn compute_crc(&self, meta: &[u8], data: &[u8]) -> u32 {
        let head = self.encode();
        let c = crc32c::crc32c(&head[..12]);
        let c = crc32c::crc32c_append(c, meta);
        crc32c::crc32c_append(c, data)
    }

    /// Parse and bound-check a header. Never allocates, never panics.
    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<Self, WireError> {
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != FRAME_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let kind = FrameKind::from_u8(b[2])?;
        let flags = b[3];
        let meta_len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let data_len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let crc = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let (max_meta, max_data) = kind.bounds();
        if meta_len as usize > max_meta {
            return Err(WireError::TooLong {
                what: "meta",
                len: meta_len as usize,
                max: max_meta,
            });
        }
        if data_len as usize > max_data {
            return Err(WireError::TooLong {
                what: "data",
                len: data_len as usize,
                max: max_data,
            });
        }
        Ok(Self {
            kind,
            flags,
            meta_len,
            data_len,
            crc,
        })
    }

    /// Verify the checksum against received sections.
    pub fn verify(&self, meta: &[u8], data: &[u8]) -> Result<(), WireError> {
        let actual = self.compute_crc(
            meta,
            if self.kind == FrameKind::Control {
                data
            } else {
                &[]
            },
        );
        if actual != self.crc {
            return Err(WireError::Checksum {
                expected: self.crc,
                actual,
            });
        }
        Ok(())
    }
}

/// A decoded frame: header, meta, data and the number of bytes consumed.
pub type DecodedFrame<'a> = (FrameHeader, &'a [u8], &'a [u8], usize);

/// Decode a whole frame from a byte slice (used by the fuzzer and corpus tests):
/// returns the header, meta and data, and the number of bytes consumed.
pub fn decode_frame(buf: &[u8]) -> Result<DecodedFrame<'_>, WireError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Err(WireError::Truncated("frame header"));
    }
    let mut hb = [0u8; FRAME_HEADER_LEN];
    hb.copy_from_slice(&buf[..FRAME_HEADER_LEN]);
    let h = FrameHeader::decode(&hb)?;
    let meta_end = FRAME_HEADER_LEN + h.meta_len as usize;
    let end = meta_end + h.data_len as usize;
    if buf.len() < end {
        return Err(WireError::Truncated("frame body"));
    }
    let meta = &buf[FRAME_HEADER_LEN..meta_end];
    let data = &buf[meta_end..end];
    h.verify(meta, data)?;
    Ok((h, meta, data, end))
}

/// Meta of a RoundEnd frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// Round number.
    pub round: u32,
    /// Batches this stream sent in the round.
    pub batches: u32,
    /// Pages this stream sent in the round.
    pub pages: u64,
}

impl RoundEnd {
    /// Serialize (16 bytes).
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.round.to_le_bytes());
        b[4..8].copy_from_slice(&self.batches.to_le_bytes());
        b[8..16].copy_from_slice(&self.pages.to_le_bytes());
        b
    }
    /// Parse.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() != 16 {
            return Err(WireError::Truncated("round end"));
        }
        Ok(Self {
            round: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            batches: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            pages: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejections() {
        let h = FrameHeader::seal(FrameKind::Control, 0, b"{}", b"xy");
        let b = h.encode();
        assert_eq!(FrameHeader::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[0] = 0;
        assert!(matches!(
            FrameHeader::decode(&bad),
            Err(WireError::BadMagic(_))
        ));
        let mut bad = b;
        bad[2] = 0;
        assert_eq!(FrameHeader::decode(&bad), Err(WireError::BadKind(0)));
        let mut bad = b;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&bad),
            Err(WireError::TooLong { .. })
        ));
        let mut frame = b.to_vec();
        frame.extend_from_slice(b"{}xy");
        assert!(decode_frame(&frame).is_ok());
        frame[17] ^= 1;
        assert!(matches!(
            decode_frame(&frame),
            Err(WireError::Checksum { .. })
        ));
    }
}
