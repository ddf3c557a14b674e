//! Entry points shared by the fuzz targets (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`), so `cargo test` exercises exactly what the fuzzer does.
//!
//! Both functions must return normally on *any* input: a panic, a hang or an
//! unbounded allocation is a bug in the decoder or the receiver.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::codec::cache::{Record, RecordReader};
use crate::codec::{CodecId, CodecSet};
use crate::device::envelope;
use crate::memory::GuestMemory;
use crate::memory::PAGE_SIZE;
use crate::receiver::{Receiver, ReceiverConfig};
use crate::transport::{Acceptor, Stream, TransportError};
use crate::wire::batch::BatchMeta;
use crate::wire::frame::AttachmentCaps;
use crate::wire::frame::{decode_frame, RoundEnd};
use crate::wire::{ControlMsg, FrameKind};

/// Run every wire decoder over `bytes`, ignoring errors: the frame decoder (and,
/// for each frame found, the decoder of its kind: control message, batch meta plus
/// the batch payload through its codec, round end, device-state envelope), and each
/// section decoder directly on the raw bytes.
pub fn decode_all(bytes: &[u8]) {
    // The codec contexts (zstd's is ~100 KiB) and the output buffer live as long as
    // the thread, as they do on a page stream: a fresh zstd context per input made
    // the fuzzer spend its time in the allocator.
    thread_local! {
        static STATE: std::cell::RefCell<(CodecSet, Vec<u8>)> =
            std::cell::RefCell::new((CodecSet::new(1), Vec::new()));
    }
    STATE.with(|s| {
        let (codecs, out) = &mut *s.borrow_mut();
        decode_all_with(bytes, codecs, out);
    });
}

fn decode_all_with(bytes: &[u8], codecs: &mut CodecSet, out: &mut Vec<u8>) {
    let mut meta = BatchMeta::default();
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
                        let len = meta.payload_len as usize;
                        grow(out, len);
                        let _ = codecs.get(codec).decode(d, &mut out[..len]);
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

/// Make `out` at least `len` bytes long. The bytes are not cleared between inputs
/// (zeroing up to a MiB per input was most of a codec target's time): a decoder
/// must fill its whole output whatever it held, and stale bytes test that too.
fn grow(out: &mut Vec<u8>, len: usize) {
    if out.len() < len {
        out.resize(len, 0);
    }
}

/// A control message from arbitrary bytes: decoding never panics, a decoded
/// message re-encodes to one that decodes to itself, and its attachment cap is
/// defined.
pub fn control_msg(bytes: &[u8]) {
    if let Ok(msg) = ControlMsg::decode(bytes) {
        let again = ControlMsg::decode(&msg.encode()).expect("an encoded message decodes");
        assert_eq!(again, msg, "control message round trip");
        let caps = AttachmentCaps {
            setup: 1 << 20,
            device_state: 1 << 20,
            resumed: 0,
        };
        let _ = caps.check_message(&msg, bytes.len());
    }
}

/// Largest output a codec target asks for (a batch's decoded payload bound).
const CODEC_OUT_MAX: usize = crate::wire::MAX_BATCH_DATA;

/// A block codec's decoder on arbitrary input: the first two bytes choose the
/// expected output length (as a batch's `payload_len` would, bounded like it), the
/// rest is the compressed payload. Never panics, never writes past the output.
pub fn codec_decode(codec: CodecId, bytes: &[u8]) {
    let (len, input) = match bytes {
        [a, b, rest @ ..] => {
            // Whole pages most of the time (what batches carry), any length else.
            let n = u16::from_le_bytes([*a, *b]) as usize;
            let len = if n & 0x8000 != 0 {
                (n & 0x1ff) * PAGE_SIZE
            } else {
                n
            };
            (len.min(CODEC_OUT_MAX), rest)
        }
        _ => (0, bytes),
    };
    thread_local! {
        static STATE: std::cell::RefCell<(CodecSet, Vec<u8>)> =
            std::cell::RefCell::new((CodecSet::new(1), Vec::new()));
    }
    STATE.with(|s| {
        let (codecs, out) = &mut *s.borrow_mut();
        grow(out, len);
        let _ = codecs.get(codec).decode(input, &mut out[..len]);
    });
}

/// The delta decoders on arbitrary bytes: the record stream reader (as a
/// `FLAG_DELTA` batch's decoded payload) and each delta applied onto a page; the
/// raw input is also applied as one delta.
pub fn delta_decode(bytes: &[u8]) {
    let mut page = [0u8; PAGE_SIZE];
    let _ = crate::codec::delta::apply(bytes, &mut page);
    let mut rd = RecordReader::new(bytes);
    for _ in 0..crate::wire::MAX_BATCH_PAGES {
        match rd.next_record() {
            Ok(Record::Full(p)) => page.copy_from_slice(p),
            Ok(Record::Delta(d)) => {
                let _ = crate::codec::delta::apply(d, &mut page);
            }
            Err(_) => return,
        }
    }
    let _ = rd.finish();
}

/// The device-state envelope on arbitrary bytes: what decodes re-encodes to the
/// same bytes (the format has one encoding), so nothing is accepted loosely.
pub fn envelope_decode(bytes: &[u8]) {
    if let Ok(entries) = envelope::decode(bytes) {
        assert_eq!(envelope::encode(&entries), bytes, "envelope re-encodes");
    }
}

/// A stream that yields a fixed script of bytes, then EOF, and swallows writes.
#[derive(Debug)]
struct Scripted {
    input: std::io::Cursor<Vec<u8>>,
    closed: Arc<AtomicBool>,
}

impl Read for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(0);
        }
        self.input.read(buf)
    }
}

impl Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stream for Scripted {
    fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
    }
    fn set_read_timeout(&self, _t: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _t: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn deadlines(&self) -> crate::transport::Deadlines {
        crate::transport::Deadlines::default()
    }
    fn shutdown_handle(&self) -> Box<dyn Fn() + Send + Sync> {
        let c = self.closed.clone();
        Box::new(move || c.store(true, Ordering::Release))
    }
}

/// Hands out scripted streams in order, then refuses.
#[derive(Debug)]
struct ScriptedAcceptor(Mutex<VecDeque<Vec<u8>>>);

impl Acceptor for ScriptedAcceptor {
    fn accept(&self, _timeout: Duration) -> Result<Box<dyn Stream>, TransportError> {
        match self.0.lock().expect("script lock").pop_front() {
            Some(b) => Ok(Box::new(Scripted {
                input: std::io::Cursor::new(b),
                closed: Arc::new(AtomicBool::new(false)),
            })),
            None => Err(TransportError::Accept(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no more scripted streams",
            ))),
        }
    }
}

/// Split a `receiver_stream` input into per-stream byte scripts:
/// `n u8 | len0 u32le | control[len0] | len1 u32le | page0[len1] | page1…`
/// (`n % 3` page streams are offered; lengths are clamped to what is left).
pub fn split_streams(bytes: &[u8]) -> Vec<Vec<u8>> {
    let Some((&n, mut rest)) = bytes.split_first() else {
        return vec![Vec::new()];
    };
    let streams = 1 + n as usize % 3;
    let mut out = Vec::with_capacity(streams);
    for i in 0..streams {
        if i + 1 == streams || rest.len() < 4 {
            out.push(rest.to_vec());
            rest = &[];
            continue;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let len = len.min(rest.len() - 4);
        out.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    out
}

/// Inverse of [`split_streams`] (for building seeds from recorded sessions).
pub fn join_streams(streams: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![(streams.len().clamp(1, 3) - 1) as u8];
    for (i, s) in streams.iter().enumerate() {
        if i + 1 < streams.len() {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(s);
    }
    out
}

/// The memory bound of the [`receiver_setup`] harness: a layout above it is
/// refused at setup, so no input maps more.
pub const SETUP_MAX_MEMORY: u64 = 64 << 20;

/// Feed `bytes` (see [`split_streams`]) to a whole receiver that builds its memory
/// from the source's layout: handshake, setup (layout arithmetic, memory bound,
/// attachment index), stream accept, rounds and commit all run on fuzzed bytes.
/// The receiver's memory bound is [`SETUP_MAX_MEMORY`], so a hostile layout is
/// refused before anything is mapped and no input allocates beyond it.
pub fn receiver_setup(bytes: &[u8]) -> Result<(), String> {
    let acceptor = ScriptedAcceptor(Mutex::new(split_streams(bytes).into()));
    let r = Receiver::new()
        .config(ReceiverConfig {
            huge_pages: false,
            prefault: false,
            prealloc: false,
            // The scripted acceptor never waits; a short overall accept deadline
            // would only make a loaded machine fail complete sessions.
            accept_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(2),
            max_streams: 4,
            max_memory: Some(SETUP_MAX_MEMORY),
            max_device_state: 1 << 20,
            ..Default::default()
        })
        .run(&acceptor);
    match r {
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Feed `bytes` (see [`split_streams`]) to a whole receiver as its incoming
/// streams: each yields its script then EOF, and replies are discarded. The
/// receiver must fail cleanly (or succeed on a byte-perfect recorded session); the
/// destination memory is a fixed 1 MiB at gpa 0, mapped once per thread and
/// reused, so a hostile layout cannot make it allocate ([`receiver_setup`] covers the layout path).
pub fn receiver_stream(bytes: &[u8]) -> Result<(), String> {
    // One mapping per thread, reused by every input: caller memory may hold
    // anything (the receiver checks zero pages in it), so what the previous input
    // wrote is one more hostile starting state, and no input pays for an mmap.
    thread_local! {
        static MEMORY: std::cell::OnceCell<Arc<GuestMemory>> = const { std::cell::OnceCell::new() };
    }
    let memory = MEMORY.with(|m| match m.get() {
        Some(m) => Ok(m.clone()),
        None => {
            let fresh =
                Arc::new(GuestMemory::anonymous(1 << 20, false).map_err(|e| e.to_string())?);
            Ok::<_, String>(m.get_or_init(|| fresh).clone())
        }
    })?;
    let acceptor = ScriptedAcceptor(Mutex::new(split_streams(bytes).into()));
    let r = Receiver::new()
        .memory(memory)
        .config(ReceiverConfig {
            huge_pages: false,
            prefault: false,
            // The scripted acceptor never waits; a short overall accept deadline
            // would only make a loaded machine fail complete sessions.
            accept_timeout: Duration::from_secs(2),
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
