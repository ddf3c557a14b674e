//! Codec choice policy (kept apart from the encoding mechanism).

use super::CodecId;

/// Which codec a sender uses for batch payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecChoice {
    /// Always this codec (falls back to raw when a block does not shrink).
    Fixed(CodecId),
}

impl CodecChoice {
    /// The codec for the next batch.
    pub fn pick(&self) -> CodecId {
        match self {
            Self::Fixed(id) => *id,
        }
    }
}
