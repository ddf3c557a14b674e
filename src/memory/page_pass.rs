//! Reading a page where it lies: its XXH3-64 hash and whether it is all zero,
//! reading the page out of memory once and copying nothing. The zero-copy send
//! path uses it (the kernel then reads guest memory for the socket), and so does
//! every hash of source memory in place (`GuestMemory::page_hash`: the audits, the
//! hash-scan tracker).
//!
//! A first loop of independent loads brings the page into L1 and tests it for
//! zero; the hash then reads the page from L1. The load loop matters: hashing
//! straight from memory not in cache ran at 15 GiB/s, since the hash's chain of
//! dependent adds keeps few loads in flight. Over 256 MiB of anonymous `mix`
//! memory (`cargo bench --features bench --bench codecs -- page-copy-out`): 32
//! GiB/s, against 29 GiB/s for the copy path's copy-and-zero-check into an L1
//! page then the crate's hash of the copy. For pages already in cache the load
//! loop is wasted: there [`hash_cached`] (AVX-512, no zero check) is the fastest,
//! 90 GiB/s against 54 for the crate and 45 for this pass (`-- page-hash`), and
//! [`super::page_hash`] uses it, else the crate's hash.
//!
//! Tried and dropped: prefetching the lines two pages ahead. It raised the
//! micro-benchmark to 41 GiB/s but not whole migrations (`bench --baseline`), and
//! slowed `send` of a file-backed image into fresh memory (5.84 against 6.00 GiB/s,
//! medians of 4 interleaved runs; our reading: the image's next pages are often
//! not mapped yet, and each prefetch into them costs a page walk).
//!
//! Why written by hand: a hash crate takes a `&[u8]`, which over guest memory a
//! running guest writes is a data race, and none tests for zero in its loop. This
//! is XXH3-64 with the default secret and seed 0 for inputs of exactly 4096 bytes,
//! computed with AVX2 over two 256-bit accumulators kept in registers. It equals
//! `twox_hash::XxHash3_64::oneshot` bit for bit (tested below on random and
//! adversarial pages), so both sides' ledgers and the wire format are unchanged.
//! Without AVX2 the page is copied into a buffer and hashed by the crate.

use super::PAGE_SIZE;

/// XXH3's default secret (the reference implementation's `XXH3_kSecret`).
const SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

/// XXH3's primes, and its stripe and block sizes (the reference's `XXH_PRIME*`,
/// `XXH_STRIPE_LEN`, and 16 stripes a block with the default secret).
#[cfg(target_arch = "x86_64")]
mod xxh3 {
    pub const PRIME32_1: u64 = 0x9E37_79B1;
    pub const PRIME32_2: u64 = 0x85EB_CA77;
    pub const PRIME32_3: u64 = 0xC2B2_AE3D;
    pub const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
    pub const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    pub const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
    pub const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
    pub const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;
    pub const PRIME_MX1: u64 = 0x1656_6791_9E37_79F9;
    pub const STRIPE: usize = 64;
    pub const BLOCK: usize = 16 * STRIPE;
}
#[cfg(target_arch = "x86_64")]
use xxh3::*;

/// What reading a page found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSummary {
    /// XXH3-64 of the page (equal to [`super::page_hash`] of the same bytes).
    pub hash: u64,
    /// Whether any byte is not zero.
    pub nonzero: bool,
}

/// Hash the page at `src` and check it for zero, reading it out of memory once,
/// without copying it.
///
/// # Safety
/// `src` must be valid for reads of `PAGE_SIZE` bytes. Other threads (a running
/// guest) may write those bytes meanwhile: the hash and the zero check then
/// describe some mix of old and new bytes, not necessarily the same mix, which the
/// dirty tracker covers (the page is dirty and sent again).
#[inline]
pub unsafe fn hash_page(src: *const u8) -> PageSummary {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked above); the caller's contract.
            return unsafe { pass_avx2(src) };
        }
    }
    let mut copy = [0u8; PAGE_SIZE];
    // SAFETY: the caller's contract; `copy` is ours and cannot overlap `src`.
    unsafe { std::ptr::copy_nonoverlapping(src, copy.as_mut_ptr(), PAGE_SIZE) };
    PageSummary {
        hash: twox_hash::XxHash3_64::oneshot(&copy),
        nonzero: !crate::codec::zero::is_zero_page(&copy),
    }
}

/// XXH3-64 of 4096 bytes with AVX2, and the zero check.
///
/// The layout is XXH3's for its default 192-byte secret: blocks of 16 stripes of
/// 64 bytes, stripe `i` of a block keyed by the secret at `8 i`, the accumulators
/// scrambled after each of the first three blocks with the secret's last 64 bytes;
/// the fourth block's first 15 stripes, then the page's last stripe keyed at
/// 192 − 71; then the merge keyed at 11 and the avalanche.
///
/// # Safety
/// The CPU must have AVX2, and `src` be valid for reads of `PAGE_SIZE` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pass_avx2(src: *const u8) -> PageSummary {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi64, _mm256_loadu_si256, _mm256_mul_epu32, _mm256_or_si256,
        _mm256_set1_epi64x, _mm256_set_epi64x, _mm256_setzero_si256, _mm256_shuffle_epi32,
        _mm256_slli_epi64, _mm256_srli_epi64, _mm256_storeu_si256, _mm256_testz_si256,
        _mm256_xor_si256,
    };

    let secret = SECRET.as_ptr();
    // Lanes low to high: acc[0..4] and acc[4..8] of the reference.
    let mut acc_lo = _mm256_set_epi64x(
        PRIME64_3 as i64,
        PRIME64_2 as i64,
        PRIME64_1 as i64,
        PRIME32_3 as i64,
    );
    let mut acc_hi = _mm256_set_epi64x(
        PRIME32_1 as i64,
        PRIME64_5 as i64,
        PRIME32_2 as i64,
        PRIME64_4 as i64,
    );
    let mut seen = _mm256_setzero_si256();

    // One stripe of 64 bytes at byte `at` of the page, keyed at byte `key`.
    macro_rules! stripe {
        ($at:expr, $key:expr) => {{
            let (at, key): (usize, usize) = ($at, $key);
            // SAFETY: `at + 64 <= PAGE_SIZE` and `key + 64 <= 192` at every use
            // below, so the loads stay inside the source page and the secret; all
            // are unaligned loads.
            unsafe {
                let d0 = _mm256_loadu_si256(src.add(at) as *const __m256i);
                let d1 = _mm256_loadu_si256(src.add(at + 32) as *const __m256i);
                let k0 = _mm256_loadu_si256(secret.add(key) as *const __m256i);
                let k1 = _mm256_loadu_si256(secret.add(key + 32) as *const __m256i);
                let v0 = _mm256_xor_si256(d0, k0);
                let v1 = _mm256_xor_si256(d1, k1);
                let p0 = _mm256_mul_epu32(v0, _mm256_srli_epi64::<32>(v0));
                let p1 = _mm256_mul_epu32(v1, _mm256_srli_epi64::<32>(v1));
                // Each 64-bit lane gets the neighbouring lane's data added.
                let s0 = _mm256_shuffle_epi32::<0b01_00_11_10>(d0);
                let s1 = _mm256_shuffle_epi32::<0b01_00_11_10>(d1);
                acc_lo = _mm256_add_epi64(acc_lo, _mm256_add_epi64(s0, p0));
                acc_hi = _mm256_add_epi64(acc_hi, _mm256_add_epi64(s1, p1));
            }
        }};
    }

    let prime = _mm256_set1_epi64x(PRIME32_1 as i64);
    // acc = (acc ^ (acc >> 47) ^ key) * PRIME32_1, a 64 × 32-bit multiply in halves.
    macro_rules! scramble {
        ($acc:expr, $key_at:expr) => {{
            let (acc, key_at): (__m256i, usize) = ($acc, $key_at);
            // SAFETY: `key_at + 32 <= 192`: the load stays inside the secret.
            let key = unsafe { _mm256_loadu_si256(secret.add(key_at) as *const __m256i) };
            let a = _mm256_xor_si256(_mm256_xor_si256(acc, _mm256_srli_epi64::<47>(acc)), key);
            let lo = _mm256_mul_epu32(a, prime);
            let hi = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), prime);
            _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi))
        }};
    }

    // Bring the page into L1 first with a loop of independent loads (the zero
    // test's), which keeps many misses in flight. The hash's chain of dependent
    // adds would otherwise keep few loads in flight (see the module's docs).
    for at in (0..PAGE_SIZE).step_by(128) {
        // SAFETY: `at + 128 <= PAGE_SIZE`: the loads stay inside the source page.
        unsafe {
            let a = _mm256_loadu_si256(src.add(at) as *const __m256i);
            let b = _mm256_loadu_si256(src.add(at + 32) as *const __m256i);
            let c = _mm256_loadu_si256(src.add(at + 64) as *const __m256i);
            let d = _mm256_loadu_si256(src.add(at + 96) as *const __m256i);
            seen = _mm256_or_si256(
                seen,
                _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d)),
            );
        }
    }
    for block in 0..3 {
        for s in 0..16 {
            stripe!(block * BLOCK + s * STRIPE, s * 8);
        }
        acc_lo = scramble!(acc_lo, 128);
        acc_hi = scramble!(acc_hi, 160);
    }
    for s in 0..15 {
        stripe!(3 * BLOCK + s * STRIPE, s * 8);
    }
    stripe!(PAGE_SIZE - STRIPE, 192 - 71);

    let mut acc = [0u64; 8];
    // SAFETY: `acc` holds 64 bytes, two unaligned 32-byte stores.
    unsafe {
        _mm256_storeu_si256(acc.as_mut_ptr() as *mut __m256i, acc_lo);
        _mm256_storeu_si256(acc.as_mut_ptr().add(4) as *mut __m256i, acc_hi);
    }
    PageSummary {
        hash: merge(&acc),
        nonzero: _mm256_testz_si256(seen, seen) == 0,
    }
}

/// XXH3-64 of one 4096-byte page that is in cache (just written or just read), with
/// AVX-512 where the CPU has it: one 512-bit accumulator and one load per stripe.
/// `None` without AVX-512 (the caller then uses the crate's hash, whose fastest
/// path is AVX2).
///
/// Pages in cache only: from memory the 512-bit loads kept fewer misses in flight
/// and ran at half the AVX2 load loop's speed, so [`hash_page`] stays AVX2. The
/// receiver hashes each page right after the socket wrote it into guest memory,
/// which is where this is used ([`super::page_hash`]).
#[inline]
pub fn hash_cached(page: &[u8; PAGE_SIZE]) -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked above); `page` is a whole page the
            // borrow keeps valid and unchanged.
            return Some(unsafe { hash_avx512(page.as_ptr()) });
        }
    }
    let _ = page;
    None
}

/// The same XXH3-64 as [`pass_avx2`] over 512-bit registers (no zero check).
///
/// # Safety
/// The CPU must have AVX-512F, and `src` be valid for reads of `PAGE_SIZE` bytes
/// that no one writes during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn hash_avx512(src: *const u8) -> u64 {
    use std::arch::x86_64::{
        __m512i, _mm512_add_epi64, _mm512_loadu_si512, _mm512_mul_epu32, _mm512_set1_epi64,
        _mm512_set_epi64, _mm512_shuffle_epi32, _mm512_slli_epi64, _mm512_srli_epi64,
        _mm512_storeu_si512, _mm512_xor_si512, _MM_PERM_BADC,
    };

    let secret = SECRET.as_ptr();
    // Lanes low to high: acc[0..8] of the reference.
    let mut acc = _mm512_set_epi64(
        PRIME32_1 as i64,
        PRIME64_5 as i64,
        PRIME32_2 as i64,
        PRIME64_4 as i64,
        PRIME64_3 as i64,
        PRIME64_2 as i64,
        PRIME64_1 as i64,
        PRIME32_3 as i64,
    );
    macro_rules! stripe {
        ($at:expr, $key:expr) => {{
            let (at, key): (usize, usize) = ($at, $key);
            // SAFETY: `at + 64 <= PAGE_SIZE` and `key + 64 <= 192` at every use
            // below, so the loads stay inside the page and the secret; unaligned.
            unsafe {
                let d = _mm512_loadu_si512(src.add(at) as *const __m512i);
                let k = _mm512_loadu_si512(secret.add(key) as *const __m512i);
                let v = _mm512_xor_si512(d, k);
                let p = _mm512_mul_epu32(v, _mm512_srli_epi64::<32>(v));
                // Each 64-bit lane gets the neighbouring lane's data added.
                let s = _mm512_shuffle_epi32::<_MM_PERM_BADC>(d);
                acc = _mm512_add_epi64(acc, _mm512_add_epi64(s, p));
            }
        }};
    }
    let prime = _mm512_set1_epi64(PRIME32_1 as i64);
    for block in 0..3 {
        for s in 0..16 {
            stripe!(block * BLOCK + s * STRIPE, s * 8);
        }
        // acc = (acc ^ (acc >> 47) ^ key) * PRIME32_1, a 64 × 32-bit multiply in
        // halves.
        // SAFETY: `128 + 64 <= 192`: the load stays inside the secret.
        let key = unsafe { _mm512_loadu_si512(secret.add(128) as *const __m512i) };
        let a = _mm512_xor_si512(_mm512_xor_si512(acc, _mm512_srli_epi64::<47>(acc)), key);
        let lo = _mm512_mul_epu32(a, prime);
        let hi = _mm512_mul_epu32(_mm512_srli_epi64::<32>(a), prime);
        acc = _mm512_add_epi64(lo, _mm512_slli_epi64::<32>(hi));
    }
    for s in 0..15 {
        stripe!(3 * BLOCK + s * STRIPE, s * 8);
    }
    stripe!(PAGE_SIZE - STRIPE, 192 - 71);

    let mut lanes = [0u64; 8];
    // SAFETY: `lanes` holds 64 bytes, one unaligned 64-byte store.
    unsafe { _mm512_storeu_si512(lanes.as_mut_ptr() as *mut __m512i, acc) };
    merge(&lanes)
}

/// XXH3's merge of the eight accumulators (keyed at 11) and its avalanche, for a
/// 4096-byte input.
#[cfg(target_arch = "x86_64")]
fn merge(acc: &[u64; 8]) -> u64 {
    let key = |at: usize| u64::from_le_bytes(SECRET[at..at + 8].try_into().expect("8 bytes"));
    let mut h = (PAGE_SIZE as u64).wrapping_mul(PRIME64_1);
    for i in 0..4 {
        let a = (acc[2 * i] ^ key(11 + 16 * i)) as u128;
        let b = (acc[2 * i + 1] ^ key(11 + 16 * i + 8)) as u128;
        let m = a.wrapping_mul(b);
        h = h.wrapping_add((m as u64) ^ ((m >> 64) as u64));
    }
    h ^= h >> 37;
    h = h.wrapping_mul(PRIME_MX1);
    h ^= h >> 32;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages() -> Vec<Box<[u8; PAGE_SIZE]>> {
        let mut out = Vec::new();
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        out.push(Box::new([0u8; PAGE_SIZE]));
        out.push(Box::new([0xffu8; PAGE_SIZE]));
        for _ in 0..64 {
            let mut p = Box::new([0u8; PAGE_SIZE]);
            p.chunks_exact_mut(8)
                .for_each(|c| c.copy_from_slice(&next().to_le_bytes()));
            out.push(p);
        }
        // One non-zero byte at each place where a stripe, a block or the
        // overlapping last stripe begins or ends.
        for at in [0, 1, 63, 64, 1023, 1024, 3071, 3072, 4031, 4032, 4095] {
            let mut p = Box::new([0u8; PAGE_SIZE]);
            p[at] = 1;
            out.push(p);
        }
        out
    }

    #[test]
    fn page_pass_hash_equals_the_crates_xxh3_and_finds_non_zero_bytes() {
        for page in pages() {
            let want = twox_hash::XxHash3_64::oneshot(&page[..]);
            let nonzero = page.iter().any(|&b| b != 0);
            // SAFETY: `page` is a whole page we own, nothing else writes it.
            let read = unsafe { hash_page(page.as_ptr()) };
            assert_eq!(
                read,
                PageSummary {
                    hash: want,
                    nonzero
                }
            );
        }
    }

    #[test]
    fn cached_hash_equals_the_crates_xxh3() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            assert_eq!(hash_cached(&[7u8; PAGE_SIZE]), None);
            eprintln!("skipped: this CPU has no AVX-512F; the crate's hash is used");
            return;
        }
        for page in pages() {
            let want = twox_hash::XxHash3_64::oneshot(&page[..]);
            assert_eq!(hash_cached(&page), Some(want));
        }
        let base = [0x5au8; PAGE_SIZE];
        for at in 0..PAGE_SIZE {
            let mut p = base;
            p[at] ^= 0x80;
            assert_eq!(
                hash_cached(&p),
                Some(twox_hash::XxHash3_64::oneshot(&p)),
                "byte {at}"
            );
        }
    }

    #[test]
    fn every_byte_changes_the_hash() {
        let base = [0x5au8; PAGE_SIZE];
        // SAFETY: `base` is a whole page we own.
        let h0 = unsafe { hash_page(base.as_ptr()) }.hash;
        for at in 0..PAGE_SIZE {
            let mut p = base;
            p[at] ^= 0x80;
            // SAFETY: `p` is a whole page we own.
            let h = unsafe { hash_page(p.as_ptr()) }.hash;
            assert_ne!(h, h0, "flipping byte {at} left the hash unchanged");
            assert_eq!(h, twox_hash::XxHash3_64::oneshot(&p), "byte {at}");
        }
    }
}
