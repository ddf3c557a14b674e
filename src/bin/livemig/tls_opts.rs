//! Mutual-TLS flags for `send`, `recv` and `bench`, and the streams they make.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
use livemig::transport::tls::{server_config, SelfSigned, TlsAcceptor, TlsConnector, TlsIdentity};
use livemig::transport::{Acceptor, Connector};

/// Certificates for mutual TLS on every stream.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsOpts {
    /// This end's certificate chain (PEM, leaf first). With --tls-key and --tls-ca,
    /// every stream runs over mutual TLS 1.3.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// This end's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) the peer's certificate must chain to.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Name the peer's certificate must be valid for (DNS name or IP address). On
    /// `send`: the destination's (default: the host of --to). On `recv`: the
    /// source's (default: any certificate the CA signed). On `bench`: both.
    #[arg(long, value_name = "NAME")]
    pub tls_peer_name: Option<String>,
}

impl TlsOpts {
    /// The identity the flags name, `None` when no TLS flag is given.
    fn identity(&self) -> Result<Option<TlsIdentity>, String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => match &self.tls_peer_name {
                Some(_) => Err("--tls-peer-name needs --tls-cert, --tls-key and --tls-ca".into()),
                None => Ok(None),
            },
            (Some(cert), Some(key), Some(ca)) => TlsIdentity::from_pem_files(cert, key, ca)
                .map(Some)
                .map_err(|e| e.to_string()),
            (cert, key, ca) => {
                let missing: Vec<&str> = [
                    (cert.is_none(), "--tls-cert"),
                    (key.is_none(), "--tls-key"),
                    (ca.is_none(), "--tls-ca"),
                ]
                .into_iter()
                .filter_map(|(m, n)| m.then_some(n))
                .collect();
                Err(format!(
                    "TLS needs --tls-cert, --tls-key and --tls-ca together (missing {})",
                    missing.join(", ")
                ))
            }
        }
    }

    /// Refuse to run without TLS unless `--plaintext` was given.
    fn required(&self, plaintext: bool, cmd: &str) -> Result<Option<TlsIdentity>, String> {
        let id = self.identity()?;
        match (&id, plaintext) {
            (Some(_), true) => Err("--plaintext and the --tls-* flags exclude each other".into()),
            (None, false) => Err(format!(
                "`{cmd}` needs mutual TLS (--tls-cert, --tls-key, --tls-ca, optionally \
                 --tls-peer-name) or an explicit --plaintext: without TLS anyone on the \
                 path can read the guest's memory and anyone can connect"
            )),
            _ => Ok(id),
        }
    }

    /// The source's connector over `tcp`, whose first address is `to` ("host:port",
    /// the default peer name); the bool says TLS is on.
    pub fn connector<C: Connector + 'static>(
        &self,
        tcp: C,
        to: &str,
        plaintext: bool,
    ) -> Result<(Box<dyn Connector>, bool), String> {
        let Some(id) = self.required(plaintext, "send")? else {
            return Ok((Box::new(tcp), false));
        };
        let name = match &self.tls_peer_name {
            Some(n) => n.clone(),
            None => host_of(to).to_string(),
        };
        let c = TlsConnector::new(tcp, &id, &name).map_err(|e| e.to_string())?;
        Ok((Box::new(c), true))
    }

    /// The destination's identity, `None` for `--plaintext`: checked before `recv`
    /// allocates memory or binds its port, so a refusal costs nothing and names
    /// the flags, whatever else would have failed.
    pub fn recv_identity(&self, plaintext: bool) -> Result<Option<TlsIdentity>, String> {
        self.required(plaintext, "recv")
    }

    /// The destination's acceptor over `tcp` with the identity from
    /// [`Self::recv_identity`]; the bool says TLS is on.
    pub fn acceptor(
        &self,
        tcp: TcpAcceptor,
        identity: Option<TlsIdentity>,
    ) -> Result<(Box<dyn Acceptor>, bool), String> {
        let Some(id) = identity else {
            return Ok((Box::new(tcp), false));
        };
        let a =
            TlsAcceptor::new(tcp, &id, self.tls_peer_name.as_deref()).map_err(|e| e.to_string())?;
        Ok((Box::new(a), true))
    }

    /// For `recv --serve`: the rustls server configuration, `None` for plaintext.
    pub fn server_config(
        &self,
        plaintext: bool,
    ) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
        let Some(id) = self.required(plaintext, "recv --serve")? else {
            return Ok(None);
        };
        server_config(&id, self.tls_peer_name.as_deref())
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// For `bench` (both ends in this process): TLS when asked for with files or
    /// with `self_signed`, plaintext otherwise.
    pub fn bench(&self, self_signed: bool) -> Result<Option<Arc<BenchTls>>, String> {
        let id = self.identity()?;
        match (id, self_signed) {
            (Some(_), true) => {
                Err("--tls-self-signed and --tls-cert/--tls-key/--tls-ca exclude each other".into())
            }
            (None, true) => {
                let pki = SelfSigned::generate().map_err(|e| e.to_string())?;
                Ok(Some(Arc::new(BenchTls {
                    source: pki.source,
                    destination: pki.destination,
                    destination_name: SelfSigned::DESTINATION.into(),
                    source_name: Some(SelfSigned::SOURCE.into()),
                })))
            }
            (Some(id), false) => {
                let name = self.tls_peer_name.clone().ok_or(
                    "bench with --tls-cert needs --tls-peer-name: a name the certificate \
                     is valid for (both ends present it)",
                )?;
                Ok(Some(Arc::new(BenchTls {
                    source: id.clone(),
                    destination: id,
                    destination_name: name.clone(),
                    source_name: Some(name),
                })))
            }
            (None, false) => Ok(None),
        }
    }
}

/// A bench's two ends: the destination's acceptor and the source's connector.
pub type BenchEnds = (Box<dyn Acceptor>, Box<dyn Connector>);

/// Both ends' TLS settings for an in-process bench.
#[derive(Debug)]
pub struct BenchTls {
    source: TlsIdentity,
    destination: TlsIdentity,
    destination_name: String,
    source_name: Option<String>,
}

impl BenchTls {
    /// Wrap the bench's TCP ends in TLS.
    pub fn wrap(
        &self,
        acceptor: TcpAcceptor,
        connector: TcpConnector,
    ) -> Result<BenchEnds, String> {
        let a = TlsAcceptor::new(acceptor, &self.destination, self.source_name.as_deref())
            .map_err(|e| e.to_string())?;
        let c = TlsConnector::new(connector, &self.source, &self.destination_name)
            .map_err(|e| e.to_string())?;
        Ok((Box::new(a), Box::new(c)))
    }
}

/// The host part of "host:port" ("[::1]:7070" gives "::1").
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("desthost:7070"), "desthost");
        assert_eq!(host_of("127.0.0.1:7070"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7070"), "::1");
    }

    #[test]
    fn plaintext_must_be_explicit() {
        let none = TlsOpts::default();
        let e = none.required(false, "send").unwrap_err();
        assert!(e.contains("--plaintext"), "{e}");
        assert!(none.required(true, "send").unwrap().is_none());
        let partial = TlsOpts {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        };
        let e = partial.required(false, "recv").unwrap_err();
        assert!(e.contains("missing --tls-key, --tls-ca"), "{e}");
    }
}
