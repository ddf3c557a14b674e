//! Mutual TLS on every stream: a migration over TLS, and each way a peer is refused
//! (no certificate, another CA, expired, wrong name) on both sides, quickly.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use livemig::codec::CodecId;
use livemig::engine::{Mode, Verify};
use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
use livemig::transport::tls::{TlsAcceptor, TlsConnector, TlsError, TlsIdentity};
use livemig::transport::{Acceptor, Connector, Stream, TransportError};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Every refusal must arrive well within this (the handshake deadline below).
const QUICK: Duration = Duration::from_secs(5);
const HANDSHAKE: Duration = Duration::from_secs(3);

/// A test CA made with rcgen.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Self { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `name` (PEM certificate, PEM key); `expired` puts its validity
    /// in the past.
    fn issue(&self, name: &str, expired: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// An identity with a leaf from this CA that trusts `trusted`.
    fn identity(&self, name: &str, expired: bool, trusted: &Ca) -> TlsIdentity {
        let (c, k) = self.issue(name, expired);
        TlsIdentity::from_pem(c.as_bytes(), k.as_bytes(), trusted.pem().as_bytes()).unwrap()
    }
}

const DEST: &str = "dest.livemig.test";
const SOURCE: &str = "source.livemig.test";

fn tls_acceptor(ca: &Ca, allowed_client: Option<&str>) -> (TlsAcceptor<TcpAcceptor>, String) {
    let tcp = TcpAcceptor::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap().to_string();
    let id = ca.identity(DEST, false, ca);
    let a = TlsAcceptor::new(tcp, &id, allowed_client)
        .unwrap()
        .handshake_timeout(HANDSHAKE);
    (a, addr)
}

/// A TLS connector to `addr` presenting `id` and expecting the peer `peer_name`.
fn tls_connector(addr: String, id: &TlsIdentity, peer_name: &str) -> TlsConnector<TcpConnector> {
    TlsConnector::new(TcpConnector::new(addr), id, peer_name)
        .unwrap()
        .handshake_timeout(HANDSHAKE)
}

type Side = Result<Box<dyn Stream>, TransportError>;

/// A source and a destination stream over a completed TLS handshake (one CA,
/// default handshake timeout).
fn connected_pair() -> (Box<dyn Stream>, Box<dyn Stream>) {
    let ca = Ca::new("livemig test CA");
    let (acceptor, addr) = tls_acceptor(&ca, None);
    let connector = TlsConnector::new(
        TcpConnector::new(addr),
        &ca.identity(SOURCE, false, &ca),
        DEST,
    )
    .unwrap();
    let (client, server) = handshake_pair(connector, acceptor);
    (client.unwrap(), server.unwrap())
}

/// One connect against one accept; both results, within [`QUICK`].
fn handshake_pair<C, A>(connector: C, acceptor: A) -> (Side, Side)
where
    C: Connector + 'static,
    A: Acceptor + 'static,
{
    with_timeout(Duration::from_secs(20), "handshake", move || {
        let t0 = Instant::now();
        let server = std::thread::spawn(move || acceptor.accept(QUICK));
        let client = connector.connect();
        let server = server.join().expect("acceptor thread panicked");
        assert!(
            t0.elapsed() < QUICK,
            "refusal took {:?}, longer than {QUICK:?}",
            t0.elapsed()
        );
        (client, server)
    })
}

/// Both sides failed; their messages.
fn both_refused(client: Side, server: Side) -> (String, String) {
    let c = match client {
        Ok(_) => panic!("the source's connect succeeded; server side: {server:?}"),
        Err(e) => e,
    };
    let s = match server {
        Ok(_) => panic!("the destination's accept succeeded; source side: {c}"),
        Err(e) => e,
    };
    for e in [&c, &s] {
        assert!(
            matches!(e, TransportError::Tls { .. }),
            "not a TLS error: {e:?}"
        );
        // The typed chain is kept: the TLS error is the source.
        let src = std::error::Error::source(e).expect("source kept");
        assert!(src.is::<TlsError>(), "source is not a TlsError: {src:?}");
    }
    let (c, s) = (c.to_string(), s.to_string());
    assert!(c.starts_with("TLS handshake with 127.0.0.1:"), "{c}");
    assert!(s.starts_with("TLS handshake with 127.0.0.1:"), "{s}");
    (c, s)
}

#[test]
fn migration_over_mutual_tls_completes_and_verifies() {
    let ca = Ca::new("livemig test CA");
    let (acceptor, addr) = tls_acceptor(&ca, Some(SOURCE));
    let connector = tls_connector(addr, &ca.identity(SOURCE, false, &ca), DEST);
    assert!(connector.describe().starts_with("tls+tcp://"));
    let src = Source::default_running(16 * MIB, TrackerKind::Explicit);
    let out = run_e2e(
        &src,
        config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest),
        connector,
        acceptor,
    );
    let (report, received) = assert_migrated(&src, out);
    assert_eq!(report.streams, 2);
    assert!(received.report.bytes_received > 0);
}

#[test]
fn source_without_certificate_is_refused_on_both_sides() {
    let ca = Ca::new("livemig test CA");
    let (acceptor, addr) = tls_acceptor(&ca, None);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            ca.cert.der().to_vec(),
        ))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = TlsConnector::with_config(
        TcpConnector::new(addr),
        Arc::new(config),
        DEST.try_into().unwrap(),
    )
    .handshake_timeout(HANDSHAKE);
    let (c, s) = both_refused_pair(connector, acceptor);
    assert!(s.contains("peer presented no certificate"), "{s}");
    assert!(c.contains("requires a certificate"), "{c}");
}

fn both_refused_pair<C, A>(connector: C, acceptor: A) -> (String, String)
where
    C: Connector + 'static,
    A: Acceptor + 'static,
{
    let (c, s) = handshake_pair(connector, acceptor);
    both_refused(c, s)
}

#[test]
fn certificate_from_another_ca_is_refused_on_both_sides() {
    let ca = Ca::new("livemig test CA");
    let rogue = Ca::new("another CA");
    let (acceptor, addr) = tls_acceptor(&ca, None);
    // The source trusts the right CA but its own certificate comes from another.
    let connector = tls_connector(addr, &rogue.identity(SOURCE, false, &ca), DEST);
    let (c, s) = both_refused_pair(connector, acceptor);
    assert!(s.contains("unknown issuer"), "{s}");
    assert!(c.contains("unknown CA"), "{c}");
}

#[test]
fn destination_from_another_ca_is_refused_on_both_sides() {
    let ca = Ca::new("livemig test CA");
    let rogue = Ca::new("another CA");
    let tcp = TcpAcceptor::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap().to_string();
    let acceptor = TlsAcceptor::new(tcp, &rogue.identity(DEST, false, &ca), None)
        .unwrap()
        .handshake_timeout(HANDSHAKE);
    let connector = tls_connector(addr, &ca.identity(SOURCE, false, &ca), DEST);
    let (c, s) = both_refused_pair(connector, acceptor);
    assert!(c.contains("unknown issuer"), "{c}");
    assert!(s.contains("unknown CA"), "{s}");
}

#[test]
fn expired_certificate_is_refused_on_both_sides() {
    let ca = Ca::new("livemig test CA");
    let (acceptor, addr) = tls_acceptor(&ca, None);
    let connector = tls_connector(addr, &ca.identity(SOURCE, true, &ca), DEST);
    let (c, s) = both_refused_pair(connector, acceptor);
    assert!(s.contains("peer certificate expired"), "{s}");
    assert!(
        c.contains("refused our certificate: certificate expired"),
        "{c}"
    );
}

#[test]
fn destination_with_wrong_name_is_refused_on_both_sides() {
    let ca = Ca::new("livemig test CA");
    let (acceptor, addr) = tls_acceptor(&ca, None);
    let connector = tls_connector(
        addr,
        &ca.identity(SOURCE, false, &ca),
        "other-host.livemig.test",
    );
    let (c, s) = both_refused_pair(connector, acceptor);
    assert!(c.contains("not valid for the expected name"), "{c}");
    assert!(c.contains("other-host.livemig.test"), "{c}");
    assert!(s.contains("refused our certificate"), "{s}");
}

#[test]
fn source_with_wrong_name_is_refused_on_both_sides() {
    let ca = Ca::new("livemig test CA");
    let (acceptor, addr) = tls_acceptor(&ca, Some(SOURCE));
    let connector = tls_connector(
        addr,
        &ca.identity("intruder.livemig.test", false, &ca),
        DEST,
    );
    let (c, s) = both_refused_pair(connector, acceptor);
    assert!(s.contains("not valid for the expected name"), "{s}");
    assert!(s.contains(SOURCE), "{s}");
    assert!(c.contains("refused our certificate"), "{c}");
}

#[test]
fn silent_peer_times_out_the_handshake() {
    let ca = Ca::new("livemig test CA");
    let (acceptor, addr) = tls_acceptor(&ca, None);
    let acceptor = acceptor.handshake_timeout(Duration::from_millis(300));
    with_timeout(Duration::from_secs(20), "silent peer", move || {
        let _silent = std::net::TcpStream::connect(&addr).unwrap();
        let t0 = Instant::now();
        let e = acceptor.accept(QUICK).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("timed out"), "{e}");
        assert!(t0.elapsed() < QUICK, "took {:?}", t0.elapsed());
    });
}

#[test]
fn plaintext_peer_is_refused_before_any_protocol_byte_is_read() {
    let ca = Ca::new("livemig test CA");
    let (acceptor, addr) = tls_acceptor(&ca, None);
    with_timeout(Duration::from_secs(20), "plaintext peer", move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        // What a plaintext source would send first: a frame, not a ClientHello.
        s.write_all(&[0u8; 64]).unwrap();
        let e = acceptor.accept(QUICK).map(|_| ()).unwrap_err();
        assert!(matches!(e, TransportError::Tls { .. }), "{e:?}");
        assert!(e.to_string().contains("does not speak TLS"), "{e}");
        // The TLS layer answered with an alert or closed: no livemig reply.
        let mut buf = [0u8; 64];
        let _ = s.set_read_timeout(Some(QUICK));
        if let Ok(n) = s.read(&mut buf) {
            assert!(n == 0 || buf[0] == 0x15, "not a TLS alert: {buf:?}");
        }
    });
}

#[test]
fn shutdown_handle_unblocks_a_reader() {
    let (mut client, mut server) = connected_pair();
    assert!(client.splice_fd().is_none(), "TLS streams must not splice");
    // Data flows both ways through the authenticated channel.
    client.write_all(b"hello").unwrap();
    client.flush().unwrap();
    let mut b = [0u8; 5];
    server.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    // A reader blocked with no deadline is released by the shutdown handle.
    let cut = server.shutdown_handle();
    with_timeout(Duration::from_secs(20), "shutdown", move || {
        let reader = std::thread::spawn(move || server.read(&mut [0u8; 16]));
        std::thread::sleep(Duration::from_millis(50));
        cut();
        let r = reader.join().unwrap();
        assert!(!matches!(r, Ok(n) if n > 0), "read returned data: {r:?}");
        drop(client);
    });
}

#[test]
fn a_write_takes_all_it_is_given() {
    // Paced writers (`--bandwidth`) take tokens for a whole write; a TLS write that
    // took only rustls's buffer limit would waste the rest of them.
    let (mut client, mut server) = connected_pair();
    with_timeout(Duration::from_secs(20), "large write", move || {
        const LEN: usize = 4 << 20;
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; LEN];
            server.read_exact(&mut got).map(|_| got)
        });
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let n = client.write(&data).unwrap();
        assert_eq!(n, LEN, "a TLS write took {n} of {LEN} bytes");
        client.flush().unwrap();
        let got = reader.join().unwrap().expect("read");
        assert!(got == data, "bytes changed in transit");
    });
}

/// A TLS stream offers its socket to wait on only while nothing is buffered above
/// it: decrypted plaintext not yet read must be read first, or a waiter on the
/// socket would sleep on bytes it already has.
#[test]
fn wait_descriptor_only_while_no_plaintext_is_buffered() {
    use std::io::{Read, Write};
    let (mut client, mut server) = connected_pair();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(client.wait_fd().is_some(), "idle after the handshake");
    server.write_all(&[7u8; 100]).unwrap();
    server.flush().unwrap();
    let fd = client.wait_fd().expect("nothing read yet");
    let mut p = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let five = rustix::event::Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    assert_eq!(rustix::event::poll(&mut p, Some(&five)).unwrap(), 1);
    let mut part = [0u8; 10];
    client.read_exact(&mut part).unwrap();
    assert_eq!(part, [7u8; 10]);
    assert!(
        client.wait_fd().is_none(),
        "90 decrypted bytes are buffered: the socket must not be waited on"
    );
    let mut rest = [0u8; 90];
    client.read_exact(&mut rest).unwrap();
    assert_eq!(rest, [7u8; 90]);
    assert!(client.wait_fd().is_some(), "everything read");
}
