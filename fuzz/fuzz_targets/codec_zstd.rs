//! The zstd block decoder on arbitrary payloads and output lengths (bounded like a
//! batch's payload_len).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    livemig::fuzz::codec_decode(livemig::codec::CodecId::Zstd, data);
});
