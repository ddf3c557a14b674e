//! Mutual TLS on every stream (rustls with the `ring` provider, blocking I/O).
//!
//! Why over 600 lines: configuration loading, the connector, the acceptor and the
//! stream wrapper (with its vectored reads) share the rustls session handling and its
//! error mapping; about 90 lines are tests.
//!
//! [`TlsConnector`] wraps any [`Connector`] (in practice TCP) and [`TlsAcceptor`] any
//! [`Acceptor`]. Each completes the whole TLS 1.3 handshake inside `connect()` /
//! `accept()`, under a deadline, and hands out a [`Stream`] only once the peer is
//! authenticated: both sides present a certificate that chains to the configured CA,
//! the source checks the destination's name, and the destination, if configured,
//! checks the source's. No byte of the migration protocol is read before that.
//!
//! In TLS 1.3 the client finishes its handshake before the server has checked the
//! client's certificate. So that a refused source learns why inside `connect()`
//! (rather than from its first protocol read), the destination sends one
//! confirmation byte ([`AUTHENTICATED`]) through the new channel once it has
//! accepted the source, and the source waits for it. A refusal arrives instead as
//! the alert that names the reason.
//!
//! Every stream does a full handshake (no session resumption), so every stream
//! proves its certificate. Blocking I/O: one thread owns each stream, as for TCP.
//!
//! Why one file of over 600 lines: configuration from PEM, the name and CA checks,
//! the blocking stream and both wrappers are one security boundary, kept in one file
//! to be reviewed together; about a fifth is its error classification.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, ConnectionCommon,
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, ServerConnection,
    SideData, SignatureScheme,
};

use super::{Acceptor, Connector, Stream, TransportError};

/// The byte the destination sends through a new channel once it has authenticated
/// the source (see the module documentation).
pub const AUTHENTICATED: u8 = 0xA5;

/// Default deadline for one TLS handshake (TCP connect or accept excluded).
/// Two round trips and four signature operations take milliseconds; ten seconds
/// leave room for a loaded host without letting a silent peer hold a slot.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read from the socket at once on the receiving side. TLS records are at
/// most 16 KiB; reading 256 KiB at a time turns a dozen `read` calls into one.
const SOCKET_READ_BUFFER: usize = 256 << 10;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {source}")]
    Pem {
        /// Which input ("certificate chain", "private key", "CA bundle").
        what: &'static str,
        /// Where it was read from.
        path: String,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM input held no item of the expected kind.
    #[error("{path} holds no {what} (expected a PEM \"{pem_label}\" block)")]
    Empty {
        /// Which input.
        what: &'static str,
        /// Where it was read from.
        path: String,
        /// The PEM label looked for.
        pem_label: &'static str,
    },
    /// A CA certificate was refused as a trust anchor.
    #[error("CA certificate in {path} is not usable: {source}")]
    BadCa {
        /// Where it was read from.
        path: String,
        /// Why.
        source: rustls::Error,
    },
    /// A peer name is neither a DNS name nor an IP address.
    #[error("invalid peer name {name:?} (expected a DNS name or an IP address)")]
    BadName {
        /// The name given.
        name: String,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("cannot build the client-certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Generating an ephemeral certificate failed.
    #[error("cannot generate an ephemeral certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Why the peer was not authenticated, as one side saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRefusal {
    /// The peer presented no certificate.
    NoPeerCertificate,
    /// The peer's certificate has expired.
    PeerCertificateExpired,
    /// The peer's certificate is not valid yet.
    PeerCertificateNotYetValid,
    /// The peer's certificate does not chain to the trusted CA.
    PeerCertificateUnknownCa,
    /// The peer's certificate is not valid for the expected name.
    PeerCertificateWrongName,
    /// The peer's certificate was refused for another reason.
    PeerCertificateInvalid,
    /// The peer refused us: it sent this fatal alert.
    RefusedByPeer(AlertDescription),
    /// The peer's bytes are not TLS records (e.g. a plaintext source).
    NotTls,
    /// Another TLS protocol failure.
    Protocol,
}

impl TlsRefusal {
    /// Classify a rustls error.
    pub fn of(e: &rustls::Error) -> Self {
        use CertificateError as C;
        match e {
            rustls::Error::NoCertificatesPresented => Self::NoPeerCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                C::Expired | C::ExpiredContext { .. } => Self::PeerCertificateExpired,
                C::NotValidYet | C::NotValidYetContext { .. } => Self::PeerCertificateNotYetValid,
                C::UnknownIssuer | C::BadSignature => Self::PeerCertificateUnknownCa,
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    Self::PeerCertificateWrongName
                }
                _ => Self::PeerCertificateInvalid,
            },
            rustls::Error::AlertReceived(a) => Self::RefusedByPeer(*a),
            rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
                | rustls::InvalidMessage::UnknownProtocolVersion,
            ) => Self::NotTls,
            _ => Self::Protocol,
        }
    }
}

impl std::fmt::Display for TlsRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use AlertDescription as A;
        let s = match self {
            Self::NoPeerCertificate => "peer presented no certificate",
            Self::PeerCertificateExpired => "peer certificate expired",
            Self::PeerCertificateNotYetValid => "peer certificate not valid yet",
            Self::PeerCertificateUnknownCa => {
                "peer certificate is not signed by the trusted CA (unknown issuer)"
            }
            Self::PeerCertificateWrongName => "peer certificate is not valid for the expected name",
            Self::PeerCertificateInvalid => "peer certificate refused",
            Self::RefusedByPeer(a) => {
                return match a {
                    A::CertificateRequired => {
                        f.write_str("the peer requires a certificate and we presented none")
                    }
                    A::CertificateExpired => f.write_str(
                        "the peer refused our certificate: certificate expired or not valid yet",
                    ),
                    A::UnknownCA | A::DecryptError => f.write_str(
                        "the peer refused our certificate: not signed by a CA it trusts (unknown CA)",
                    ),
                    A::BadCertificate => f.write_str(
                        "the peer refused our certificate: bad certificate (e.g. not valid for the name it expects)",
                    ),
                    other => write!(f, "the peer refused the handshake with alert {other:?}"),
                };
            }
            Self::NotTls => "the peer does not speak TLS (a plaintext source?)",
            Self::Protocol => "TLS protocol error",
        };
        f.write_str(s)
    }
}

/// Why a TLS handshake failed (wrapped in [`TransportError::Tls`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The peer was not authenticated, or refused us.
    #[error("{refusal} ({source})")]
    Refused {
        /// The reason, classified.
        refusal: TlsRefusal,
        /// rustls's error.
        source: rustls::Error,
    },
    /// The handshake did not finish in time.
    #[error("timed out: no complete handshake within {after:?}")]
    TimedOut {
        /// The deadline.
        after: Duration,
    },
    /// The peer closed the connection before the handshake finished.
    #[error("the peer closed the connection during the handshake")]
    PeerClosed,
    /// The destination's confirmation was not the expected byte.
    #[error("unexpected confirmation byte {0:#04x} after the handshake (not a livemig peer?)")]
    BadConfirmation(u8),
    /// I/O failed during the handshake.
    #[error("I/O error during the handshake: {0}")]
    Io(#[source] std::io::Error),
}

impl TlsError {
    /// Classify an I/O error from rustls's `complete_io`, a read through TLS, or an
    /// async handshake (`tokio-rustls` wraps rustls's errors the same way).
    pub fn of_io(e: std::io::Error, after: Duration) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::WouldBlock | K::TimedOut => return Self::TimedOut { after },
            K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe => return Self::PeerClosed,
            K::InvalidData => {}
            _ => return Self::Io(e),
        }
        if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
            let inner = e.into_inner().expect("checked above");
            let source = *inner.downcast::<rustls::Error>().expect("checked above");
            return Self::Refused {
                refusal: TlsRefusal::of(&source),
                source,
            };
        }
        Self::Io(e)
    }
}

/// A certificate chain, its private key and the CA bundle that peers' certificates
/// must chain to: what each end of a migration needs for mutual TLS.
#[derive(Debug)]
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
        }
    }
}

/// Every certificate in the PEM `pem` (read from `at`): `what.0` names the file in a
/// parse error, `what.1` a certificate in the "holds none" error.
fn certificates(
    pem: &[u8],
    what: (&'static str, &'static str),
    at: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(what.0, at))?;
    if certs.is_empty() {
        return Err(TlsConfigError::Empty {
            what: what.1,
            path: at.into(),
            pem_label: "CERTIFICATE",
        });
    }
    Ok(certs)
}

impl TlsIdentity {
    /// Read the certificate chain (leaf first), the private key (PKCS#8, PKCS#1 or
    /// SEC1) and the CA bundle from PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsConfigError> {
        let read = |what: &'static str, p: &Path| {
            std::fs::read(p).map_err(|e| TlsConfigError::Pem {
                what,
                path: p.display().to_string(),
                source: rustls::pki_types::pem::Error::Io(e),
            })
        };
        Self::from_pem_labelled(
            (
                &read("certificate chain", cert)?,
                &cert.display().to_string(),
            ),
            (&read("private key", key)?, &key.display().to_string()),
            (&read("CA bundle", ca)?, &ca.display().to_string()),
        )
    }

    /// The same from PEM text in memory.
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Self, TlsConfigError> {
        Self::from_pem_labelled(
            (cert, "the certificate PEM"),
            (key, "the key PEM"),
            (ca, "the CA PEM"),
        )
    }

    fn from_pem_labelled(
        (cert, cert_at): (&[u8], &str),
        (key, key_at): (&[u8], &str),
        (ca, ca_at): (&[u8], &str),
    ) -> Result<Self, TlsConfigError> {
        let chain = certificates(cert, ("certificate chain", "certificate"), cert_at)?;
        let key = match PrivateKeyDer::from_pem_slice(key) {
            Ok(k) => k,
            Err(rustls::pki_types::pem::Error::NoItemsFound) => {
                return Err(TlsConfigError::Empty {
                    what: "private key",
                    path: key_at.into(),
                    pem_label: "PRIVATE KEY",
                })
            }
            Err(e) => return Err(pem_err("private key", key_at)(e)),
        };
        let cas = certificates(ca, ("CA bundle", "CA certificate"), ca_at)?;
        let mut roots = RootCertStore::empty();
        for c in cas {
            roots.add(c).map_err(|source| TlsConfigError::BadCa {
                path: ca_at.into(),
                source,
            })?;
        }
        Ok(Self {
            chain,
            key,
            roots: Arc::new(roots),
        })
    }
}

fn pem_err<'a>(
    what: &'static str,
    at: &'a str,
) -> impl Fn(rustls::pki_types::pem::Error) -> TlsConfigError + 'a {
    move |source| TlsConfigError::Pem {
        what,
        path: at.to_string(),
        source,
    }
}

/// ring's provider, its TLS 1.3 suites in the order the source offers them (the
/// destination takes the source's first choice). AES-128-GCM comes first: with
/// AES-NI it runs 10 AES rounds per block where AES-256-GCM runs 14, and the
/// session's strength is 128 bits either way, set by its P-256 / X25519 key
/// exchange and signatures (docs/TLS.md).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn server_name(name: &str) -> Result<ServerName<'static>, TlsConfigError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsConfigError::BadName {
        name: name.to_string(),
    })
}

/// The source's side: the destination must present a certificate from the CA,
/// valid for `peer_name`; the source presents its own.
pub fn client_config(id: &TlsIdentity) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(id.roots.clone())
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

/// The destination's side: the source must present a certificate from the CA and,
/// when `allowed_client` is set, valid for that name.
pub fn server_config(
    id: &TlsIdentity,
    allowed_client: Option<&str>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let webpki =
        WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider()).build()?;
    let verifier: Arc<dyn ClientCertVerifier> = match allowed_client {
        None => webpki,
        Some(n) => Arc::new(NamedClientVerifier {
            inner: webpki,
            name: server_name(n)?,
        }),
    };
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    c.send_tls13_tickets = 0;
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(c))
}

/// WebPKI client verification plus a subject-name check on the client's certificate.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for NamedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&cert, &self.name)?;
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The socket under a TLS connection: reads are buffered (see
/// [`SOCKET_READ_BUFFER`]), writes go straight through (rustls already hands
/// whole records to `writev`).
#[derive(Debug)]
struct Socket(std::io::BufReader<Box<dyn Stream>>);

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.get_mut().write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.get_mut().flush()
    }
}

impl Socket {
    fn stream(&self) -> &dyn Stream {
        &**self.0.get_ref()
    }
}

/// A stream carried inside an authenticated TLS connection. `C` is rustls's client
/// or server connection.
#[derive(Debug)]
pub struct TlsStream<C> {
    conn: C,
    sock: Socket,
}

impl<C, S> TlsStream<C>
where
    C: std::ops::DerefMut<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn io(&mut self) -> rustls::Stream<'_, C, Socket> {
        rustls::Stream::new(&mut self.conn, &mut self.sock)
    }

    /// Drive the handshake to its end, or fail by `deadline`.
    fn handshake(&mut self, deadline: Instant, limit: Duration) -> Result<(), TlsError> {
        while self.conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TlsError::TimedOut { after: limit });
            }
            self.sock
                .stream()
                .set_read_timeout(Some(left))
                .map_err(TlsError::Io)?;
            match self.conn.complete_io(&mut self.sock) {
                Ok((0, 0)) if self.conn.is_handshaking() => return Err(TlsError::PeerClosed),
                Ok(_) => {}
                Err(e) => return Err(TlsError::of_io(e, limit)),
            }
        }
        Ok(())
    }

    /// Hand the authenticated stream out, its socket back to blocking reads (the
    /// caller sets its own timeouts). Bytes the peer sent after the handshake stay
    /// buffered in the stream.
    fn finish(self) -> Result<Box<dyn Stream>, TlsError>
    where
        TlsStream<C>: Stream + 'static,
    {
        self.sock
            .stream()
            .set_read_timeout(None)
            .map_err(TlsError::Io)?;
        Ok(Box::new(self))
    }
}

impl TlsStream<ServerConnection> {
    /// A blocking stream over a server connection whose handshake (and the
    /// [`AUTHENTICATED`] byte) was completed elsewhere, e.g. asynchronously by
    /// `recv --serve`. `conn` keeps whatever the peer already sent.
    pub fn from_established(conn: ServerConnection, sock: Box<dyn Stream>) -> Self {
        Self {
            conn,
            sock: Socket(std::io::BufReader::with_capacity(SOCKET_READ_BUFFER, sock)),
        }
    }
}

impl<C, S> Read for TlsStream<C>
where
    C: std::ops::DerefMut<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.io().read(buf)
    }
    /// Fills as many of `bufs` as the plaintext at hand allows: blocks (like `read`)
    /// only until the first byte, then takes what rustls has already decrypted, so a
    /// batch's pages scatter into guest memory without one call per page.
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        let mut total = 0;
        for buf in bufs.iter_mut() {
            let mut at = 0;
            while at < buf.len() {
                let n = if total + at == 0 {
                    self.io().read(&mut buf[at..])?
                } else {
                    // Nothing decrypted left (WouldBlock), or an end or error that
                    // the next call reports: return what was read.
                    self.conn.reader().read(&mut buf[at..]).unwrap_or(0)
                };
                if n == 0 {
                    return Ok(total + at);
                }
                at += n;
            }
            total += at;
        }
        Ok(total)
    }
}

impl<C, S> Write for TlsStream<C>
where
    C: std::ops::DerefMut<Target = ConnectionCommon<S>>,
    S: SideData,
{
    /// Takes all of `buf` (encrypting and sending it in pieces of rustls's
    /// buffer limit) unless the socket fails first, like a blocking socket write.
    /// Callers that pace their writes (`ShapedStream`) count on a write taking
    /// what it was given.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut owned: Vec<IoSlice<'_>> = bufs.to_vec();
        let mut left: &mut [IoSlice<'_>] = &mut owned;
        let mut done = 0;
        while done < total {
            match self.io().write_vectored(left) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    IoSlice::advance_slices(&mut left, n);
                }
                // Bytes already taken stay taken; the error shows on the next call.
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(done)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.io().flush()
    }
}

impl<C, S> Stream for TlsStream<C>
where
    C: std::ops::DerefMut<Target = ConnectionCommon<S>> + Send + std::fmt::Debug,
    S: SideData,
{
    fn shutdown(&self) {
        self.sock.stream().shutdown();
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.sock.stream().set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.sock.stream().set_write_timeout(t)
    }
    fn deadlines(&self) -> super::Deadlines {
        self.sock.stream().deadlines()
    }
    fn shutdown_handle(&self) -> Box<dyn Fn() + Send + Sync> {
        self.sock.stream().shutdown_handle()
    }
    fn peer_addr(&self) -> Option<String> {
        self.sock.stream().peer_addr()
    }
    /// The socket's, while nothing is buffered above it: no plaintext rustls has
    /// decrypted and not handed out, no socket bytes read ahead into our buffer.
    /// A partial record rustls holds needs more socket bytes, so it does not count.
    fn wait_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        if self.conn.wants_read() && self.sock.0.buffer().is_empty() {
            self.sock.stream().wait_fd()
        } else {
            None
        }
    }
    // `splice_fd` stays `None`: every byte must pass through the cipher.
}

/// Opens TLS streams over an inner connector (the source's side).
pub struct TlsConnector<C> {
    inner: C,
    config: Arc<ClientConfig>,
    peer_name: ServerName<'static>,
    handshake_timeout: Duration,
}

impl<C: std::fmt::Debug> std::fmt::Debug for TlsConnector<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("inner", &self.inner)
            .field("peer_name", &self.peer_name)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl<C: Connector> TlsConnector<C> {
    /// Present `id` and accept only a destination whose certificate chains to `id`'s
    /// CA and is valid for `peer_name` (a DNS name or an IP address).
    pub fn new(inner: C, id: &TlsIdentity, peer_name: &str) -> Result<Self, TlsConfigError> {
        Ok(Self::with_config(
            inner,
            client_config(id)?,
            server_name(peer_name)?,
        ))
    }

    /// Use a rustls client configuration built elsewhere.
    pub fn with_config(
        inner: C,
        config: Arc<ClientConfig>,
        peer_name: ServerName<'static>,
    ) -> Self {
        Self {
            inner,
            config,
            peer_name,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// Deadline for each handshake (default [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    fn handshake(&self, stream: Box<dyn Stream>) -> Result<Box<dyn Stream>, TlsError> {
        let deadline = Instant::now() + self.handshake_timeout;
        let limit = self.handshake_timeout;
        let conn = ClientConnection::new(self.config.clone(), self.peer_name.clone()).map_err(
            |source| TlsError::Refused {
                refusal: TlsRefusal::of(&source),
                source,
            },
        )?;
        let mut s = TlsStream {
            conn,
            sock: Socket(std::io::BufReader::with_capacity(
                SOCKET_READ_BUFFER,
                stream,
            )),
        };
        s.handshake(deadline, limit)?;
        // Wait for the destination's verdict on our certificate.
        let mut b = [0u8; 1];
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::TimedOut { after: limit });
        }
        s.sock
            .stream()
            .set_read_timeout(Some(left))
            .map_err(TlsError::Io)?;
        s.read_exact(&mut b)
            .map_err(|e| TlsError::of_io(e, limit))?;
        if b[0] != AUTHENTICATED {
            return Err(TlsError::BadConfirmation(b[0]));
        }
        s.finish()
    }
}

impl<C: Connector> Connector for TlsConnector<C> {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let stream = self.inner.connect()?;
        let peer = stream.peer_addr().unwrap_or_else(|| self.inner.describe());
        match self.handshake(stream) {
            Ok(s) => {
                tracing::debug!(peer = peer.as_str(), "TLS handshake done (client)");
                Ok(s)
            }
            Err(source) => {
                tracing::warn!(peer = peer.as_str(), error = %source, "TLS handshake refused (client)");
                Err(TransportError::Tls { peer, source })
            }
        }
    }
    fn describe(&self) -> String {
        format!("tls+{}", self.inner.describe())
    }
}

/// Accepts TLS streams from an inner acceptor (the destination's side).
pub struct TlsAcceptor<A> {
    inner: A,
    config: Arc<ServerConfig>,
    handshake_timeout: Duration,
}

impl<A: std::fmt::Debug> std::fmt::Debug for TlsAcceptor<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("inner", &self.inner)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl<A: Acceptor> TlsAcceptor<A> {
    /// Present `id` and accept only sources whose certificate chains to `id`'s CA
    /// and, when `allowed_client` is set, is valid for that name.
    pub fn new(
        inner: A,
        id: &TlsIdentity,
        allowed_client: Option<&str>,
    ) -> Result<Self, TlsConfigError> {
        Ok(Self::with_config(inner, server_config(id, allowed_client)?))
    }

    /// Use a rustls server configuration built elsewhere.
    pub fn with_config(inner: A, config: Arc<ServerConfig>) -> Self {
        Self {
            inner,
            config,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// Deadline for each handshake, counted from the inner accept (default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// The inner acceptor (e.g. to ask a TCP listener for its address).
    pub fn inner(&self) -> &A {
        &self.inner
    }

    fn handshake(&self, stream: Box<dyn Stream>) -> Result<Box<dyn Stream>, TlsError> {
        let deadline = Instant::now() + self.handshake_timeout;
        let limit = self.handshake_timeout;
        let conn =
            ServerConnection::new(self.config.clone()).map_err(|source| TlsError::Refused {
                refusal: TlsRefusal::of(&source),
                source,
            })?;
        let mut s = TlsStream {
            conn,
            sock: Socket(std::io::BufReader::with_capacity(
                SOCKET_READ_BUFFER,
                stream,
            )),
        };
        s.handshake(deadline, limit)?;
        // The source is authenticated: tell it so. Nothing it sent after its
        // handshake has been read as protocol yet.
        s.write_all(&[AUTHENTICATED])
            .and_then(|_| s.flush())
            .map_err(|e| TlsError::of_io(e, limit))?;
        s.finish()
    }
}

impl<A: Acceptor> Acceptor for TlsAcceptor<A> {
    fn accept(&self, timeout: Duration) -> Result<Box<dyn Stream>, TransportError> {
        let stream = self.inner.accept(timeout)?;
        let peer = stream.peer_addr().unwrap_or_else(|| "the peer".into());
        match self.handshake(stream) {
            Ok(s) => {
                tracing::debug!(peer = peer.as_str(), "TLS handshake done (server)");
                Ok(s)
            }
            Err(source) => {
                tracing::warn!(peer = peer.as_str(), error = %source, "TLS handshake refused (server)");
                Err(TransportError::Tls { peer, source })
            }
        }
    }
}

/// An in-memory CA with one destination and one source certificate, for
/// benchmarks and tests that need TLS without files. Names: [`SelfSigned::DESTINATION`]
/// and [`SelfSigned::SOURCE`].
#[derive(Debug, Clone)]
pub struct SelfSigned {
    /// The destination's identity (certificate for [`SelfSigned::DESTINATION`]).
    pub destination: TlsIdentity,
    /// The source's identity (certificate for [`SelfSigned::SOURCE`]).
    pub source: TlsIdentity,
}

impl SelfSigned {
    /// The destination certificate's name.
    pub const DESTINATION: &'static str = "livemig-destination";
    /// The source certificate's name.
    pub const SOURCE: &'static str = "livemig-source";

    /// Generate a fresh CA (ECDSA P-256) and the two certificates it signs.
    pub fn generate() -> Result<Self, TlsConfigError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "livemig ephemeral CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let issue = |name: &str| -> Result<TlsIdentity, TlsConfigError> {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(vec![name.to_string()])?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
            TlsIdentity::from_pem(
                cert.pem().as_bytes(),
                key.serialize_pem().as_bytes(),
                ca_pem.as_bytes(),
            )
        };
        Ok(Self {
            destination: issue(Self::DESTINATION)?,
            source: issue(Self::SOURCE)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_text_names_the_reason() {
        let e = rustls::Error::InvalidCertificate(CertificateError::Expired);
        assert_eq!(TlsRefusal::of(&e).to_string(), "peer certificate expired");
        let e = rustls::Error::AlertReceived(AlertDescription::UnknownCA);
        assert!(TlsRefusal::of(&e).to_string().contains("unknown CA"));
        let e = rustls::Error::NoCertificatesPresented;
        assert!(TlsRefusal::of(&e).to_string().contains("no certificate"));
    }

    #[test]
    fn empty_pem_is_refused_by_name() {
        let e = TlsIdentity::from_pem(b"", b"", b"").unwrap_err();
        assert!(e.to_string().contains("holds no certificate"), "{e}");
    }

    #[test]
    fn aes_128_gcm_is_offered_first() {
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites,
            [
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            ]
        );
    }

    /// Vectored reads scatter records across slices of any size, and each call
    /// returns at least one byte (or the end).
    #[test]
    fn vectored_reads_scatter_plaintext_exactly() {
        let pki = SelfSigned::generate().unwrap();
        let (c, a) = super::super::mem::pair();
        let acceptor = TlsAcceptor::new(a, &pki.destination, Some(SelfSigned::SOURCE)).unwrap();
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let to_send = sent.clone();
        let source = std::thread::spawn(move || {
            let connector = TlsConnector::new(c, &pki.source, SelfSigned::DESTINATION).unwrap();
            let mut s = connector.connect().unwrap();
            // Writes of odd sizes, so records and slices never line up.
            for chunk in to_send.chunks(7_777) {
                s.write_all(chunk).unwrap();
            }
            s.flush().unwrap();
            s
        });
        let mut s = acceptor.accept(Duration::from_secs(10)).unwrap();
        let mut got = vec![0u8; sent.len()];
        let (a, rest) = got.split_at_mut(3);
        let (b, rest) = rest.split_at_mut(4_093);
        let (c, d) = rest.split_at_mut(50_000);
        let mut bufs = [
            IoSliceMut::new(a),
            IoSliceMut::new(&mut []),
            IoSliceMut::new(b),
            IoSliceMut::new(c),
            IoSliceMut::new(d),
        ];
        crate::transport::framed::read_exact_vectored(&mut *s, &mut bufs).unwrap();
        assert!(got == sent, "the bytes arrive in order, each exactly once");
        drop(source.join().unwrap());
        let mut one = [0u8; 1];
        assert_eq!(
            s.read_vectored(&mut [IoSliceMut::new(&mut one)])
                .unwrap_or(0),
            0,
            "after the peer closes, a vectored read reports the end"
        );
    }

    #[test]
    fn self_signed_identities_build_configs() {
        let pki = SelfSigned::generate().unwrap();
        assert_eq!(pki.source.chain.len(), 1);
        client_config(&pki.source).unwrap();
        server_config(&pki.destination, Some(SelfSigned::SOURCE)).unwrap();
        let e = server_config(&pki.destination, Some("not a name!")).unwrap_err();
        assert!(e.to_string().contains("invalid peer name"), "{e}");
    }
}
