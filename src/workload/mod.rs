//! A synthetic guest for `livemig bench` and the tests: deterministic page content
//! and dirtier threads that write memory at a target rate.
//!
//! This is the one place in the crate that *provides* guest memory contents; the
//! engine only consumes them.

pub mod dirtier;

use std::str::FromStr;

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};

pub use dirtier::{Dirtier, DirtierConfig, Skew};

/// Page content classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// 30 % zero, 30 % text-like, 20 % random, 20 % sparse (zero but a few words).
    Mix,
    /// All zero.
    Zero,
    /// All random.
    Random,
    /// All text-like.
    Text,
}

impl FromStr for Content {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "mix" => Self::Mix,
            "zero" => Self::Zero,
            "random" => Self::Random,
            "text" => Self::Text,
            _ => {
                return Err(format!(
                    "unknown content {s:?} (expected mix, zero, random or text)"
                ))
            }
        })
    }
}

impl Content {
    /// Name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mix => "mix",
            Self::Zero => "zero",
            Self::Random => "random",
            Self::Text => "text",
        }
    }
}

#[derive(Clone, Copy)]
enum Class {
    Zero,
    Text,
    Random,
    Sparse,
}

pub use crate::rng::splitmix;

fn class_of(content: Content, index: u64, seed: u64) -> Class {
    match content {
        Content::Zero => Class::Zero,
        Content::Random => Class::Random,
        Content::Text => Class::Text,
        Content::Mix => {
            let mut s = seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407);
            match splitmix(&mut s) % 10 {
                0..=2 => Class::Zero,
                3..=5 => Class::Text,
                6..=7 => Class::Random,
                _ => Class::Sparse,
            }
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "kernel",
    "page",
    "memory",
    "migration",
    "virtual",
    "machine",
    "host",
    "guest",
    "of",
    "and",
    "to",
    "in",
    "network",
    "device",
    "state",
    "round",
    "dirty",
    "copy",
    "send",
    "receive",
    "buffer",
    "socket",
    "thread",
    "error",
    "return",
    "value",
    "function",
    "struct",
    "const",
    "static",
    "void",
    "int",
    "char",
    "while",
    "for",
    "if",
    "else",
];

fn fill_page(class: Class, index: u64, seed: u64, page: &mut [u8]) {
    let mut s = seed ^ index.wrapping_mul(0x9FB2_1C65_1E98_DF25) ^ 0x5555;
    match class {
        Class::Zero => page.fill(0),
        Class::Random => {
            for w in page.chunks_exact_mut(8) {
                w.copy_from_slice(&splitmix(&mut s).to_le_bytes());
            }
        }
        Class::Sparse => {
            page.fill(0);
            let n = 1 + splitmix(&mut s) % 8;
            for _ in 0..n {
                let off = (splitmix(&mut s) % (PAGE_SIZE as u64 / 8)) as usize * 8;
                page[off..off + 8].copy_from_slice(&(splitmix(&mut s) | 1).to_le_bytes());
            }
        }
        Class::Text => {
            // A window of a generated corpus (deterministic), with the page index
            // stamped in so that no two pages are identical.
            let corpus = text_corpus();
            let off = (splitmix(&mut s) % (corpus.len() - PAGE_SIZE) as u64) as usize;
            page.copy_from_slice(&corpus[off..off + PAGE_SIZE]);
            page[..8].copy_from_slice(&index.to_le_bytes());
        }
    }
}

/// 256 KiB of word soup: the source of text-like pages.
fn text_corpus() -> &'static [u8] {
    static C: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        let mut out = Vec::with_capacity(256 * 1024 + 64);
        let mut s = 0x7E57_u64;
        while out.len() < 256 * 1024 {
            let r = splitmix(&mut s);
            out.extend_from_slice(WORDS[(r % WORDS.len() as u64) as usize].as_bytes());
            out.extend_from_slice(if r >> 60 == 0 { b".\n" } else { b" " });
        }
        out.truncate(256 * 1024);
        out
    })
}

/// Fill all of `mem` with `content` (deterministic in `seed`), using `threads`
/// threads. Zero pages are left untouched (fresh memory is zero), so they stay
/// unpopulated like a real guest's never-touched memory.
pub fn fill(
    mem: &GuestMemory,
    content: Content,
    seed: u64,
    threads: usize,
) -> Result<(), MemoryError> {
    let total = mem.total_pages();
    let threads = threads.max(1) as u64;
    let per = total.div_ceil(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<(), MemoryError> {
                    let mut page = vec![0u8; PAGE_SIZE];
                    for i in t * per..((t + 1) * per).min(total) {
                        let class = class_of(content, i, seed);
                        if matches!(class, Class::Zero) {
                            continue;
                        }
                        fill_page(class, i, seed, &mut page);
                        mem.write_pages(i, &page)?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().expect("fill thread panicked"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::zero::is_zero_page;

    #[test]
    fn mix_has_the_documented_proportions() {
        let mem = GuestMemory::anonymous(16 << 20, false).unwrap();
        fill(&mem, Content::Mix, 7, 2).unwrap();
        let mut zero = 0;
        let mut page = vec![0u8; PAGE_SIZE];
        for i in 0..mem.total_pages() {
            mem.read_pages(i, &mut page).unwrap();
            zero += is_zero_page(&page) as u64;
        }
        let frac = zero as f64 / mem.total_pages() as f64;
        assert!((0.27..0.33).contains(&frac), "zero fraction {frac}");
        // Deterministic.
        let other = GuestMemory::anonymous(16 << 20, false).unwrap();
        fill(&other, Content::Mix, 7, 1).unwrap();
        assert_eq!(mem.full_digest(2).unwrap(), other.full_digest(2).unwrap());
    }
}
