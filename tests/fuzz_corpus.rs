//! Replays the fuzz seed corpora (`fuzz/corpus/*`) through the same entry points the
//! fuzz targets use, plus a few thousand mutated inputs from a seeded generator, so
//! `cargo test` covers the decoders and the receiver against hostile bytes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{with_timeout, Tee, GUARD};
use livemig::codec::CodecId;
use livemig::device::envelope;
use livemig::engine::{Migration, MigrationConfig, Mode};
use livemig::memory::GuestMemory;
use livemig::receiver::{Receiver, ReceiverConfig};
use livemig::transport::framed::write_frame;
use livemig::transport::{mem, Connector, Stream, TransportError};
use livemig::wire::batch::BatchMeta;
use livemig::wire::frame::RoundEnd;
use livemig::wire::{ControlMsg, Extent, FrameKind};
use livemig::workload::{self, splitmix, Content};

/// A seed that is a whole recorded session (full or compact), not cut short.
fn is_complete_session(name: &str) -> bool {
    (name.starts_with("seed_session") || name.starts_with("seed_compact"))
        && !name.contains("truncated")
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("corpus {target}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Seed generation.

fn frame(kind: FrameKind, meta: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, kind, 0, meta, &[data]).unwrap();
    out
}

fn control(msg: &ControlMsg, attachment: &[u8]) -> Vec<u8> {
    frame(FrameKind::Control, &msg.encode(), attachment)
}

fn frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hello = control(
        &ControlMsg::Hello {
            magic: "livemig".into(),
            major: livemig::wire::PROTOCOL_MAJOR,
            minor: livemig::wire::PROTOCOL_MINOR,
            session: livemig::session::SessionToken::from_bytes([0x5e; 16]),
            streams: 2,
            capabilities: vec!["digest-xxh3".into()],
        },
        &[],
    );
    let mut page = vec![0u8; 4096];
    page[..5].copy_from_slice(b"hello");
    let meta = BatchMeta {
        round: 0,
        codec: Some(CodecId::Raw),
        flags: 0,
        payload_len: 4096,
        extents: vec![Extent { gfn: 0, count: 1 }, Extent { gfn: 10, count: 1 }],
        zero_map: vec![0b10],
        hashes: vec![
            livemig::memory::page_hash(&page),
            livemig::memory::zero_page_hash(),
        ],
    };
    let mut mb = Vec::new();
    meta.encode_into(&mut mb);
    let batch = frame(FrameKind::Batch, &mb, &page);
    let mut lz = Vec::new();
    let mut codecs = livemig::codec::CodecSet::new(1);
    codecs.get(CodecId::Lz4).encode(&page, &mut lz).unwrap();
    let lmeta = BatchMeta {
        codec: Some(CodecId::Lz4),
        ..meta.clone()
    };
    let mut lmb = Vec::new();
    lmeta.encode_into(&mut lmb);
    let lz_batch = frame(FrameKind::Batch, &lmb, &lz);
    let round_end = frame(
        FrameKind::RoundEnd,
        &RoundEnd {
            round: 0,
            batches: 1,
            pages: 2,
        }
        .encode(),
        &[],
    );
    let env = envelope::encode(&[envelope::Entry {
        id: "cpu".into(),
        version: 1,
        blob: b"registers".to_vec(),
    }]);
    let device = control(&ControlMsg::DeviceState, &env);
    let commit = control(
        &ControlMsg::Commit {
            digest: livemig::proof::MemoryDigest([1, 2]),
            pages: 256,
            rounds: 2,
        },
        &[],
    );
    let setup = control(
        &ControlMsg::Setup {
            layout: livemig::memory::MemoryLayout {
                regions: vec![(0, 1 << 20)],
            },
            compat: Default::default(),
            config_len: 3,
            participants: vec![],
        },
        b"cfg",
    );
    let stream_end = frame(FrameKind::StreamEnd, &[], &[]);
    let mut session = hello.clone();
    session.extend_from_slice(&setup);
    let mut pages = batch.clone();
    pages.extend_from_slice(&round_end);
    pages.extend_from_slice(&stream_end);
    vec![
        ("hello", hello.clone()),
        ("hello_truncated", hello[..hello.len() / 2].to_vec()),
        ("setup", setup),
        ("batch_raw", batch.clone()),
        ("batch_raw_truncated", batch[..40].to_vec()),
        ("batch_lz4", lz_batch),
        ("batch_meta_only", mb),
        ("round_end", round_end),
        ("stream_end", stream_end),
        ("device_state", device),
        ("envelope_only", env),
        ("commit", commit),
        ("hello_setup", session),
        ("pages_round", pages),
        ("header_only", batch[..16].to_vec()),
    ]
}

/// One stream's recorded bytes.
type Log = Arc<Mutex<Vec<u8>>>;

/// Tees everything written on each stream into a per-stream buffer.
struct Recorder {
    inner: mem::MemConnector,
    streams: Arc<Mutex<Vec<Log>>>,
}

impl Connector for Recorder {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let log = Arc::new(Mutex::new(Vec::new()));
        self.streams.lock().unwrap().push(log.clone());
        Ok(Box::new(Tee {
            inner: self.inner.connect()?,
            log,
        }))
    }
    fn describe(&self) -> String {
        "recorder".into()
    }
}

/// Record the source's bytes of a real 1 MiB migration (stopped VM, so the session
/// replays identically): one control stream plus `streams` page streams.
/// Pages of content in a compact session's guest (the rest are zero, which a
/// batch carries as bits in its meta): a whole session in a few KiB, so the
/// fuzzer runs the full receiver path many times a second.
const COMPACT_PAGES: usize = 4;

fn record_session(streams: u16, mode: Mode, codec: CodecId, compact: bool) -> Vec<Vec<u8>> {
    with_timeout(GUARD, "record session", move || {
        let mem = Arc::new(GuestMemory::anonymous(1 << 20, false).unwrap());
        if compact {
            let some = GuestMemory::anonymous(COMPACT_PAGES * 4096, false).unwrap();
            workload::fill(&some, Content::Mix, 5, 1).unwrap();
            let mut buf = vec![0u8; COMPACT_PAGES * 4096];
            some.read_pages(0, &mut buf).unwrap();
            mem.write_pages(0, &buf).unwrap();
        } else {
            workload::fill(&mem, Content::Mix, 5, 1).unwrap();
        }
        let (c, a) = mem::pair();
        let rec = Recorder {
            inner: c,
            streams: Arc::default(),
        };
        let logs = rec.streams.clone();
        let rx = std::thread::spawn(move || {
            Receiver::new()
                .config({
                    let mut settings = ReceiverConfig::default();
                    settings.huge_pages = false;
                    settings.prefault = false;
                    settings
                })
                .run(&a)
        });
        Migration::new(mem)
            .config({
                let mut settings = MigrationConfig::default();
                settings.mode = mode;
                settings.streams = streams;
                settings.codec = codec;
                settings
            })
            .run(&rec)
            .expect("recorded migration");
        rx.join().unwrap().expect("recorded receiver");
        let logs = logs.lock().unwrap();
        logs.iter().map(|l| l.lock().unwrap().clone()).collect()
    })
}

fn receiver_seeds() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for (name, streams, mode, codec, compact) in [
        ("session_raw_1", 1, Mode::Multichannel, CodecId::Raw, false),
        ("session_raw_2", 2, Mode::Multichannel, CodecId::Raw, false),
        ("session_lz4_1", 1, Mode::Compress, CodecId::Lz4, false),
        ("session_zstd_2", 2, Mode::Compress, CodecId::Zstd, false),
        ("compact_raw_2", 2, Mode::Multichannel, CodecId::Raw, true),
        ("compact_lz4_1", 1, Mode::Compress, CodecId::Lz4, true),
        ("compact_zstd_2", 2, Mode::Compress, CodecId::Zstd, true),
    ] {
        let s = record_session(streams, mode, codec, compact);
        let joined = livemig::fuzz::join_streams(&s);
        v.push((
            format!("{name}_truncated"),
            joined[..joined.len() * 2 / 3].to_vec(),
        ));
        v.push((name.to_string(), joined));
    }
    v.push(("hello_only".into(), {
        let mut s = vec![0u8];
        s.extend_from_slice(&frame_seeds()[0].1);
        s
    }));
    v
}

fn control_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let msgs = [
        ("hello", frame_seeds()[0].1.clone()),
        (
            "setup",
            ControlMsg::Setup {
                layout: livemig::memory::MemoryLayout {
                    regions: vec![(0, 1 << 20), (1 << 32, 1 << 20)],
                },
                compat: livemig::wire::control::CompatVector {
                    cpu_features: vec!["sse4.2".into()],
                    switches: vec!["external".into()],
                },
                config_len: 3,
                participants: vec![("port:eth0".into(), 12)],
            }
            .encode(),
        ),
        (
            "stream_hello",
            ControlMsg::StreamHello {
                session: livemig::session::SessionToken::from_bytes([0x5e; 16]),
                index: 1,
            }
            .encode(),
        ),
        (
            "commit",
            ControlMsg::Commit {
                digest: livemig::proof::MemoryDigest([u64::MAX; 2]),
                pages: 256,
                rounds: 3,
            }
            .encode(),
        ),
        (
            "refuse",
            ControlMsg::Refuse {
                code: livemig::wire::control::RefuseCode::MemoryLayout,
                message: "not enough memory".into(),
            }
            .encode(),
        ),
        ("device_state", ControlMsg::DeviceState.encode()),
    ];
    // The hello seed is a whole frame; keep only its JSON.
    msgs.into_iter()
        .map(|(n, b)| {
            if n == "hello" {
                let (_, meta, _, _) = livemig::wire::frame::decode_frame(&b).unwrap();
                (n, meta.to_vec())
            } else {
                (n, b)
            }
        })
        .collect()
}

/// Codec seeds: output length (whole pages: 0x8000 | pages) then the payload.
fn codec_seeds(codec: CodecId) -> Vec<(&'static str, Vec<u8>)> {
    let mem = GuestMemory::anonymous(4 * 4096, false).unwrap();
    workload::fill(&mem, Content::Mix, 9, 1).unwrap();
    let mut pages = vec![0u8; 4 * 4096];
    mem.read_pages(0, &mut pages).unwrap();
    let mut text = vec![0u8; 4096];
    for (i, b) in text.iter_mut().enumerate() {
        *b = b"the quick brown fox "[i % 20];
    }
    let mut codecs = livemig::codec::CodecSet::new(1);
    let mut seed = |input: &[u8]| {
        let mut out = Vec::new();
        codecs.get(codec).encode(input, &mut out).unwrap();
        let n = 0x8000u16 | (input.len() / 4096) as u16;
        let mut v = n.to_le_bytes().to_vec();
        v.extend_from_slice(&out);
        v
    };
    vec![
        ("text_page", seed(&text)),
        ("mix_4_pages", seed(&pages)),
        ("zero_page", seed(&[0u8; 4096])),
    ]
}

fn delta_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let old = vec![7u8; 4096];
    let mut new = old.clone();
    new[10..20].copy_from_slice(b"0123456789");
    new[4000] = 1;
    let mut delta = Vec::new();
    livemig::codec::delta::encode(&old, &new, &mut delta, 4096).unwrap();
    let mut records = vec![1u8];
    records.extend_from_slice(&new);
    records.push(2);
    records.extend_from_slice(&(delta.len() as u32).to_le_bytes());
    records.extend_from_slice(&delta);
    records.push(2);
    records.extend_from_slice(&0u32.to_le_bytes());
    vec![("delta_only", delta), ("records_full_delta_empty", records)]
}

fn envelope_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", envelope::encode(&[])),
        (
            "two_entries",
            envelope::encode(&[
                envelope::Entry {
                    id: "vcpu0".into(),
                    version: 2,
                    blob: vec![1, 2, 3, 4],
                },
                envelope::Entry {
                    id: "port:eth0".into(),
                    version: 1,
                    blob: vec![],
                },
            ]),
        ),
    ]
}

fn setup_seeds() -> Vec<(String, Vec<u8>)> {
    // Recorded sessions (the receiver builds its memory from their layout), plus
    // handshakes with hostile layouts.
    // (The one-stream raw session is left to `receiver_stream` to keep the
    // checked-in corpus small.)
    let mut v: Vec<_> = receiver_seeds()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("session_raw_1"))
        .collect();
    for (name, regions) in [
        (
            "layout_overflow",
            vec![(0u64, 1u64 << 63), (1 << 63, 1 << 63)],
        ),
        ("layout_too_large", vec![(0, 1 << 40)]),
        ("layout_two_regions", vec![(0, 1 << 20), (1 << 30, 1 << 20)]),
    ] {
        let mut s = vec![0u8];
        s.extend_from_slice(&frame_seeds()[0].1);
        s.extend_from_slice(&control(
            &ControlMsg::Setup {
                layout: livemig::memory::MemoryLayout { regions },
                compat: Default::default(),
                config_len: 0,
                participants: vec![],
            },
            &[],
        ));
        v.push((name.to_string(), s));
    }
    v
}

/// Named seed inputs of one target.
type Seeds = Vec<(String, Vec<u8>)>;

/// Every corpus directory and its seeds.
fn all_seeds() -> Vec<(&'static str, Seeds)> {
    let owned = |v: Vec<(&'static str, Vec<u8>)>| {
        v.into_iter()
            .map(|(n, b)| (n.to_string(), b))
            .collect::<Vec<_>>()
    };
    vec![
        ("frame_decode", owned(frame_seeds())),
        ("receiver_stream", receiver_seeds()),
        ("receiver_setup", setup_seeds()),
        ("control_msg", owned(control_seeds())),
        ("codec_lz4", owned(codec_seeds(CodecId::Lz4))),
        ("codec_zstd", owned(codec_seeds(CodecId::Zstd))),
        ("codec_delta", owned(delta_seeds())),
        ("envelope", owned(envelope_seeds())),
    ]
}

/// Rewrite the seed corpora (run by hand after a wire format change).
#[test]
#[ignore]
fn regenerate_corpus() {
    for (target, seeds) in all_seeds() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed_{name}")), bytes).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// Replay and mutation.

fn mutate(seed: &[u8], rng: &mut u64) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + splitmix(rng) % 4 {
        let r = splitmix(rng);
        match r % 6 {
            0 if !v.is_empty() => {
                let i = (r >> 8) as usize % v.len();
                v[i] ^= 1 << ((r >> 40) % 8);
            }
            1 if !v.is_empty() => {
                let i = (r >> 8) as usize % v.len();
                v[i] = (r >> 32) as u8;
            }
            2 => {
                let cut = (r >> 8) as usize % (v.len() + 1);
                v.truncate(cut);
            }
            3 => {
                let i = (r >> 8) as usize % (v.len() + 1);
                let n = (r >> 40) as usize % 16;
                let mut x = r;
                let ins: Vec<u8> = (0..n).map(|_| splitmix(&mut x) as u8).collect();
                v.splice(i..i, ins);
            }
            4 if v.len() >= 4 => {
                // Interesting integers into a length field position.
                let i = (r >> 8) as usize % (v.len() - 3);
                let val: u32 = [0, 1, 0xFFFF_FFFF, 0x8000_0000, 4096, 4097][(r >> 40) as usize % 6];
                v[i..i + 4].copy_from_slice(&val.to_le_bytes());
            }
            _ => {
                let n = (r >> 8) as usize % 64;
                let mut x = r;
                v.extend((0..n).map(|_| splitmix(&mut x) as u8));
            }
        }
    }
    v
}

#[test]
fn frame_decode_corpus_replays() {
    let c = corpus("frame_decode");
    assert!(c.len() >= 10, "seed corpus missing: {}", c.len());
    for (name, bytes) in &c {
        livemig::wire::fuzz_decode(bytes);
        // Seeds are real frames: the well-formed ones must decode.
        if name.starts_with("seed_") && !name.contains("truncated") && !name.contains("only") {
            assert!(
                livemig::wire::frame::decode_frame(bytes).is_ok(),
                "seed {name} no longer decodes (regenerate the corpus?)"
            );
        }
    }
}

#[test]
fn frame_decode_mutations() {
    let seeds: Vec<Vec<u8>> = corpus("frame_decode").into_iter().map(|c| c.1).collect();
    let mut rng = 0xF022_u64;
    for i in 0..5000 {
        let base = &seeds[i % seeds.len()];
        let input = if i % 10 == 9 {
            let n = splitmix(&mut rng) as usize % 300;
            (0..n).map(|_| splitmix(&mut rng) as u8).collect()
        } else {
            mutate(base, &mut rng)
        };
        livemig::wire::fuzz_decode(&input);
    }
}

#[test]
fn receiver_stream_corpus_replays() {
    let c = corpus("receiver_stream");
    assert!(c.len() >= 5, "seed corpus missing");
    let results = with_timeout(GUARD, "receiver corpus", move || {
        c.iter()
            .map(|(n, b)| (n.clone(), livemig::fuzz::receiver_stream(b)))
            .collect::<Vec<_>>()
    });
    for (name, r) in results {
        // A complete recorded session is accepted; anything else must fail.
        let complete = is_complete_session(&name);
        assert_eq!(r.is_ok(), complete, "{name}: {r:?}");
    }
}

#[test]
fn receiver_stream_mutations() {
    let seeds: Vec<Vec<u8>> = corpus("receiver_stream").into_iter().map(|c| c.1).collect();
    with_timeout(Duration::from_secs(120), "receiver mutations", move || {
        let mut rng = 0xBEEF_u64;
        for i in 0..400 {
            let input = mutate(&seeds[i % seeds.len()], &mut rng);
            // Success is possible only if the mutation was a no-op on the data
            // that matters; either way it must return.
            let _ = livemig::fuzz::receiver_stream(&input);
        }
    });
}

/// The recorded-session seeds in the corpus still match what this build sends
/// (otherwise the fuzzer starts from stale sessions).
#[test]
fn recorded_session_replays_successfully() {
    let s = record_session(2, Mode::Multichannel, CodecId::Raw, false);
    assert_eq!(s.len(), 3);
    let joined = livemig::fuzz::join_streams(&s);
    assert_eq!(livemig::fuzz::split_streams(&joined), s);
    livemig::fuzz::receiver_stream(&joined).expect("a recorded session replays");
    // Corrupting any one byte of the payload area makes it fail.
    let mut bad = joined.clone();
    let i = bad.len() - 5000;
    bad[i] ^= 0x01;
    assert!(livemig::fuzz::receiver_stream(&bad).is_err());
    // A compact session (mostly zero pages) is small and replays too, into the
    // memory the sessions above left full of their pages.
    let compact =
        livemig::fuzz::join_streams(&record_session(2, Mode::Multichannel, CodecId::Raw, true));
    assert!(compact.len() < 64 << 10, "{} bytes", compact.len());
    livemig::fuzz::receiver_stream(&compact).expect("a compact session replays");
}

/// The decoder targets' corpora replay through their entry points (a finding
/// copied into a corpus directory is a regression test from then on), and a few
/// thousand mutations of each seed return normally.
#[test]
fn decoder_corpora_replay_and_mutate() {
    type Entry = fn(&[u8]);
    let targets: [(&str, Entry, usize); 5] = [
        ("control_msg", livemig::fuzz::control_msg, 5),
        (
            "codec_lz4",
            |b| livemig::fuzz::codec_decode(CodecId::Lz4, b),
            3,
        ),
        (
            "codec_zstd",
            |b| livemig::fuzz::codec_decode(CodecId::Zstd, b),
            3,
        ),
        ("codec_delta", livemig::fuzz::delta_decode, 2),
        ("envelope", livemig::fuzz::envelope_decode, 2),
    ];
    let mut rng = 0x5EC_u64;
    for (target, run, min) in targets {
        let c = corpus(target);
        assert!(
            c.len() >= min,
            "{target}: seed corpus missing ({})",
            c.len()
        );
        for (_, bytes) in &c {
            run(bytes);
        }
        for i in 0..2000 {
            run(&mutate(&c[i % c.len()].1, &mut rng));
        }
    }
}

/// The seeds are what they claim: the envelope and control seeds decode, the
/// codec seeds decompress.
#[test]
fn decoder_seeds_are_valid() {
    // The generated seeds (`seed_*`), not what the fuzzer added beside them.
    let seeds = |target| {
        corpus(target)
            .into_iter()
            .filter(|(name, _)| name.starts_with("seed_"))
    };
    for (name, b) in seeds("envelope") {
        assert!(envelope::decode(&b).is_ok(), "{name}");
    }
    for (name, b) in seeds("control_msg") {
        assert!(ControlMsg::decode(&b).is_ok(), "{name}");
    }
    let mut codecs = livemig::codec::CodecSet::new(1);
    for (target, codec) in [("codec_lz4", CodecId::Lz4), ("codec_zstd", CodecId::Zstd)] {
        for (name, b) in seeds(target) {
            let n = u16::from_le_bytes([b[0], b[1]]) as usize;
            let mut out = vec![0u8; (n & 0x1ff) * 4096];
            codecs
                .get(codec)
                .decode(&b[2..], &mut out)
                .unwrap_or_else(|e| panic!("{target}/{name}: {e}"));
        }
    }
}

/// The setup-path receiver harness: complete recorded sessions commit with memory
/// built from their layout; hostile layouts and everything else fail cleanly.
#[test]
fn receiver_setup_corpus_replays() {
    let c = corpus("receiver_setup");
    assert!(c.len() >= 8, "seed corpus missing");
    let results = with_timeout(GUARD, "receiver setup corpus", move || {
        c.iter()
            .map(|(n, b)| (n.clone(), livemig::fuzz::receiver_setup(b)))
            .collect::<Vec<_>>()
    });
    for (name, r) in results {
        let complete = is_complete_session(&name);
        assert_eq!(r.is_ok(), complete, "{name}: {r:?}");
        if name.contains("layout_overflow") {
            assert!(r.unwrap_err().contains("overflows"), "{name}");
        } else if name.contains("layout_too_large") {
            assert!(r.unwrap_err().contains("not enough memory"), "{name}");
        }
    }
}

#[test]
fn receiver_setup_mutations() {
    let seeds: Vec<Vec<u8>> = corpus("receiver_setup").into_iter().map(|c| c.1).collect();
    with_timeout(
        Duration::from_secs(120),
        "receiver setup mutations",
        move || {
            let mut rng = 0x5E7_u64;
            for i in 0..300 {
                let _ = livemig::fuzz::receiver_setup(&mutate(&seeds[i % seeds.len()], &mut rng));
            }
        },
    );
}
