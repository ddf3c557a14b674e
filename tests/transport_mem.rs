//! The in-memory transport honours read timeouts as a bound on the whole read
//! (regression: any timeout used to fail a read after one 50 ms poll, which broke
//! every migration over `mem::pair()` whose round took longer than 50 ms).

use std::io::{Read, Write};
use std::time::Duration;

use livemig::transport::mem::duplex;
use livemig::transport::Stream;

#[test]
fn read_waits_up_to_its_timeout() {
    let (mut a, mut b) = duplex();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let w = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        a.write_all(b"late").unwrap();
        a
    });
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf)
        .expect("data arriving within the timeout is read");
    assert_eq!(&buf, b"late");
    drop(w.join().unwrap());
}

#[test]
fn read_times_out_without_data() {
    let (_a, mut b) = duplex();
    b.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1];
    let e = b.read(&mut buf).expect_err("no data: timeout");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
}

#[test]
fn eof_after_peer_drops() {
    let (mut a, mut b) = duplex();
    a.write_all(b"x").unwrap();
    drop(a);
    let mut v = Vec::new();
    b.read_to_end(&mut v).unwrap();
    assert_eq!(v, b"x");
}
