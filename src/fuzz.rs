//! Entry points shared by the fuzz targets (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`), so `cargo test` exercises exactly what the fuzzer does.
//!
//! Both functions must return normally on *any* input: a panic, a hang or an
//! unbounded allocation is a bug in the decoder or the receiver.

use std::sync::Arc;
use std::time::Duration;

use crate::codec::CodecSet;
use crate::device::envelope;
use crate::memory::GuestMemory;
use crate::receiver::{Receiver, ReceiverConfig};
use crate::transport::mem;
use crate::transport::{Connector, Stream};
use crate::wire::batch::BatchMeta;
use crate::wire::frame::{decode_frame, RoundEnd};
use crate::wire::{ControlMsg, FrameKind};

/// Run every wire decoder over `bytes`, ignoring errors: the frame decoder (and,
/// for each frame found, the decoder of its kind: control message, batch meta plus
/// the batch payload through its codec, round end, device-state envelope), and each
/// section decoder directly on the raw bytes.
pub fn decode_all(bytes: &[u8]) {
    let mut meta = BatchMeta::default();
    let mut codecs = CodecSet::new(1);
    let mut out = Vec::new();
    // Frames back to back, as on a stream.
    let mut rest = bytes;
    while let Ok((h, m, d, used)) = decode_frame(rest) {
        match h.kind {
            FrameKind::Control => {
                if ControlMsg::decode(m).is_ok() {
                    let _ = envelope::decode(d);
                }
            }
            FrameKind::Batch => {
                if meta.decode_from(m).is_ok() {
                    if let Some(codec) = meta.codec {
                        // payload_len is bounded by MAX_BATCH_DATA in decode_from.
                        out.clear();
                        out.resize(meta.payload_len as usize, 0);
                        let _ = codecs.get(codec).decode(d, &mut out);
                    }
                }
            }
            FrameKind::RoundEnd | FrameKind::StreamEnd => {
                let _ = RoundEnd::decode(m);
            }
        }
        rest = &rest[used.max(1).min(rest.len())..];
        if rest.is_empty() {
            break;
        }
    }
    // Each section decoder on the raw input.
    let _ = meta.decode_from(bytes);
    let _ = ControlMsg::decode(bytes);
    let _ = RoundEnd::decode(bytes);
    let _ = envelope::decode(bytes);
}

/// Feed `bytes` to a whole receiver as its incoming streams (in-memory transport)
/// and return what it said. The first byte chooses how many page streams are
/// opened (0–2); the rest is split as `control ‖ page0 ‖ page1` at the offsets
/// given by the next two bytes (scaled). The receiver must fail cleanly: the input
/// is closed after it is written, timeouts are short, and the destination memory is
/// a fixed 1 MiB so a hostile layout cannot make it allocate.
pub fn receiver_stream(bytes: &[u8]) -> Result<(), String> {
    let (nstreams, cut1, cut2, body) = match bytes {
        [a, b, c, rest @ ..] => (*a as usize % 3, *b as usize, *c as usize, rest),
        _ => (0, 255, 255, bytes),
    };
    let at = |x: usize| (body.len() * x / 255).min(body.len());
    let (c1, c2) = (at(cut1.min(cut2)), at(cut1.max(cut2)));
    let parts: [&[u8]; 3] = [&body[..c1], &body[c1..c2], &body[c2..]];

    let memory = Arc::new(GuestMemory::anonymous(1 << 20, false).map_err(|e| e.to_string())?);
    let (connector, acceptor) = mem::pair();
    let mut streams: Vec<Box<dyn Stream>> = Vec::new();
    for part in parts.iter().take(1 + nstreams) {
        let mut s = connector.connect().map_err(|e| e.to_string())?;
        // Bounded by the in-memory queue depth; ignore a receiver that hung up.
        let _ = std::io::Write::write_all(&mut s, part);
        streams.push(s);
    }
    // Closing the writers gives the receiver EOF once it drained the input.
    drop(streams);
    drop(connector);
    let r = Receiver::new()
        .memory(memory)
        .config(ReceiverConfig {
            huge_pages: false,
            prefault: false,
            accept_timeout: Duration::from_millis(50),
            idle_timeout: Duration::from_secs(2),
            max_streams: 4,
            ..Default::default()
        })
        .run(&acceptor);
    match r {
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
