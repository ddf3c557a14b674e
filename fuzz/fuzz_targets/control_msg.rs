//! Control messages (JSON) from arbitrary bytes: never a panic; what decodes
//! re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    livemig::fuzz::control_msg(data);
});
