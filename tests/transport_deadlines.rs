//! Deadlines on every stream type: a peer that stops reading or never writes makes
//! the next write or read fail with `TransportError::TimedOut` naming the stream and
//! the deadline, within a bound, and never with a bare EAGAIN.

use std::time::{Duration, Instant};

use livemig::transport::framed::{FrameReader, FrameWriter};
use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
use livemig::transport::{mem, Acceptor, Connector, Stream, TransportError};
use livemig::wire::{ControlMsg, FrameKind};

/// Slack on top of a deadline for filling the socket buffers and a loaded machine.
const SLACK: Duration = Duration::from_secs(8);

/// Write 1 MiB frames until the writer fails; returns the error.
fn write_until_stuck(stream: Box<dyn Stream>, what: &'static str) -> TransportError {
    let mut w = FrameWriter::new(stream, what);
    let payload = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    loop {
        if let Err(e) = w.send(FrameKind::Batch, 0, &[], &[&payload]) {
            return e;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "writes to a peer that never reads kept succeeding for 60 s"
        );
    }
}

fn assert_timed_out(e: &TransportError, what: &str, after: Duration) {
    match e {
        TransportError::TimedOut { what: w, after: a } => {
            assert_eq!(*w, what, "{e}");
            assert_eq!(*a, after, "{e}");
        }
        other => panic!("expected a timeout on the {what} stream, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("the {what} stream timed out")),
        "{msg}"
    );
    assert!(msg.contains("peer"), "{msg}");
    assert!(!msg.contains("os error"), "{msg}");
}

#[test]
fn tcp_writer_to_a_peer_that_never_reads_times_out() {
    let peer = Duration::from_secs(1);
    let acceptor = TcpAcceptor::bind("127.0.0.1:0")
        .expect("bind")
        .peer_timeout(peer);
    let addr = acceptor.local_addr().unwrap().to_string();
    let connector = TcpConnector::new(addr).peer_timeout(peer);
    let stream = connector.connect().expect("connect");
    // The destination accepts and then never reads (a stopped process).
    let held = acceptor.accept(Duration::from_secs(5)).expect("accept");
    let t0 = Instant::now();
    let e = write_until_stuck(stream, "page");
    let took = t0.elapsed();
    assert_timed_out(&e, "page", peer);
    // The deadline counts from when the peer stopped taking data, which may be
    // before the last frame fitted into the socket buffers.
    assert!(took >= peer, "failed after {took:?}, before the deadline");
    assert!(
        took < peer + SLACK,
        "took {took:?} to notice a stalled peer"
    );
    drop(held);
}

#[test]
fn tcp_reader_of_a_silent_peer_times_out() {
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").expect("bind");
    let addr = acceptor.local_addr().unwrap().to_string();
    let stream = TcpConnector::new(addr).connect().expect("connect");
    let _held = acceptor.accept(Duration::from_secs(5)).expect("accept");
    let wait = Duration::from_millis(300);
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut r = FrameReader::new(stream, "control");
    let t0 = Instant::now();
    let e = r.control().expect_err("the peer never writes");
    assert_timed_out(&e, "control", wait);
    assert!(t0.elapsed() < wait + SLACK);
}

#[test]
fn tcp_control_replies_to_a_peer_that_never_reads_time_out() {
    // The bidirectional control stream's writes carry the deadline too.
    let peer = Duration::from_secs(1);
    let acceptor = TcpAcceptor::bind("127.0.0.1:0")
        .expect("bind")
        .peer_timeout(peer);
    let addr = acceptor.local_addr().unwrap().to_string();
    let _client = TcpConnector::new(addr).connect().expect("connect");
    let mut r = FrameReader::new(acceptor.accept(Duration::from_secs(5)).unwrap(), "control");
    let big = vec![1u8; 1 << 20];
    let t0 = Instant::now();
    let e = loop {
        if let Err(e) = r.send_control(&ControlMsg::SetupOk, &big) {
            break e;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "never timed out");
    };
    assert_timed_out(&e, "control", peer);
    assert!(t0.elapsed() < peer + SLACK);
}

#[test]
fn unix_writer_to_a_peer_that_never_reads_times_out() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let wait = Duration::from_millis(400);
    Stream::set_write_timeout(&a, Some(wait)).unwrap();
    let t0 = Instant::now();
    let e = write_until_stuck(Box::new(a), "page");
    assert_timed_out(&e, "page", wait);
    assert!(t0.elapsed() < wait + SLACK);
}

#[test]
fn mem_writer_to_a_peer_that_never_reads_times_out() {
    let (a, _b) = mem::duplex();
    let wait = Duration::from_millis(300);
    a.set_write_timeout(Some(wait)).unwrap();
    assert_eq!(a.deadlines().write, Some(wait));
    let t0 = Instant::now();
    let e = write_until_stuck(Box::new(a), "page");
    assert_timed_out(&e, "page", wait);
    assert!(t0.elapsed() < wait + SLACK);
}

#[test]
fn a_peer_that_resumes_reading_in_time_is_not_timed_out() {
    // Slowness is not silence: a reader that drains a chunk every 20 ms never trips a 2 s
    // write deadline.
    let (a, mut b) = mem::duplex();
    a.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        while got < 24 << 20 {
            std::thread::sleep(Duration::from_millis(20));
            match b.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let mut w = FrameWriter::new(Box::new(a), "page");
    let payload = vec![7u8; 1 << 20];
    for _ in 0..16 {
        w.send(FrameKind::Batch, 0, &[], &[&payload])
            .expect("a slow reader is not a dead one");
    }
    drop(w);
    assert!(reader.join().unwrap() >= 16 << 20);
}
