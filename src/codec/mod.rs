//! Page codecs: how a batch's non-zero pages become the bytes of a frame.
//!
//! Zero pages never reach a codec: [`zero::is_zero_page`] finds them first and the
//! batch's zero map records them (header-only). The remaining pages are concatenated
//! and encoded as one block by a [`PageCodec`]; a block that does not shrink is sent
//! raw. Codec state and buffers are reused across batches (no allocation per page).

pub mod cache;
pub mod delta;
pub mod zero;

use serde::{Deserialize, Serialize};

/// Codec id on the wire. 0 is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
#[serde(rename_all = "lowercase")]
pub enum CodecId {
    /// Identity.
    Raw = 1,
    /// lz4 block (lz4_flex).
    Lz4 = 2,
    /// zstd (bulk API).
    Zstd = 3,
}

impl CodecId {
    /// Parse a wire byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Raw),
            2 => Some(Self::Lz4),
            3 => Some(Self::Zstd),
            _ => None,
        }
    }
    /// Name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

/// Codec failures (decode of hostile bytes lands here, never in a panic).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The compressed block is malformed.
    #[error("{codec} block is corrupt: {source}")]
    Corrupt {
        /// Codec name.
        codec: &'static str,
        /// The codec library's error (lz4_flex's `DecompressError`, zstd's
        /// `std::io::Error`).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Decoded size differs from the declared one.
    #[error("{codec} block decoded to {actual} bytes, expected {expected}")]
    Length {
        /// Codec name.
        codec: &'static str,
        /// Declared.
        expected: usize,
        /// Actual.
        actual: usize,
    },
    /// Compressor failure (should not happen; reported rather than panicking).
    #[error("{codec} compressor failed: {source}")]
    Encode {
        /// Codec name.
        codec: &'static str,
        /// The codec library's error (lz4_flex's `CompressError`, zstd's
        /// `std::io::Error`).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A block codec with reusable state.
pub trait PageCodec: Send {
    /// Wire id.
    fn id(&self) -> CodecId;
    /// Encode `input` into `out` (cleared first). Returns `false` when the result
    /// would not be smaller than the input; the caller then sends raw.
    fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool, CodecError>;
    /// Decode `input` into exactly `out.len()` bytes.
    fn decode(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError>;
}

/// Identity codec.
#[derive(Debug, Default)]
pub struct RawCodec;

impl PageCodec for RawCodec {
    fn id(&self) -> CodecId {
        CodecId::Raw
    }
    fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool, CodecError> {
        out.clear();
        out.extend_from_slice(input);
        // Never smaller than its input: the caller sends the input itself.
        Ok(false)
    }
    fn decode(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        if input.len() != out.len() {
            return Err(CodecError::Length {
                codec: "raw",
                expected: out.len(),
                actual: input.len(),
            });
        }
        out.copy_from_slice(input);
        Ok(())
    }
}

/// lz4 block codec (lz4_flex). Its `compress_into` keeps the hash table on the
/// stack, so encoding allocates nothing; the output buffer is the caller's, reused.
#[derive(Debug, Default)]
pub struct Lz4Codec;

impl PageCodec for Lz4Codec {
    fn id(&self) -> CodecId {
        CodecId::Lz4
    }
    fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool, CodecError> {
        let bound = lz4_flex::block::get_maximum_output_size(input.len());
        out.clear();
        out.resize(bound, 0);
        let n = lz4_flex::block::compress_into(input, out).map_err(|e| CodecError::Encode {
            codec: "lz4",
            source: e.into(),
        })?;
        out.truncate(n);
        Ok(n < input.len())
    }
    fn decode(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        let n = lz4_flex::block::decompress_into(input, out).map_err(|e| CodecError::Corrupt {
            codec: "lz4",
            source: e.into(),
        })?;
        if n != out.len() {
            return Err(CodecError::Length {
                codec: "lz4",
                expected: out.len(),
                actual: n,
            });
        }
        Ok(())
    }
}

/// zstd codec (bulk API) with reused contexts.
pub struct ZstdCodec {
    level: i32,
    enc: Option<zstd::bulk::Compressor<'static>>,
    dec: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for ZstdCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZstdCodec(level {})", self.level)
    }
}

impl ZstdCodec {
    /// A codec compressing at `level` (1 is fastest).
    pub fn new(level: i32) -> Self {
        Self {
            level,
            enc: None,
            dec: None,
        }
    }
}

impl PageCodec for ZstdCodec {
    fn id(&self) -> CodecId {
        CodecId::Zstd
    }
    fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool, CodecError> {
        if self.enc.is_none() {
            self.enc =
                Some(
                    zstd::bulk::Compressor::new(self.level).map_err(|e| CodecError::Encode {
                        codec: "zstd",
                        source: e.into(),
                    })?,
                );
        }
        let enc = self.enc.as_mut().expect("just set");
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(input.len()));
        let n = enc
            .compress_to_buffer(input, out)
            .map_err(|e| CodecError::Encode {
                codec: "zstd",
                source: e.into(),
            })?;
        Ok(n < input.len())
    }
    fn decode(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        if self.dec.is_none() {
            self.dec = Some(
                zstd::bulk::Decompressor::new().map_err(|e| CodecError::Corrupt {
                    codec: "zstd",
                    source: e.into(),
                })?,
            );
        }
        let dec = self.dec.as_mut().expect("just set");
        let n = dec
            .decompress_to_buffer(input, out)
            .map_err(|e| CodecError::Corrupt {
                codec: "zstd",
                source: e.into(),
            })?;
        if n != out.len() {
            return Err(CodecError::Length {
                codec: "zstd",
                expected: out.len(),
                actual: n,
            });
        }
        Ok(())
    }
}

/// A set of codec instances, one per id, so a worker can encode or decode any.
#[derive(Debug)]
pub struct CodecSet {
    raw: RawCodec,
    lz4: Lz4Codec,
    zstd: ZstdCodec,
}

impl CodecSet {
    /// Codecs with zstd at `zstd_level`.
    pub fn new(zstd_level: i32) -> Self {
        Self {
            raw: RawCodec,
            lz4: Lz4Codec,
            zstd: ZstdCodec::new(zstd_level),
        }
    }
    /// The codec for `id`.
    pub fn get(&mut self, id: CodecId) -> &mut dyn PageCodec {
        match id {
            CodecId::Raw => &mut self.raw,
            CodecId::Lz4 => &mut self.lz4,
            CodecId::Zstd => &mut self.zstd,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_round_trip_and_reject_garbage() {
        let mut input = vec![0u8; 3 * 4096];
        for (i, b) in input.iter_mut().enumerate() {
            *b = (i % 61) as u8 ^ (i / 4096) as u8;
        }
        let mut set = CodecSet::new(1);
        for id in [CodecId::Raw, CodecId::Lz4, CodecId::Zstd] {
            let mut enc = Vec::new();
            let smaller = set.get(id).encode(&input, &mut enc).unwrap();
            assert_eq!(smaller, id != CodecId::Raw, "{id:?}");
            let mut out = vec![0u8; input.len()];
            set.get(id).decode(&enc, &mut out).unwrap();
            assert_eq!(out, input);
            // Corrupt / truncated input must error, never panic.
            let mut out = vec![0u8; input.len()];
            assert!(set.get(id).decode(&enc[..enc.len() / 2], &mut out).is_err());
        }
    }
}
