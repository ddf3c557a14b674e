//! The device-state envelope on arbitrary bytes: never a panic; what decodes
//! re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    livemig::fuzz::envelope_decode(data);
});
