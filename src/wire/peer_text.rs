//! Text that came from the peer, made safe to show.
//!
//! A refusal message, a remote failure, an abort reason or a veto arrives as free
//! text in a control message. It is the peer's data, not our diagnosis, and a
//! hostile peer chooses every byte of it: it could write terminal escape
//! sequences, fake log lines (newlines) or reorder what an operator reads (Unicode
//! bidirectional controls), and be as long as a control frame allows. [`PeerText`]
//! is the one place such text becomes displayable: it is bounded and its control
//! characters are escaped before anything can print it.

use std::fmt;

/// Untrusted text received from the peer over the wire, sanitized and bounded.
///
/// Built only through [`PeerText::new`], which keeps at most
/// [`PeerText::MAX_BYTES`] bytes (cut at a character boundary, marked with `…`)
/// and replaces every control character (C0, DEL, C1, and the Unicode
/// bidirectional and zero-width formatting characters) with its `\u{…}` escape
/// (`\n`, `\r` and `\t` as those two-character escapes). What it displays is
/// therefore one line of printable text, whatever the peer sent. It says what the
/// peer claimed; it is no evidence of what happened.
///
/// ```
/// use livemig::wire::PeerText;
/// let t = PeerText::new("no\x1b[2J\nroom");
/// assert_eq!(t.as_str(), "no\\u{1b}[2J\\nroom");
/// assert!(!t.as_str().chars().any(char::is_control));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct PeerText {
    text: String,
    truncated: bool,
}

impl PeerText {
    /// Longest sanitized text kept, in bytes (the rest is cut and marked `…`).
    pub const MAX_BYTES: usize = 1024;

    /// Sanitize and bound `raw`, as received from the peer.
    pub fn new(raw: impl AsRef<str>) -> Self {
        let raw = raw.as_ref();
        let mut text = String::with_capacity(raw.len().min(Self::MAX_BYTES));
        let mut truncated = false;
        let mut escaped = String::new();
        for c in raw.chars() {
            escaped.clear();
            if is_unsafe(c) {
                escaped.extend(c.escape_default());
            } else {
                escaped.push(c);
            }
            if text.len() + escaped.len() > Self::MAX_BYTES {
                truncated = true;
                break;
            }
            text.push_str(&escaped);
        }
        Self { text, truncated }
    }

    /// The sanitized text (without the truncation mark).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the peer's text was longer than [`PeerText::MAX_BYTES`] and was cut.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }
}

/// Characters never shown as they are: controls, and the formatting characters
/// that change how surrounding text reads (bidirectional overrides and isolates,
/// zero-width characters, the byte-order mark).
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
        )
}

impl fmt::Display for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)?;
        if self.truncated {
            f.write_str("…")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl From<&str> for PeerText {
    fn from(raw: &str) -> Self {
        Self::new(raw)
    }
}

impl From<String> for PeerText {
    fn from(raw: String) -> Self {
        Self::new(raw)
    }
}

impl serde::Serialize for PeerText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_nothing_unsafe_remains() {
        let hostile = "refused\x1b]0;owned\x07\r\n\u{9b}31m\u{202e}txt.exe\u{200b}\x7f end";
        let t = PeerText::new(hostile);
        let shown = t.to_string();
        assert!(!shown.chars().any(is_unsafe), "{shown:?}");
        assert!(
            shown.starts_with("refused\\u{1b}]0;owned\\u{7}\\r\\n"),
            "{shown:?}"
        );
        assert!(shown.contains("\\u{202e}txt.exe"), "{shown:?}");
        assert!(shown.ends_with(" end"), "{shown:?}");
        assert!(!t.is_truncated());
        // Printable text, including non-ASCII, is kept as it is.
        assert_eq!(PeerText::new("hôte plein ✓").as_str(), "hôte plein ✓");
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary_and_marked() {
        let t = PeerText::new("é".repeat(PeerText::MAX_BYTES));
        assert!(t.is_truncated());
        assert!(t.as_str().len() <= PeerText::MAX_BYTES);
        assert!(t.as_str().chars().all(|c| c == 'é'));
        assert!(t.to_string().ends_with('…'));
        // Escapes count toward the bound: a flood of escape bytes stays bounded.
        let t = PeerText::new("\x1b".repeat(100_000));
        assert!(t.is_truncated());
        assert!(t.as_str().len() <= PeerText::MAX_BYTES);
        assert!(t.as_str().starts_with("\\u{1b}\\u{1b}"));
    }
}
