//! The session token: 16 random bytes, 32 lowercase hex characters on the wire.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;

/// Bytes in a [`SessionToken`].
pub const TOKEN_BYTES: usize = 16;
/// Characters in a token's wire form (lowercase hex).
pub const TOKEN_HEX_LEN: usize = 2 * TOKEN_BYTES;

/// An unguessable session identifier, drawn by the source for each migration.
///
/// Equality runs in constant time (`subtle`), so a peer probing tokens learns
/// nothing from how long a comparison takes. `subtle` rather than a hand-written
/// loop because the compiler may turn such a loop back into an early-exit
/// comparison; `subtle` places optimisation barriers that stop it.
#[derive(Clone, Copy)]
pub struct SessionToken([u8; TOKEN_BYTES]);

/// Why a token could not be made or parsed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The operating system's random source failed.
    #[error("cannot draw a session token from the system random source: {0}")]
    Random(#[source] getrandom::Error),
    /// The wire form is not 32 lowercase hex characters.
    #[error("malformed session token: expected {TOKEN_HEX_LEN} lowercase hex characters, got {len} characters{}", bad.map(|(at, byte)| format!(" (byte {byte:#04x} at position {at} is not a lowercase hex digit)")).unwrap_or_default())]
    Malformed {
        /// Length of what arrived.
        len: usize,
        /// The first offending byte and its position, if the length was right.
        bad: Option<(usize, u8)>,
    },
}

impl SessionToken {
    /// Draw a fresh token from the operating system's random source.
    pub fn generate() -> Result<Self, TokenError> {
        let mut b = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut b).map_err(TokenError::Random)?;
        Ok(Self(b))
    }

    /// A token with the given bytes (tests and tools that replay a session).
    pub const fn from_bytes(b: [u8; TOKEN_BYTES]) -> Self {
        Self(b)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; TOKEN_BYTES] {
        &self.0
    }

    /// Parse the wire form: exactly 32 lowercase hex characters.
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        if s.len() != TOKEN_HEX_LEN {
            return Err(TokenError::Malformed {
                len: s.chars().count(),
                bad: None,
            });
        }
        let mut b = [0u8; TOKEN_BYTES];
        let digits = s.as_bytes();
        for (i, out) in b.iter_mut().enumerate() {
            let hi = hex_value(digits[2 * i]);
            let lo = hex_value(digits[2 * i + 1]);
            match (hi, lo) {
                (Some(hi), Some(lo)) => *out = hi << 4 | lo,
                _ => {
                    let bad = if hi.is_none() { 2 * i } else { 2 * i + 1 };
                    return Err(TokenError::Malformed {
                        len: TOKEN_HEX_LEN,
                        bad: Some((bad, digits[bad])),
                    });
                }
            }
        }
        Ok(Self(b))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl PartialEq for SessionToken {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for SessionToken {}

impl fmt::Display for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionToken({self})")
    }
}

impl std::str::FromStr for SessionToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SessionToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SessionToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Borrowed when the input allows, owned otherwise (escaped JSON strings).
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_32_lowercase_hex_and_round_trips() {
        let t = SessionToken::from_bytes([
            0x00, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xff, 0x10, 0x20, 0x30, 0x40,
            0x50, 0x60,
        ]);
        let shown = t.to_string();
        assert_eq!(shown, "000123456789abcdefff102030405060");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, format!("\"{shown}\""));
        let back: SessionToken = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.as_bytes(), t.as_bytes());
    }

    #[test]
    fn generated_tokens_differ() {
        let a = SessionToken::generate().unwrap();
        let b = SessionToken::generate().unwrap();
        // 2^-128 chance of a false failure.
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), TOKEN_HEX_LEN);
    }

    #[test]
    fn malformed_wire_forms_are_rejected_with_a_reason() {
        let good = "000123456789abcdefff102030405060";
        for (bad, says) in [
            ("", "got 0 characters"),
            (&good[..31], "got 31 characters"),
            ("000123456789abcdefff1020304050600", "got 33 characters"),
            ("000123456789ABCDEFFF102030405060", "position 12"),
            ("000123456789abcdefff10203040506g", "position 31"),
            ("0x0123456789abcdefff102030405060", "position 1"),
        ] {
            let e = SessionToken::parse(bad).unwrap_err().to_string();
            assert!(e.contains("malformed session token"), "{bad:?}: {e}");
            assert!(e.contains(says), "{bad:?}: {e}");
            let json = format!("\"{bad}\"");
            assert!(
                serde_json::from_str::<SessionToken>(&json).is_err(),
                "{bad:?}"
            );
        }
        // Not a string at all.
        assert!(serde_json::from_str::<SessionToken>("12345").is_err());
        // Multi-byte characters of the right byte length are refused too.
        let e = SessionToken::parse(&"é".repeat(16))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a lowercase hex digit"), "{e}");
    }

    #[test]
    fn equality_compares_every_byte() {
        let a = SessionToken::from_bytes([7; TOKEN_BYTES]);
        for i in 0..TOKEN_BYTES {
            let mut b = [7; TOKEN_BYTES];
            b[i] ^= 0x80;
            assert_ne!(a, SessionToken::from_bytes(b), "byte {i}");
        }
        assert_eq!(a, SessionToken::from_bytes([7; TOKEN_BYTES]));
    }
}
