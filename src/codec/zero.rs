//! Zero-page detection.

use crate::memory::PAGE_SIZE;

/// True when the page is all zero bytes. Word-wise OR over 64-byte blocks with an
/// early exit; the compiler vectorises the inner loop.
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    page.chunks_exact(64).all(|block| {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        acc == 0
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn detects_zero_and_nonzero() {
        let mut p = vec![0u8; 4096];
        assert!(super::is_zero_page(&p));
        p[4095] = 1;
        assert!(!super::is_zero_page(&p));
    }
}
