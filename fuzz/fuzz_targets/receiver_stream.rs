//! A whole receiver fed arbitrary bytes over in-memory streams (control plus up to
//! two page streams). It must return an error (or, for a byte-perfect session,
//! success) — never panic, hang or over-allocate.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = livemig::fuzz::receiver_stream(data);
});
