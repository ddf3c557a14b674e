//! Every wire decoder on arbitrary bytes: frame header + body (crc), batch meta and
//! its payload through the codec, control messages, round end, device-state
//! envelope. Must never panic, hang or allocate beyond the protocol's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    livemig::wire::fuzz_decode(data);
});
