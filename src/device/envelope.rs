//! The device-state envelope: how participants' blobs travel at brownout.
//!
//! ```text
//! magic "LMDS" | major u16 | minor u16 | count u32
//! count × ( id_len u16 | id | version u32 | len u32 | crc32c u32 | blob[len] )
//! ```
//! Decoding rejects a wrong magic, a different major or a newer minor version, any
//! length over its cap, a bad checksum, duplicate ids and trailing bytes, all before
//! anything is handed to a participant.

use crate::wire::PeerText;

/// Envelope magic.
pub const MAGIC: [u8; 4] = *b"LMDS";
/// Format major version (must match).
pub const MAJOR: u16 = 1;
/// Format minor version (a reader accepts equal or older).
pub const MINOR: u16 = 0;
/// Most entries in one envelope.
pub const MAX_ENTRIES: usize = 4096;
/// Longest participant id.
pub const MAX_ID_LEN: usize = 256;
/// Largest single blob.
pub const MAX_BLOB_LEN: usize = 32 * 1024 * 1024;

/// Envelope decoding errors. Ids quoted here come from the peer's envelope and
/// are [`PeerText`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Not a device-state envelope.
    #[error("device-state envelope has a bad magic")]
    BadMagic,
    /// Incompatible version.
    #[error("device-state envelope version {major}.{minor} is not supported (this side reads {MAJOR}.0–{MAJOR}.{MINOR})")]
    Version {
        /// Major.
        major: u16,
        /// Minor.
        minor: u16,
    },
    /// A length field is over its cap.
    #[error("device-state envelope: {what} length {len} exceeds the cap {max}")]
    TooLong {
        /// Field.
        what: &'static str,
        /// Declared.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// Input ends early.
    #[error("device-state envelope is truncated")]
    Truncated,
    /// Checksum mismatch for one entry.
    #[error("device-state entry {0:?} fails its checksum")]
    Checksum(PeerText),
    /// Id is empty or repeats.
    #[error("device-state envelope has a bad or duplicate id {0:?}")]
    BadId(PeerText),
    /// Id is not UTF-8.
    #[error("device-state envelope has an id that is not UTF-8")]
    IdNotUtf8,
    /// Bytes after the last entry.
    #[error("device-state envelope has trailing bytes")]
    Trailing,
}

/// One participant's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Participant id.
    pub id: String,
    /// Blob format version.
    pub version: u32,
    /// The blob.
    pub blob: Vec<u8>,
}

/// Serialize entries.
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        12 + entries
            .iter()
            .map(|e| 14 + e.id.len() + e.blob.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&MAJOR.to_le_bytes());
    out.extend_from_slice(&MINOR.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&(e.id.len() as u16).to_le_bytes());
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(&e.version.to_le_bytes());
        out.extend_from_slice(&(e.blob.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&e.blob).to_le_bytes());
        out.extend_from_slice(&e.blob);
    }
    out
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EnvelopeError> {
        let end = self.at.checked_add(n).ok_or(EnvelopeError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(EnvelopeError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, EnvelopeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, EnvelopeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
}

/// Parse and validate an envelope.
pub fn decode(b: &[u8]) -> Result<Vec<Entry>, EnvelopeError> {
    let mut c = Cursor { b, at: 0 };
    if c.take(4)? != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    let major = c.u16()?;
    let minor = c.u16()?;
    if major != MAJOR || minor > MINOR {
        return Err(EnvelopeError::Version { major, minor });
    }
    let count = c.u32()? as usize;
    if count > MAX_ENTRIES {
        return Err(EnvelopeError::TooLong {
            what: "entry count",
            len: count,
            max: MAX_ENTRIES,
        });
    }
    let mut out: Vec<Entry> = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let id_len = c.u16()? as usize;
        if id_len > MAX_ID_LEN {
            return Err(EnvelopeError::TooLong {
                what: "id",
                len: id_len,
                max: MAX_ID_LEN,
            });
        }
        let id = std::str::from_utf8(c.take(id_len)?)
            .map_err(|_| EnvelopeError::IdNotUtf8)?
            .to_string();
        if id.is_empty() || out.iter().any(|e| e.id == id) {
            return Err(EnvelopeError::BadId(PeerText::new(id)));
        }
        let version = c.u32()?;
        let len = c.u32()? as usize;
        if len > MAX_BLOB_LEN {
            return Err(EnvelopeError::TooLong {
                what: "blob",
                len,
                max: MAX_BLOB_LEN,
            });
        }
        let crc = c.u32()?;
        let blob = c.take(len)?;
        if crc32c::crc32c(blob) != crc {
            return Err(EnvelopeError::Checksum(PeerText::new(id)));
        }
        out.push(Entry {
            id,
            version,
            blob: blob.to_vec(),
        });
    }
    if c.at != b.len() {
        return Err(EnvelopeError::Trailing);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let e = vec![
            Entry {
                id: "vcpu0".into(),
                version: 2,
                blob: vec![1, 2, 3],
            },
            Entry {
                id: "port:eth0".into(),
                version: 1,
                blob: vec![],
            },
        ];
        let b = encode(&e);
        assert_eq!(decode(&b).unwrap(), e);
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(EnvelopeError::BadMagic));
        let mut bad = b.clone();
        bad[4] = 2; // major 2
        assert!(matches!(
            decode(&bad),
            Err(EnvelopeError::Version { major: 2, .. })
        ));
        let mut bad = b.clone();
        bad[6] = 9; // newer minor
        assert!(matches!(
            decode(&bad),
            Err(EnvelopeError::Version { minor: 9, .. })
        ));
        let mut bad = b.clone();
        let blob_len_at = 12 + 2 + 5 + 4;
        bad[blob_len_at..blob_len_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&bad),
            Err(EnvelopeError::TooLong { what: "blob", .. })
        ));
        let mut bad = b.clone();
        let blob_at = blob_len_at + 8;
        bad[blob_at] ^= 0xff;
        assert_eq!(
            decode(&bad),
            Err(EnvelopeError::Checksum(PeerText::new("vcpu0")))
        );
        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_err());
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(EnvelopeError::Trailing));
    }
}
