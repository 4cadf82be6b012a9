//! Certificates made in process for the link's mutual TLS: a CA, a destination
//! (server) certificate for `dest.example` and `127.0.0.1`, source (client)
//! certificates `source-a.example` and `source-b.example`, and an unrelated CA with a
//! client certificate of its own for `source-a.example`.

use std::path::PathBuf;
use std::sync::LazyLock;

use migstream::relay::tls::TlsIdentity;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

pub struct Pki {
    pub ca: String,
    pub server: Leaf,
    pub source_a: Leaf,
    pub source_b: Leaf,
    pub other_ca: String,
    /// A client certificate of `other_ca`, for `source-a.example` too.
    pub stranger: Leaf,
}

/// The one set of certificates of a test process.
pub static PKI: LazyLock<Pki> = LazyLock::new(|| {
    let (ca, other_ca) = (new_ca("migstream test CA"), new_ca("another CA"));
    let client = ExtendedKeyUsagePurpose::ClientAuth;
    Pki {
        server: leaf(
            &ca,
            &["dest.example", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        source_a: leaf(&ca, &["source-a.example"], client.clone()),
        source_b: leaf(&ca, &["source-b.example"], client.clone()),
        stranger: leaf(&other_ca, &["source-a.example"], client),
        ca: ca.pem(),
        other_ca: other_ca.pem(),
    }
});

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(ca: &CertifiedIssuer<'_, KeyPair>, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "migstream test");
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    Leaf {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// `leaf`'s identity, trusting `ca`.
pub fn identity(leaf: &Leaf, ca: &str) -> TlsIdentity {
    TlsIdentity::from_pem(leaf.cert.as_bytes(), leaf.key.as_bytes(), ca.as_bytes()).unwrap()
}

/// A bare rustls client configuration, for peers that `TlsClient` cannot be: TLS 1.3
/// with `leaf`'s certificate or none, these ALPN protocols, trusting the test CA.
pub fn raw_client_config(
    leaf: Option<&Leaf>,
    alpn: &[&[u8]],
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(PKI.ca.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match leaf {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    std::sync::Arc::new(config)
}

/// PEM files of the set in `dir`, as the proxies take them.
pub struct Files {
    pub dir: PathBuf,
}

impl Files {
    /// Writes the certificates into a fresh directory named after `test`.
    pub fn write(test: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("migstream-pki-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = &*PKI;
        for (name, pem) in [
            ("ca.pem", &pki.ca),
            ("other-ca.pem", &pki.other_ca),
            ("dest.pem", &pki.server.cert),
            ("dest.key", &pki.server.key),
            ("source-a.pem", &pki.source_a.cert),
            ("source-a.key", &pki.source_a.key),
            ("source-b.pem", &pki.source_b.cert),
            ("source-b.key", &pki.source_b.key),
            ("stranger.pem", &pki.stranger.cert),
            ("stranger.key", &pki.stranger.key),
        ] {
            std::fs::write(dir.join(name), pem).unwrap();
        }
        Files { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    /// The destination proxy's TLS options, allowing `source-a.example` only.
    pub fn destination_args(&self) -> Vec<String> {
        self.args("dest", "ca.pem")
            .into_iter()
            .chain(["--tls-allow".to_string(), "source-a.example".to_string()])
            .collect()
    }

    /// The source proxy's TLS options with the certificate `name` (`source-a`,
    /// `source-b`, `stranger`), trusting the test CA; the destination is reached as
    /// 127.0.0.1, which its certificate names.
    pub fn source_args(&self, name: &str) -> Vec<String> {
        self.args(name, "ca.pem")
    }

    fn args(&self, name: &str, ca: &str) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path(&format!("{name}.pem")),
            "--tls-key".into(),
            self.path(&format!("{name}.key")),
            "--tls-ca".into(),
            self.path(ca),
        ]
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
