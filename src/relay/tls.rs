//! Mutual TLS for the link between the two proxies.
//!
//! The link carries a VM's memory, so both ends prove who they are: the source proxy
//! ([`TlsClient`]) and the destination proxy ([`TlsServer`]) each present a
//! certificate of a CA that the other end trusts. The server may further restrict
//! which client names it serves (`allowed_clients`, like QEMU's `tls-authz`), so a
//! certificate of the same CA issued to another host is refused.
//!
//! Both ends speak TLS 1.3 only, with the ring provider named explicitly (never the
//! process-wide default, which another crate could have set), and agree on the ALPN
//! protocol [`ALPN`]: a peer speaking anything else fails the handshake instead of
//! reading migration bytes it does not understand. Session resumption is off: a link
//! carries one migration, and a full handshake checks the certificates every time.
//!
//! A handshake has no timeout of its own: bound [`TlsClient::connect`] and
//! [`TlsServer::accept`] with the link's timeout, as for any other read.
//!
//! ```no_run
//! use migstream::relay::tls::{TlsClient, TlsIdentity, TlsServer, peer_names};
//!
//! # async fn run(link: tokio::net::TcpStream) -> migstream::Result<()> {
//! // the destination proxy
//! let identity = TlsIdentity::from_pem_files("dest.crt", "dest.key", "ca.crt")?;
//! let server = TlsServer::new(&identity, &["source.example".to_string()])?;
//! let tls = server.accept(link).await?;
//! println!("migration from {:?}", peer_names(tls.get_ref().1));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::{Error, Result};

/// The ALPN protocol both ends offer and require: a TLS peer of another protocol
/// (or of another version of this link) fails the handshake.
pub const ALPN: &[u8] = b"migstream/4";

/// This end's certificate chain and private key, and the CA bundle the peer's
/// certificate must chain to.
///
/// Loaded once and shared by every connection: the key is checked against the
/// certificate here, so a wrong file fails at start-up rather than at the first
/// migration.
#[derive(Clone)]
pub struct TlsIdentity {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
}

impl TlsIdentity {
    /// An identity from PEM text: `cert_pem` holds this end's certificate first, then
    /// any intermediates; `key_pem` its private key (PKCS#8, PKCS#1 or SEC1);
    /// `ca_pem` the CA certificates the peer's certificate must chain to.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Self> {
        Self::parse(
            Pem::unnamed(cert_pem),
            Pem::unnamed(key_pem),
            Pem::unnamed(ca_pem),
        )
    }

    /// An identity from PEM files, as [`from_pem`](Self::from_pem); errors name the
    /// file at fault.
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<Self> {
        let (cert, key, ca) = (cert.as_ref(), key.as_ref(), ca.as_ref());
        let (cert_pem, key_pem, ca_pem) = (read(cert)?, read(key)?, read(ca)?);
        Self::parse(
            Pem::file(&cert_pem, cert),
            Pem::file(&key_pem, key),
            Pem::file(&ca_pem, ca),
        )
    }

    fn parse(cert: Pem<'_>, key: Pem<'_>, ca: Pem<'_>) -> Result<Self> {
        const CERT: &str = "tls certificate";
        const KEY: &str = "tls private key";
        const CA: &str = "tls CA bundle";

        let chain = cert.certificates(CERT)?;
        ParsedCertificate::try_from(&chain[0])
            .map_err(|e| cert.error(CERT, format!("not a usable certificate: {e}")))?;

        let key_der = PrivateKeyDer::from_pem_slice(key.bytes).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => key.error(KEY, "no private key in it"),
            e => key.error(KEY, format!("unreadable PEM: {e}")),
        })?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| key.error(KEY, format!("unusable private key: {e}")))?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            // a key whose public half the provider cannot tell is still usable; the
            // peer's check of the handshake signature catches a mismatch then
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                let reason = format!("does not match the certificate{}", cert.origin(" in "));
                return Err(key.error(KEY, reason));
            }
        }

        let mut roots = RootCertStore::empty();
        for (i, ca_cert) in ca.certificates(CA)?.into_iter().enumerate() {
            roots
                .add(ca_cert)
                .map_err(|e| ca.error(CA, format!("certificate {}: {e}", i + 1)))?;
        }

        Ok(Self {
            key: Arc::new(certified),
            roots: Arc::new(roots),
        })
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // never the key
        f.debug_struct("TlsIdentity")
            .field("names", &dns_names(&self.key.cert[0]))
            .field("chain", &self.key.cert.len())
            .field("ca_certificates", &self.roots.len())
            .finish()
    }
}

/// The source proxy's end of the link: presents its certificate and checks the
/// destination's against the CA and the expected server name.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsClient {
    /// A client that expects the server's certificate to be valid for `server_name`,
    /// a DNS name or an IP address, as a browser would: being signed by the CA is not
    /// enough, or any host holding a certificate of that CA could pose as the
    /// destination.
    pub fn new(identity: &TlsIdentity, server_name: &str) -> Result<Self> {
        let server_name =
            ServerName::try_from(server_name.to_owned()).map_err(|e| Error::Config {
                what: "tls server name",
                reason: format!("{server_name:?}: {e}"),
            })?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(Arc::clone(&identity.roots))
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(Arc::clone(&identity.key))));
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = Resumption::disabled();
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Runs the TLS handshake over `stream`, as the client.
    ///
    /// In TLS 1.3 the server checks the client's certificate after the client has
    /// finished its handshake: a refusal of this end's certificate shows as an error
    /// (a TLS alert) on the first read of the returned stream.
    pub async fn connect<S>(&self, stream: S) -> Result<client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = self
            .connector
            .connect(self.server_name.clone(), stream)
            .await
            .map_err(handshake_error)?;
        require_alpn(tls.get_ref().1)?;
        Ok(tls)
    }
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The destination proxy's end of the link: requires a client certificate of the CA
/// and, optionally, one of a list of client names.
#[derive(Clone)]
pub struct TlsServer {
    acceptor: TlsAcceptor,
    allowed_clients: Vec<String>,
}

impl TlsServer {
    /// A server that requires every client to present a certificate chaining to the
    /// identity's CA bundle and, if `allowed_clients` is not empty, valid for at least
    /// one of those names (DNS names or IP addresses of the certificate's subject
    /// alternative names). An empty list accepts any certificate of the CA.
    ///
    /// A refused name fails the handshake with an `access_denied` alert, so the
    /// client learns why, and is logged with the names the certificate holds.
    pub fn new(identity: &TlsIdentity, allowed_clients: &[String]) -> Result<Self> {
        let provider = provider();
        let webpki = WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&identity.roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| Error::Config {
            what: "tls CA bundle",
            reason: e.to_string(),
        })?;
        let verifier = if allowed_clients.is_empty() {
            webpki
        } else {
            Arc::new(AllowedClients::new(webpki, allowed_clients)?)
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(Arc::clone(&identity.key))));
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            allowed_clients: allowed_clients.to_vec(),
        })
    }

    /// Runs the TLS handshake over `stream`, as the server. The client's certificate
    /// has been verified when this returns; [`peer_names`] tells which it was.
    pub async fn accept<S>(&self, stream: S) -> Result<server::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = self
            .acceptor
            .accept(stream)
            .await
            .map_err(handshake_error)?;
        require_alpn(tls.get_ref().1)?;
        Ok(tls)
    }
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("allowed_clients", &self.allowed_clients)
            .finish_non_exhaustive()
    }
}

/// The DNS names of the peer's certificate (its subject alternative names), for
/// logs: which host is at the other end. Empty before the handshake.
///
/// Takes a connection of either side: `peer_names(tls.get_ref().1)`.
pub fn peer_names(conn: &CommonState) -> Vec<String> {
    conn.peer_certificates()
        .and_then(|chain| chain.first())
        .map(dns_names)
        .unwrap_or_default()
}

fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    webpki::EndEntityCert::try_from(cert)
        .map(|cert| cert.valid_dns_names().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Always the ring provider, whatever the process-wide default is.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// rustls selects ALPN only when the peer offers it: a peer that offers none would
/// otherwise complete the handshake.
fn require_alpn(conn: &CommonState) -> Result<()> {
    match conn.alpn_protocol() {
        Some(ALPN) => Ok(()),
        _ => Err(Error::Tls(rustls::Error::NoApplicationProtocol)),
    }
}

/// tokio-rustls reports TLS failures as `io::Error`s wrapping a `rustls::Error`; the
/// peer hanging up mid-handshake is no TLS failure.
fn handshake_error(err: io::Error) -> Error {
    if let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return Error::Tls(tls.clone());
    }
    match err.kind() {
        io::ErrorKind::UnexpectedEof => Error::PeerClosed {
            what: "the end of the tls handshake",
        },
        _ => Error::Io(err),
    }
}

/// The CA's verifier, then a check of the client's names against a list.
#[derive(Debug)]
struct AllowedClients {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
}

impl AllowedClients {
    fn new(inner: Arc<dyn ClientCertVerifier>, names: &[String]) -> Result<Self> {
        let names = names
            .iter()
            .map(|name| {
                ServerName::try_from(name.clone()).map_err(|e| Error::Config {
                    what: "tls allowed client name",
                    reason: format!("{name:?}: {e}"),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { inner, names })
    }
}

impl ClientCertVerifier for AllowedClients {
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
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        if self
            .names
            .iter()
            .any(|name| rustls::client::verify_server_name(&cert, name).is_ok())
        {
            return Ok(verified);
        }
        tracing::warn!(
            presented = ?dns_names(end_entity),
            allowed = ?self.names,
            "tls: refused a client certificate of the CA: not for an allowed client name"
        );
        Err(CertificateError::ApplicationVerificationFailure.into())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// PEM text and the file it came from, for error messages.
struct Pem<'a> {
    bytes: &'a [u8],
    file: Option<&'a Path>,
}

impl<'a> Pem<'a> {
    fn unnamed(bytes: &'a [u8]) -> Self {
        Self { bytes, file: None }
    }

    fn file(bytes: &'a [u8], file: &'a Path) -> Self {
        Self {
            bytes,
            file: Some(file),
        }
    }

    /// Every certificate in the text, at least one.
    fn certificates(&self, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_slice_iter(self.bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(what, format!("unreadable PEM: {e}")))?;
        if certs.is_empty() {
            return Err(self.error(what, "no certificate in it"));
        }
        Ok(certs)
    }

    /// `prefix` and the file's name, or nothing for unnamed text.
    fn origin(&self, prefix: &str) -> String {
        self.file
            .map(|file| format!("{prefix}{}", file.display()))
            .unwrap_or_default()
    }

    fn error(&self, what: &'static str, problem: impl fmt::Display) -> Error {
        let reason = match self.file {
            Some(file) => format!("{}: {problem}", file.display()),
            None => problem.to_string(),
        };
        Error::Config { what, reason }
    }
}

fn read(file: &Path) -> Result<Vec<u8>> {
    std::fs::read(file)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` and its key, as PEM; it is its own CA.
    fn self_signed(name: &str) -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    /// The `what` and `reason` of a configuration error.
    fn config_error<T: fmt::Debug>(result: Result<T>) -> (&'static str, String) {
        match result {
            Err(Error::Config { what, reason }) => (what, reason),
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn a_matching_certificate_and_key_make_an_identity() {
        let (cert, key) = self_signed("a.example");
        let identity = TlsIdentity::from_pem(cert.as_bytes(), key.as_bytes(), cert.as_bytes());
        let debug = format!("{:?}", identity.unwrap());
        assert!(debug.contains("a.example"), "{debug}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
    }

    #[test]
    fn pem_errors_say_which_part_and_what_is_wrong() {
        let (cert, key) = self_signed("a.example");
        let (other_cert, other_key) = self_signed("b.example");
        let (cert, key, other_cert) = (cert.as_bytes(), key.as_bytes(), other_cert.as_bytes());

        let (what, reason) = config_error(TlsIdentity::from_pem(key, key, cert));
        assert_eq!(
            (what, reason.as_str()),
            ("tls certificate", "no certificate in it")
        );

        let (what, reason) = config_error(TlsIdentity::from_pem(cert, cert, cert));
        assert_eq!(
            (what, reason.as_str()),
            ("tls private key", "no private key in it")
        );

        let (what, reason) = config_error(TlsIdentity::from_pem(cert, other_key.as_bytes(), cert));
        assert_eq!(what, "tls private key");
        assert!(
            reason.contains("does not match the certificate"),
            "{reason}"
        );

        let (what, reason) = config_error(TlsIdentity::from_pem(cert, key, b""));
        assert_eq!(
            (what, reason.as_str()),
            ("tls CA bundle", "no certificate in it")
        );

        let truncated = &cert[..cert.len() / 2];
        let (what, reason) = config_error(TlsIdentity::from_pem(truncated, key, other_cert));
        assert_eq!(what, "tls certificate");
        assert!(reason.starts_with("unreadable PEM"), "{reason}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("migstream-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = self_signed("a.example");
        let (cert_file, key_file, empty_file) =
            (dir.join("a.crt"), dir.join("a.key"), dir.join("empty.pem"));
        std::fs::write(&cert_file, &cert).unwrap();
        std::fs::write(&key_file, &key).unwrap();
        std::fs::write(&empty_file, "").unwrap();

        assert!(TlsIdentity::from_pem_files(&cert_file, &key_file, &cert_file).is_ok());

        let (what, reason) = config_error(TlsIdentity::from_pem_files(
            &cert_file,
            &key_file,
            &empty_file,
        ));
        assert_eq!(what, "tls CA bundle");
        assert_eq!(
            reason,
            format!("{}: no certificate in it", empty_file.display())
        );

        let (what, reason) = config_error(TlsIdentity::from_pem_files(
            &cert_file, &cert_file, &cert_file,
        ));
        assert_eq!(what, "tls private key");
        assert_eq!(
            reason,
            format!("{}: no private key in it", cert_file.display())
        );

        let missing = dir.join("missing.key");
        match TlsIdentity::from_pem_files(&cert_file, &missing, &cert_file) {
            Err(Error::Io(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::NotFound);
                assert!(e.to_string().contains("missing.key"), "{e}");
            }
            other => panic!("expected an i/o error, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_that_are_no_dns_name_or_address_are_refused() {
        let (cert, key) = self_signed("a.example");
        let identity =
            TlsIdentity::from_pem(cert.as_bytes(), key.as_bytes(), cert.as_bytes()).unwrap();

        let (what, _) = config_error(TlsClient::new(&identity, "not a name"));
        assert_eq!(what, "tls server name");
        assert!(TlsClient::new(&identity, "127.0.0.1").is_ok());

        let allowed = ["a.example".to_string(), "bad name!".to_string()];
        let (what, reason) = config_error(TlsServer::new(&identity, &allowed));
        assert_eq!(what, "tls allowed client name");
        assert!(reason.contains("bad name!"), "{reason}");
    }
}
