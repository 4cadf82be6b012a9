//! What a destination trusts, and shows, when it reaches its Redis nodes over TLS
//! (`rediss://` URLs): a private CA in PEM, and optionally a client certificate
//! and key for servers that ask for one (`tls-auth-clients yes`).
//!
//! Everything is parsed and checked when built, so a wrong file fails at start-up
//! with [`Error::Config`], not at the first connection. The connection itself is
//! made by the `redis` crate's rustls (ring provider) over tokio.

use std::fmt;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// TLS settings of `rediss://` nodes: which CA to trust and, optionally, the
/// client's own certificate.
///
/// [`RedisTls::default()`] trusts the system's roots (as a `rediss://` node with no
/// settings does) and shows no client certificate. With a CA
/// ([`from_ca_pem`](Self::from_ca_pem), [`from_ca_file`](Self::from_ca_file)),
/// only that CA is trusted. The server's certificate must name the host of the URL
/// (a DNS name or an IP address).
///
/// `Debug` shows how many CA certificates there are and whether a client identity
/// is set, never the key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// PEM of the trusted CA certificates; `None`: the system's roots.
    pub(crate) ca: Option<Vec<u8>>,
    /// How many certificates `ca` holds.
    ca_certificates: usize,
    /// PEM of the client certificate chain and of its key.
    pub(crate) client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ca = match &self.ca {
            Some(_) => format!("{} certificates", self.ca_certificates),
            None => "system roots".to_string(),
        };
        f.debug_struct("RedisTls")
            .field("ca", &ca)
            .field("client_identity", &self.client.is_some())
            .finish()
    }
}

impl RedisTls {
    /// Trusts only the CA certificates in `pem` (one or more `CERTIFICATE`
    /// sections).
    ///
    /// Fails with [`Error::Config`] if `pem` holds no certificate, or one that is
    /// not a usable trust anchor.
    pub fn from_ca_pem(pem: impl Into<Vec<u8>>) -> Result<Self> {
        let pem = pem.into();
        let certs = certificates(&pem, "redis TLS CA")?;
        let mut roots = rustls::RootCertStore::empty();
        for (i, cert) in certs.into_iter().enumerate() {
            roots.add(cert).map_err(|e| Error::Config {
                what: "redis TLS CA",
                reason: format!("certificate {} is not a usable trust anchor: {e}", i + 1),
            })?;
        }
        Ok(Self {
            ca_certificates: roots.len(),
            ca: Some(pem),
            client: None,
        })
    }

    /// [`from_ca_pem`](Self::from_ca_pem) of the file at `path`.
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_ca_pem(read(path.as_ref(), "redis TLS CA")?)
    }

    /// Shows the certificate chain `cert_pem` (leaf first) with its private key
    /// `key_pem` (PKCS#8, PKCS#1 or SEC1) to servers that ask for a client
    /// certificate.
    ///
    /// Fails with [`Error::Config`] if either does not parse, the key is of a kind
    /// rustls' ring provider cannot sign with, or it is not the certificate's key.
    /// No message quotes the key.
    pub fn with_client_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<Self> {
        let (cert_pem, key_pem) = (cert_pem.into(), key_pem.into());
        let chain = certificates(&cert_pem, "redis TLS client certificate")?;
        let invalid_key = |reason: &str| Error::Config {
            what: "redis TLS client key",
            reason: reason.to_string(),
        };
        // the PEM parser's errors can quote a line of the file: not repeated here
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|_| invalid_key("no PKCS#8, PKCS#1 or SEC1 private key in the PEM"))?;
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| invalid_key(&format!("unusable with the certificate: {e}")))?;
        self.client = Some((cert_pem, key_pem));
        Ok(self)
    }

    /// [`with_client_identity`](Self::with_client_identity) of the files at
    /// `cert` and `key`.
    pub fn with_client_identity_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self> {
        let cert = read(cert.as_ref(), "redis TLS client certificate")?;
        let key = read(key.as_ref(), "redis TLS client key")?;
        self.with_client_identity(cert, key)
    }

    /// Whether a CA of its own replaces the system's roots.
    pub fn has_ca(&self) -> bool {
        self.ca.is_some()
    }

    /// Whether a client certificate is shown.
    pub fn has_client_identity(&self) -> bool {
        self.client.is_some()
    }

    /// The `redis` crate's form of these settings.
    pub(crate) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }
}

/// The certificates of `pem`, at least one.
fn certificates(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config {
            what,
            reason: format!("not PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(Error::Config {
            what,
            reason: "no CERTIFICATE section in the PEM".to_string(),
        });
    }
    Ok(certs)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Config {
        what,
        reason: format!("{}: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), rcgen::Issuer::new(params, key))
    }

    #[test]
    fn a_ca_pem_is_checked_when_built() {
        let (pem, _) = ca();
        let tls = RedisTls::from_ca_pem(pem.clone()).unwrap();
        assert!(tls.has_ca() && !tls.has_client_identity());
        assert_eq!(
            format!("{tls:?}"),
            r#"RedisTls { ca: "1 certificates", client_identity: false }"#
        );
        let two = RedisTls::from_ca_pem(format!("{pem}{}", ca().0)).unwrap();
        assert_eq!(two.ca_certificates, 2);

        for bad in [
            "",
            "not a pem",
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        ] {
            let err = RedisTls::from_ca_pem(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Config {
                        what: "redis TLS CA",
                        ..
                    }
                ),
                "{bad:?}: {err}"
            );
        }
        let err = RedisTls::from_ca_file("/nonexistent/ca.pem").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_client_identity_must_be_the_certificates_key_and_is_never_shown() {
        let (_, issuer) = ca();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["client".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let key_pem = key.serialize_pem();
        let tls = RedisTls::default()
            .with_client_identity(cert.pem(), key_pem.clone())
            .unwrap();
        assert!(tls.has_client_identity() && !tls.has_ca());
        let debug = format!("{tls:?}");
        assert!(!debug.contains("PRIVATE KEY") && debug.contains("client_identity: true"));

        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let err = RedisTls::default()
            .with_client_identity(cert.pem(), other)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Config {
                    what: "redis TLS client key",
                    ..
                }
            ),
            "{err}"
        );
        // a truncated key: refused, and no line of it quoted
        let broken = key_pem.lines().take(2).collect::<Vec<_>>().join("\n");
        let err = RedisTls::default()
            .with_client_identity(cert.pem(), broken.clone())
            .unwrap_err();
        let secret_line = broken.lines().nth(1).unwrap();
        assert!(!err.to_string().contains(secret_line), "{err}");
        let err = RedisTls::default()
            .with_client_identity("", key_pem)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Config {
                    what: "redis TLS client certificate",
                    ..
                }
            ),
            "{err}"
        );
    }
}
