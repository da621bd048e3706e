//! Real handshakes on loopback between [`client_config`] and [`server_config`].

use std::sync::Arc;

use rustls::pki_types::ServerName;
use sitecast_tls::test_ca::TestCa;
use sitecast_tls::{CertificateFiles, Trust, certificate_refusal, client_config, server_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TLS echo-once server: reads a line's worth and writes it back.
async fn start_server(files: CertificateFiles) -> std::net::SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(files).expect("server config"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let mut buf = [0u8; 5];
                    if tls.read_exact(&mut buf).await.is_ok() {
                        let _ = tls.write_all(&buf).await;
                        let _ = tls.shutdown().await;
                    }
                }
            });
        }
    });
    address
}

/// Connects as `name`, trusting `trust`; returns the server's leaf certificate, or the error.
async fn connect(
    address: std::net::SocketAddr,
    name: &str,
    trust: &Trust,
) -> Result<Vec<u8>, std::io::Error> {
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(trust).expect("client")));
    let stream = TcpStream::connect(address).await?;
    let server_name = ServerName::try_from(name.to_owned()).expect("name");
    let mut tls = connector.connect(server_name, stream).await?;
    tls.write_all(b"hello").await?;
    let mut echo = [0u8; 5];
    tls.read_exact(&mut echo).await?;
    assert_eq!(&echo, b"hello");
    let (_, session) = tls.get_ref();
    Ok(session.peer_certificates().expect("certificates")[0].to_vec())
}

fn refusal(error: &std::io::Error) -> rustls::CertificateError {
    match certificate_refusal(error) {
        Some(rustls::Error::InvalidCertificate(why)) => why,
        other => panic!("not a certificate refusal: {other:?} from {error}"),
    }
}

#[tokio::test]
async fn a_pinned_ca_accepts_its_own_certificates_and_refuses_everything_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet_ca = TestCa::new("fleet CA");
    let other_ca = TestCa::new("someone else's CA");
    let pinned = Trust::CaFile(fleet_ca.write_root(&dir.path().join("fleet-ca.pem")));

    let good =
        start_server(fleet_ca.issue(dir.path(), "good", &["localhost", "127.0.0.1"], false)).await;
    connect(good, "localhost", &pinned).await.expect("the fleet's own certificate");
    connect(good, "127.0.0.1", &pinned).await.expect("by address too");

    let wrong_host = connect(good, "update.example", &pinned).await.expect_err("another name");
    assert!(
        matches!(refusal(&wrong_host), rustls::CertificateError::NotValidForNameContext { .. }),
        "{wrong_host}"
    );

    let stranger =
        start_server(other_ca.issue(dir.path(), "stranger", &["localhost"], false)).await;
    let error = connect(stranger, "localhost", &pinned).await.expect_err("another CA");
    assert_eq!(refusal(&error), rustls::CertificateError::UnknownIssuer, "{error}");

    let expired = start_server(fleet_ca.issue(dir.path(), "expired", &["localhost"], true)).await;
    let error = connect(expired, "localhost", &pinned).await.expect_err("expired");
    assert!(matches!(refusal(&error), rustls::CertificateError::ExpiredContext { .. }), "{error}");

    // The system's roots know neither test CA.
    let error = connect(good, "localhost", &Trust::SystemRoots).await.expect_err("not public");
    assert_eq!(refusal(&error), rustls::CertificateError::UnknownIssuer, "{error}");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("fleet CA");
    let trust = Trust::CaFile(ca.write_root(&dir.path().join("ca.pem")));
    let live = ca.issue(dir.path(), "live", &["localhost"], false);
    let server = start_server(live.clone()).await;
    let first = connect(server, "localhost", &trust).await.expect("first certificate");

    // A renewal half-written: the certificate is new, the key still the old one.
    let renewal = ca.issue(dir.path(), "renewal", &["localhost"], false);
    std::fs::copy(&renewal.certificate, &live.certificate).expect("copy certificate");
    let during = connect(server, "localhost", &trust).await.expect("still served");
    assert_eq!(during, first, "a certificate without its key is not served");

    std::fs::copy(&renewal.key, &live.key).expect("copy key");
    let after = connect(server, "localhost", &trust).await.expect("renewed");
    assert_eq!(after, std::fs::read(&renewal.certificate).map(|pem| der(&pem)).expect("read"));
    assert_ne!(after, first);
}

fn der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem).expect("pem").to_vec()
}

#[test]
fn unusable_files_are_refused_at_start_with_their_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("fleet CA");
    let one = ca.issue(dir.path(), "one", &["localhost"], false);
    let two = ca.issue(dir.path(), "two", &["localhost"], false);

    let mismatched =
        CertificateFiles { certificate: one.certificate.clone(), key: two.key.clone() };
    let error = server_config(mismatched).expect_err("key of another certificate");
    assert!(error.to_string().contains("two.key"), "{error}");

    let missing = CertificateFiles { certificate: dir.path().join("absent.pem"), key: one.key };
    let error = server_config(missing).expect_err("no such file");
    assert!(error.to_string().contains("absent.pem"), "{error}");

    std::fs::write(dir.path().join("empty.pem"), "").expect("write");
    let error = client_config(&Trust::CaFile(dir.path().join("empty.pem"))).expect_err("empty");
    assert!(error.to_string().contains("no certificate"), "{error}");
}
