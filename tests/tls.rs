//! The proxies' mutual TLS (`migstream::relay::tls`) over loopback TCP: who is let in,
//! who is refused, and that a refusal is an error rather than a hang.
//!
//! Certificates are made in process: a CA with a server certificate for
//! `dest.example` and `127.0.0.1` and client certificates for `source-a.example` and
//! `source-b.example`, and an unrelated CA with a client certificate of its own.

use std::future::Future;
use std::time::Duration;

mod support;

use migstream::Error;
use migstream::relay::tls::{ALPN, TlsClient, TlsServer, peer_names};
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError};
use support::pki::{Leaf, PKI, identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A bound on every wait: a handshake that hangs fails the test instead of the suite.
const BOUND: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

fn server(allowed_clients: &[&str]) -> TlsServer {
    let allowed: Vec<String> = allowed_clients.iter().map(|n| n.to_string()).collect();
    TlsServer::new(&identity(&PKI.server, &PKI.ca), &allowed).unwrap()
}

fn client(leaf: &Leaf, server_name: &str) -> TlsClient {
    TlsClient::new(&identity(leaf, &PKI.ca), server_name).unwrap()
}

/// Both ends of a fresh loopback TCP connection: (client's, server's).
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = bounded("tcp connect", async {
        tokio::join!(TcpStream::connect(addr), listener.accept())
    })
    .await;
    (client.unwrap(), accepted.unwrap().0)
}

/// Runs both handshakes at once over loopback TCP.
async fn handshake(
    client: &TlsClient,
    server: &TlsServer,
) -> (
    migstream::Result<tokio_rustls::client::TlsStream<TcpStream>>,
    migstream::Result<tokio_rustls::server::TlsStream<TcpStream>>,
) {
    let (c, s) = tcp_pair().await;
    bounded("the handshakes", async {
        tokio::join!(client.connect(c), server.accept(s))
    })
    .await
}

/// What the client's first read says once the server refused its certificate: in TLS
/// 1.3 the client's handshake is over before the server has checked it.
async fn refusal_seen_by_client(
    connected: migstream::Result<tokio_rustls::client::TlsStream<TcpStream>>,
) -> rustls::Error {
    let mut tls = match connected {
        Err(Error::Tls(e)) => return e,
        Err(e) => panic!("expected a tls error, got {e}"),
        Ok(tls) => tls,
    };
    let mut byte = [0u8; 1];
    let err = bounded("the client's read", tls.read(&mut byte))
        .await
        .expect_err("the client read data from a server that refused it");
    err.into_inner()
        .and_then(|e| e.downcast::<rustls::Error>().ok())
        .map(|e| *e)
        .expect("a tls error")
}

/// A bare rustls client, for peers that `TlsClient` cannot be: one without a
/// certificate, or of another protocol.
async fn raw_client(
    client_cert: Option<&Leaf>,
    alpn: &[&[u8]],
    stream: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = support::pki::raw_client_config(client_cert, alpn);
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("dest.example").unwrap(), stream)
        .await
}

fn tls_error(result: migstream::Result<impl Sized>) -> rustls::Error {
    match result {
        Err(Error::Tls(e)) => e,
        Err(e) => panic!("expected a tls error, got {e}"),
        Ok(_) => panic!("expected a tls error, the handshake succeeded"),
    }
}

#[tokio::test]
async fn mutual_handshake_carries_bytes_both_ways() {
    // the server's certificate holds its IP address as well as its DNS name
    for server_name in ["dest.example", "127.0.0.1"] {
        let (connected, accepted) =
            handshake(&client(&PKI.source_a, server_name), &server(&[])).await;
        let (mut c, mut s) = (connected.unwrap(), accepted.unwrap());

        assert_eq!(peer_names(s.get_ref().1), ["source-a.example"]);
        assert_eq!(peer_names(c.get_ref().1), ["dest.example"]);
        for conn in [c.get_ref().1 as &rustls::CommonState, s.get_ref().1] {
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            assert_eq!(conn.alpn_protocol(), Some(ALPN));
        }

        bounded("the exchange", async {
            c.write_all(b"QEVM to the destination").await.unwrap();
            c.flush().await.unwrap();
            let mut buf = [0u8; 23];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"QEVM to the destination");

            s.write_all(b"return path").await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"return path");
        })
        .await;
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let (c, s) = tcp_pair().await;
    let server = server(&[]);
    let (_connected, accepted) = bounded("the handshakes", async {
        tokio::join!(raw_client(None, &[ALPN], c), server.accept(s))
    })
    .await;
    assert_eq!(tls_error(accepted), rustls::Error::NoCertificatesPresented);
}

#[tokio::test]
async fn a_client_certificate_of_another_ca_is_refused() {
    // the stranger trusts our CA, and its certificate names an allowed client
    let stranger = TlsClient::new(&identity(&PKI.stranger, &PKI.ca), "dest.example").unwrap();
    let (connected, accepted) = handshake(&stranger, &server(&["source-a.example"])).await;
    assert_eq!(
        tls_error(accepted),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    assert_eq!(
        refusal_seen_by_client(connected).await,
        rustls::Error::AlertReceived(AlertDescription::UnknownCA)
    );

    // the same certificate is fine for a server that trusts its CA
    let trusting = TlsServer::new(&identity(&PKI.server, &PKI.other_ca), &[]).unwrap();
    let (connected, accepted) = handshake(&stranger, &trusting).await;
    connected.unwrap();
    assert_eq!(
        peer_names(accepted.unwrap().get_ref().1),
        ["source-a.example"]
    );
}

#[tokio::test]
async fn a_client_name_not_allowed_is_refused_and_accepted_once_allowed() {
    let source_b = client(&PKI.source_b, "dest.example");

    let (connected, accepted) = handshake(&source_b, &server(&["source-a.example"])).await;
    assert_eq!(
        tls_error(accepted),
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    );
    assert_eq!(
        refusal_seen_by_client(connected).await,
        rustls::Error::AlertReceived(AlertDescription::AccessDenied)
    );

    let allowed = server(&["source-a.example", "source-b.example"]);
    let (connected, accepted) = handshake(&source_b, &allowed).await;
    connected.unwrap();
    assert_eq!(
        peer_names(accepted.unwrap().get_ref().1),
        ["source-b.example"]
    );
}

#[tokio::test]
async fn the_client_refuses_a_server_of_another_name() {
    let misdirected = client(&PKI.source_a, "other.example");
    let (connected, accepted) = handshake(&misdirected, &server(&[])).await;
    assert!(
        matches!(
            tls_error(connected),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ),
        "the client accepted a certificate for dest.example as other.example"
    );
    assert!(accepted.is_err());
}

#[tokio::test]
async fn a_plain_text_peer_fails_the_handshake_instead_of_hanging() {
    let server = server(&[]);

    // a source proxy without TLS: the dedup stream's magic, and the socket kept open
    let (mut c, s) = tcp_pair().await;
    c.write_all(b"MGSD\x00\x00\x00\x03 dedup stream in clear")
        .await
        .unwrap();
    let accepted = bounded("accept of a plain-text peer", server.accept(s)).await;
    assert!(
        matches!(accepted, Err(Error::Tls(rustls::Error::InvalidMessage(_)))),
        "{accepted:?}"
    );
    drop(c);

    // a peer that hangs up before a word
    let (c, s) = tcp_pair().await;
    drop(c);
    let accepted = bounded("accept of a closed connection", server.accept(s)).await;
    assert!(
        matches!(accepted, Err(Error::PeerClosed { .. })),
        "{accepted:?}"
    );
}

#[tokio::test]
async fn a_client_of_another_protocol_is_refused() {
    let server = server(&[]);
    for alpn in [&[b"h2".as_slice()][..], &[]] {
        let (c, s) = tcp_pair().await;
        let (_connected, accepted) = bounded("the handshakes", async {
            tokio::join!(raw_client(Some(&PKI.source_a), alpn, c), server.accept(s))
        })
        .await;
        assert_eq!(
            tls_error(accepted),
            rustls::Error::NoApplicationProtocol,
            "ALPN {alpn:?}"
        );
    }
}

#[tokio::test]
async fn a_tls_1_2_client_is_refused() {
    // rustls is built without TLS 1.2 here, so this guards the build (a dependency
    // turning on rustls' `tls12` feature) as much as the server's configuration
    let (mut c, s) = tcp_pair().await;
    c.write_all(&tls12_client_hello()).await.unwrap();
    let accepted = bounded("accept of a TLS 1.2 client", server(&[]).accept(s)).await;
    assert!(matches!(
        tls_error(accepted),
        rustls::Error::PeerIncompatible(_)
    ));

    let mut alert = Vec::new();
    bounded("the server's alert", c.read_to_end(&mut alert))
        .await
        .unwrap();
    // a fatal alert record (21) of TLS 1.2's framing
    assert_eq!(alert.first(), Some(&21), "{alert:?}");
}

/// A TLS 1.2 ClientHello (no supported_versions extension) offering
/// ECDHE-ECDSA-AES128-GCM-SHA256 over x25519, to `dest.example`.
fn tls12_client_hello() -> Vec<u8> {
    fn with_len16(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }
    fn extension(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend(with_len16(body));
        out
    }
    let mut server_name = vec![0u8]; // host_name
    server_name.extend(with_len16(b"dest.example"));
    let extensions = [
        extension(0x0000, &with_len16(&server_name)),
        extension(0x000a, &with_len16(&0x001du16.to_be_bytes())), // supported_groups
        extension(0x000b, &[1, 0]),                               // ec_point_formats
        extension(0x000d, &with_len16(&0x0403u16.to_be_bytes())), // ecdsa_secp256r1_sha256
    ]
    .concat();

    let mut hello = vec![0x03, 0x03]; // TLS 1.2
    hello.extend([7u8; 32]); // random
    hello.push(0); // no session id
    hello.extend(with_len16(&0xc02bu16.to_be_bytes()));
    hello.extend([1, 0]); // null compression
    hello.extend(with_len16(&extensions));

    let mut handshake = vec![1u8]; // client_hello
    handshake.extend(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend(hello);

    let mut record = vec![22u8, 0x03, 0x01]; // handshake record
    record.extend(with_len16(&handshake));
    record
}
