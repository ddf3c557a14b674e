//! The delta record reader and the XOR-delta applier on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    livemig::fuzz::delta_decode(data);
});
