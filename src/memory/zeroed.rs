//! Per-page tables of atomics that start at zero and cost nothing until written:
//! the proof's ledgers (8 bytes a page) and the receiver's round stamps (4 bytes a
//! page) on both sides of every migration.
//!
//! Built the obvious way, `(0..n).map(|_| AtomicU64::new(0)).collect()`, a table
//! is written in full at setup: for a 2 GiB guest, 4 MiB in 1,024 page faults of
//! 4 KiB, about 1.8 ms on this machine, and the receiver builds two such tables
//! before it accepts its page streams. A large table here is an anonymous mapping
//! instead: the kernel supplies it zeroed, and with `MADV_HUGEPAGE` the first write
//! to each 2 MiB faults in one huge page. Small tables stay on the heap.
//!
//! Why by hand: a `Vec` of atomics cannot come from `calloc` without `unsafe`
//! either, and calloc'd memory would still fault 4 KiB at a time.

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Tables of at least this many bytes are mapped; smaller ones are allocated.
const MAP_AT: usize = 1 << 20;

mod sealed {
    pub trait Sealed {}
    impl Sealed for std::sync::atomic::AtomicU32 {}
    impl Sealed for std::sync::atomic::AtomicU64 {}
}

/// An atomic integer whose all-zero bytes are the value 0 (sealed: `AtomicU32`,
/// `AtomicU64`, which have the size, alignment and bit validity of `u32`, `u64`).
pub trait ZeroAtomic: sealed::Sealed + Sized + Send + Sync {
    /// The value 0.
    fn zero() -> Self;
}

impl ZeroAtomic for AtomicU32 {
    fn zero() -> Self {
        AtomicU32::new(0)
    }
}

impl ZeroAtomic for AtomicU64 {
    fn zero() -> Self {
        AtomicU64::new(0)
    }
}

/// A fixed-length slice of atomics, every one 0 at first.
pub struct ZeroedAtomics<A: ZeroAtomic> {
    store: Store<A>,
}

enum Store<A> {
    Heap(Box<[A]>),
    Mapped {
        map: memmap2::MmapRaw,
        len: usize,
        _atoms: PhantomData<A>,
    },
}

impl<A: ZeroAtomic> ZeroedAtomics<A> {
    /// `len` atomics, all 0. A large table whose mapping fails (address space
    /// exhausted) is allocated on the heap instead.
    pub fn new(len: usize) -> Self {
        let bytes = len.saturating_mul(std::mem::size_of::<A>());
        if bytes >= MAP_AT {
            if let Ok(map) = memmap2::MmapOptions::new().len(bytes).map_anon() {
                // Only a hint: without huge pages the table faults 4 KiB at a time.
                let _ = map.advise(memmap2::Advice::HugePage);
                return Self {
                    store: Store::Mapped {
                        map: memmap2::MmapRaw::from(map),
                        len,
                        _atoms: PhantomData,
                    },
                };
            }
        }
        Self {
            store: Store::Heap((0..len).map(|_| A::zero()).collect()),
        }
    }
}

impl<A: ZeroAtomic> Deref for ZeroedAtomics<A> {
    type Target = [A];

    fn deref(&self) -> &[A] {
        match &self.store {
            Store::Heap(b) => b,
            Store::Mapped { map, len, .. } => {
                // SAFETY: the mapping is page-aligned (enough for `A`), at least
                // `len * size_of::<A>()` bytes long, private to this value and alive
                // as long as the borrow of `self`. The kernel zero-filled it, and zero
                // bytes are a valid `A` (`ZeroAtomic` is sealed to `AtomicU32` and
                // `AtomicU64`). Its bytes are only ever reached through this `&[A]`,
                // whose atomics permit writes through shared references; the pointer
                // is the mapping's own (`MmapRaw`), not derived from a `&[u8]`.
                unsafe { std::slice::from_raw_parts(map.as_mut_ptr() as *const A, *len) }
            }
        }
    }
}

impl<A: ZeroAtomic> std::fmt::Debug for ZeroedAtomics<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroedAtomics")
            .field("len", &self.len())
            .field("mapped", &matches!(self.store, Store::Mapped { .. }))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn small_and_large_tables_start_at_zero_and_keep_what_is_written() {
        for len in [0usize, 1, 1000, MAP_AT / 8, MAP_AT / 8 + 3, 1 << 19] {
            let t = ZeroedAtomics::<AtomicU64>::new(len);
            assert_eq!(t.len(), len);
            assert_eq!(
                format!("{t:?}").contains("mapped: true"),
                len * 8 >= MAP_AT,
                "{len}"
            );
            assert!(t.iter().all(|a| a.load(Ordering::Relaxed) == 0), "{len}");
            for (i, a) in t.iter().enumerate().step_by(511) {
                a.store(i as u64 ^ 0xdead_beef, Ordering::Relaxed);
            }
            for (i, a) in t.iter().enumerate() {
                let want = if i % 511 == 0 {
                    i as u64 ^ 0xdead_beef
                } else {
                    0
                };
                assert_eq!(a.load(Ordering::Relaxed), want, "{len} at {i}");
            }
        }
        let s = ZeroedAtomics::<AtomicU32>::new(1 << 20);
        assert_eq!(s.len(), 1 << 20);
        s[(1 << 20) - 1].store(7, Ordering::Relaxed);
        assert_eq!(s[(1 << 20) - 1].load(Ordering::Relaxed), 7);
        assert_eq!(s[0].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_table_is_shared_between_threads() {
        let t = std::sync::Arc::new(ZeroedAtomics::<AtomicU64>::new(1 << 18));
        std::thread::scope(|s| {
            for k in 0..2u64 {
                let t = t.clone();
                s.spawn(move || {
                    for i in (k as usize..t.len()).step_by(2) {
                        t[i].fetch_add(k + 1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert!(t
            .iter()
            .enumerate()
            .all(|(i, a)| a.load(Ordering::Relaxed) == (i % 2) as u64 + 1));
    }
}
