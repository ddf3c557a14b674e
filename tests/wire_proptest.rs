//! Property tests for the wire types: every value round-trips through its encoding,
//! and whatever a decoder accepts re-encodes to the same bytes (one encoding per
//! value, so nothing is accepted loosely). Also: the sender's batches always pass
//! the receiver's extent checks (sorted, disjoint, inside a region).

use livemig::session::SessionToken;
use proptest::prelude::*;

use livemig::codec::CodecId;
use livemig::engine::batches_of;
use livemig::memory::{GuestMemory, GuestRegion, MemoryLayout, PageSet, PAGE_SIZE};
use livemig::wire::batch::{BatchMeta, FLAG_DELTA, FLAG_RACY};
use livemig::wire::control::{CompatVector, RefuseCode};
use livemig::wire::frame::RoundEnd;
use livemig::wire::{ControlMsg, Extent, FrameHeader, FrameKind, FRAME_HEADER_LEN};

fn kind() -> impl Strategy<Value = FrameKind> {
    prop_oneof![
        Just(FrameKind::Control),
        Just(FrameKind::Batch),
        Just(FrameKind::RoundEnd),
        Just(FrameKind::StreamEnd),
    ]
}

fn header() -> impl Strategy<Value = FrameHeader> {
    (
        kind(),
        any::<u8>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(kind, flags, m, d, crc)| {
            let (max_meta, max_data) = kind.bounds();
            FrameHeader {
                kind,
                flags,
                meta_len: m % (max_meta as u32 + 1),
                data_len: d % (max_data as u32 + 1),
                crc,
            }
        })
}

/// A valid batch meta: 1..=256 pages in sorted, disjoint extents.
fn batch_meta() -> impl Strategy<Value = BatchMeta> {
    (
        any::<u32>(),
        prop_oneof![Just(CodecId::Raw), Just(CodecId::Lz4), Just(CodecId::Zstd)],
        prop::collection::vec((0u64..1000, 1u32..20), 1..20),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(round, codec, runs, seed, delta, racy)| {
            let mut extents = Vec::new();
            let mut gfn = 0u64;
            let mut n = 0usize;
            for (gap, count) in runs {
                let count = count.min((256 - n) as u32);
                if count == 0 {
                    break;
                }
                gfn += gap;
                extents.push(Extent { gfn, count });
                gfn += count as u64;
                n += count as usize;
            }
            let mut x = seed;
            let mut zero_map = vec![0u8; n.div_ceil(8)];
            for i in 0..n {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if x >> 62 == 0 {
                    zero_map[i / 8] |= 1 << (i % 8);
                }
            }
            let nonzero = n - zero_map
                .iter()
                .map(|b| b.count_ones() as usize)
                .sum::<usize>();
            let flags = if delta {
                FLAG_DELTA
            } else if racy {
                FLAG_RACY
            } else {
                0
            };
            let payload_len = if delta {
                (nonzero * 5) as u32
            } else {
                (nonzero * PAGE_SIZE) as u32
            };
            BatchMeta {
                round,
                codec: Some(codec),
                flags,
                payload_len,
                extents,
                zero_map,
                hashes: (0..n as u64).map(|i| i.wrapping_mul(seed | 1)).collect(),
            }
        })
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn control_msg() -> impl Strategy<Value = ControlMsg> {
    prop_oneof![
        (
            text(),
            any::<u16>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            prop::collection::vec(text(), 0..4)
        )
            .prop_map(|(magic, major, minor, session, streams, capabilities)| {
                ControlMsg::Hello {
                    magic,
                    major,
                    minor,
                    session: SessionToken::from_bytes(session),
                    streams,
                    capabilities,
                }
            }),
        (
            prop::collection::vec((any::<u64>(), any::<u64>()), 0..4),
            prop::collection::vec(text(), 0..3),
            any::<u64>(),
            prop::collection::vec((text(), any::<u64>()), 0..3)
        )
            .prop_map(
                |(regions, switches, config_len, participants)| ControlMsg::Setup {
                    layout: MemoryLayout { regions },
                    compat: CompatVector {
                        cpu_features: vec![],
                        switches,
                    },
                    config_len,
                    participants,
                }
            ),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(session, index)| {
            ControlMsg::StreamHello {
                session: SessionToken::from_bytes(session),
                index,
            }
        }),
        any::<u32>().prop_map(|final_round| ControlMsg::Brownout { final_round }),
        (any::<[u64; 2]>(), any::<u64>(), any::<u32>()).prop_map(|(digest, pages, rounds)| {
            ControlMsg::Commit {
                digest: livemig::proof::MemoryDigest(digest),
                pages,
                rounds,
            }
        }),
        text().prop_map(|message| ControlMsg::Refuse {
            code: RefuseCode::MemoryLayout,
            message
        }),
        (text(), text()).prop_map(|(participant, reason)| ControlMsg::Veto {
            participant,
            reason
        }),
        text().prop_map(|reason| ControlMsg::Abort { reason }),
        Just(ControlMsg::DeviceState),
        Just(ControlMsg::SetupOk),
        Just(ControlMsg::Released),
        any::<u32>().prop_map(|round| ControlMsg::Drain { round }),
        (any::<u32>(), any::<bool>(), any::<u64>(), any::<bool>()).prop_map(
            |(round, applied, waited_us, host_busy)| ControlMsg::Drained {
                round,
                applied,
                waited_us,
                host_busy,
            }
        ),
    ]
}

/// A destination that does not look at its host's load sends `Drained` without
/// `host_busy`: it reads as not busy, and the rest of the answer is kept.
#[test]
fn drained_without_host_busy_reads_as_not_busy() {
    let old = br#"{"type":"drained","round":3,"applied":true,"waited_us":120}"#;
    assert_eq!(
        ControlMsg::decode(old),
        Ok(ControlMsg::Drained {
            round: 3,
            applied: true,
            waited_us: 120,
            host_busy: false
        })
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn frame_header_round_trips(h in header()) {
        prop_assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn frame_header_accepts_only_its_encoding(b in any::<[u8; FRAME_HEADER_LEN]>()) {
        if let Ok(h) = FrameHeader::decode(&b) {
            prop_assert_eq!(h.encode(), b);
        }
    }

    #[test]
    fn batch_meta_round_trips(m in batch_meta()) {
        let mut b = Vec::new();
        m.encode_into(&mut b);
        let mut d = BatchMeta::default();
        prop_assert_eq!(d.decode_from(&b), Ok(()));
        prop_assert_eq!(d, m);
    }

    #[test]
    fn batch_meta_accepts_only_its_encoding(b in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut d = BatchMeta::default();
        if d.decode_from(&b).is_ok() {
            let mut again = Vec::new();
            d.encode_into(&mut again);
            prop_assert_eq!(again, b);
        }
    }

    #[test]
    fn round_end_round_trips(round in any::<u32>(), batches in any::<u32>(), pages in any::<u64>()) {
        let r = RoundEnd { round, batches, pages };
        prop_assert_eq!(RoundEnd::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn control_msg_round_trips(m in control_msg()) {
        prop_assert_eq!(ControlMsg::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn sender_batches_pass_the_receiver_extent_checks(
        bits in prop::collection::vec(any::<bool>(), 96),
        max_pages in 1usize..40,
    ) {
        // Two regions with a hole between them, and a third adjacent to the second.
        let mem = GuestMemory::new(vec![
            GuestRegion::anonymous(0, 32 * PAGE_SIZE, false).unwrap(),
            GuestRegion::anonymous(64 * PAGE_SIZE as u64, 32 * PAGE_SIZE, false).unwrap(),
            GuestRegion::anonymous(96 * PAGE_SIZE as u64, 32 * PAGE_SIZE, false).unwrap(),
        ]).unwrap();
        let mut set = PageSet::new(mem.total_pages());
        for (i, b) in bits.iter().enumerate() {
            if *b {
                set.insert(i as u64);
            }
        }
        let mut seen = 0usize;
        let mut result = Ok(());
        batches_of(&mem, set.iter(), 1, false, max_pages, |b| {
            let n: usize = b.extents.iter().map(|e| e.1 as usize).sum();
            let meta = BatchMeta {
                round: 1,
                codec: Some(CodecId::Raw),
                flags: 0,
                payload_len: (n * PAGE_SIZE) as u32,
                extents: b.extents.iter().map(|&(i, count)| Extent {
                    gfn: mem.gfn_of(i).unwrap(),
                    count,
                }).collect(),
                zero_map: vec![0; n.div_ceil(8)],
                hashes: vec![0; n],
            };
            let mut enc = Vec::new();
            meta.encode_into(&mut enc);
            let mut d = BatchMeta::default();
            if let Err(e) = d.decode_from(&enc) {
                result = Err(format!("{e}: {:?}", meta.extents));
                return false;
            }
            seen += n;
            true
        });
        prop_assert_eq!(result, Ok(()));
        prop_assert_eq!(seen, bits.iter().filter(|b| **b).count());
    }
}
