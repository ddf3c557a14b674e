//! A whole receiver that builds its memory from the source's layout, fed arbitrary
//! bytes as its control and page streams: handshake, setup (layout arithmetic,
//! memory bound), rounds and commit. It must return (an error, or success for a
//! byte-perfect session), never panic, hang or map more than its memory bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = livemig::fuzz::receiver_setup(data);
});
