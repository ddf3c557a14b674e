//! Full migrations over loopback TCP and Unix sockets under a concurrent dirtier.

mod common;

use common::*;
use livemig::codec::CodecId;
use livemig::engine::{Mode, Verify};
use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
use livemig::transport::unix::{UnixAcceptor, UnixConnector};

fn tcp_e2e(kind: TrackerKind, mode: Mode, streams: u16, codec: CodecId) {
    let src = Source::default_running(32 * MIB, kind);
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").expect("bind");
    let addr = acceptor.local_addr().unwrap().to_string();
    let out = run_e2e(
        &src,
        config(mode, streams, codec, Verify::Digest),
        TcpConnector::new(addr),
        acceptor,
    );
    let (report, received) = assert_migrated(&src, out);
    assert_eq!(report.streams, streams);
    assert!(received.report.bytes_received > 0);
}

/// vmsplice + splice page sending under a running dirtier: pages change after they
/// were handed to the socket, are caught as dirty and sent again, and the
/// destination still ends equal to the paused source.
fn tcp_splice_e2e(kind: TrackerKind, streams: u16) {
    let src = Source::default_running(32 * MIB, kind);
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").expect("bind");
    let addr = acceptor.local_addr().unwrap().to_string();
    let mut cfg = config(Mode::Multichannel, streams, CodecId::Raw, Verify::Full);
    cfg.splice = true;
    let out = run_e2e(&src, cfg, TcpConnector::new(addr), acceptor);
    let (report, _) = assert_migrated(&src, out);
    assert_eq!(
        report.spliced_streams, streams,
        "every TCP page stream splices"
    );
    assert_eq!(
        report.tracker_misses, 0,
        "full verify found pages never re-sent"
    );
}

#[test]
fn tcp_splice_explicit_2_streams() {
    tcp_splice_e2e(TrackerKind::Explicit, 2);
}

#[test]
fn tcp_splice_hash_1_stream() {
    tcp_splice_e2e(TrackerKind::Hash, 1);
}

fn unix_e2e(kind: TrackerKind, streams: u16) {
    let src = Source::default_running(32 * MIB, kind);
    let path = temp_path("sock");
    let acceptor = UnixAcceptor::bind(&path).expect("bind unix socket");
    let out = run_e2e(
        &src,
        config(Mode::Multichannel, streams, CodecId::Raw, Verify::Digest),
        UnixConnector::new(&path),
        acceptor,
    );
    let _ = std::fs::remove_file(&path);
    assert_migrated(&src, out);
}

#[test]
fn tcp_explicit_1_stream() {
    tcp_e2e(TrackerKind::Explicit, Mode::Multichannel, 1, CodecId::Raw);
}

#[test]
fn tcp_explicit_2_streams() {
    tcp_e2e(TrackerKind::Explicit, Mode::Multichannel, 2, CodecId::Raw);
}

#[test]
fn tcp_explicit_4_streams() {
    tcp_e2e(TrackerKind::Explicit, Mode::Multichannel, 4, CodecId::Raw);
}

#[test]
fn tcp_hash_1_stream() {
    tcp_e2e(TrackerKind::Hash, Mode::Multichannel, 1, CodecId::Raw);
}

#[test]
fn tcp_hash_2_streams() {
    tcp_e2e(TrackerKind::Hash, Mode::Multichannel, 2, CodecId::Raw);
}

#[test]
fn tcp_hash_4_streams() {
    tcp_e2e(TrackerKind::Hash, Mode::Multichannel, 4, CodecId::Raw);
}

#[test]
fn tcp_standard() {
    tcp_e2e(TrackerKind::Explicit, Mode::Standard, 1, CodecId::Raw);
}

#[test]
fn tcp_compress_lz4_4_streams() {
    tcp_e2e(TrackerKind::Explicit, Mode::Compress, 4, CodecId::Lz4);
}

#[test]
fn tcp_compress_zstd_2_streams() {
    tcp_e2e(TrackerKind::Hash, Mode::Compress, 2, CodecId::Zstd);
}

#[test]
fn unix_explicit_1_stream() {
    unix_e2e(TrackerKind::Explicit, 1);
}

#[test]
fn unix_explicit_4_streams() {
    unix_e2e(TrackerKind::Explicit, 4);
}

#[test]
fn unix_hash_2_streams() {
    unix_e2e(TrackerKind::Hash, 2);
}
