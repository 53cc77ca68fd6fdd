//! TLS on a real node with self-signed certificates: the API and the
//! automerge-repo WebSocket upgrade answer over TLS, plain HTTP gets no
//! answer, a renewed certificate is served without a restart (after a
//! change of the files or SIGHUP), and a pair that does not match is not
//! taken.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use support::cluster::{wait_until, NodeProc};

/// A self-signed certificate for localhost: its PEM, its key's PEM and
/// its DER (for a client to trust).
struct SelfSigned {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn self_signed() -> SelfSigned {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    SelfSigned {
        cert_pem: made.cert.pem(),
        key_pem: made.key_pair.serialize_pem(),
        der: made.cert.der().clone(),
    }
}

/// Replaces `path` with `text` (written aside, then renamed over it).
fn replace(path: &Path, text: &str, mode: u32) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// One request over TLS to `addr`, trusting only `trusted`: the raw
/// response, or the TLS error.
fn https(addr: &str, trusted: &CertificateDer<'static>, request: &str) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                // A 101's connection stays open: its head is the answer.
                if raw.starts_with(b"HTTP/1.1 101") && raw.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

fn get(addr: &str, trusted: &CertificateDer<'static>, path: &str) -> Result<String, String> {
    https(
        addr,
        trusted,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

#[test]
fn the_api_serves_tls_and_takes_a_renewed_certificate_without_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let (cert, key) = (root.path().join("cert.pem"), root.path().join("key.pem"));
    let first = self_signed();
    replace(&cert, &first.cert_pem, 0o644);
    replace(&key, &first.key_pem, 0o600);
    let tables = format!(
        "[http]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let node = NodeProc::start_with_tables(root.path(), "a", "eu", &tables);
    let addr = node.http.clone();

    // A write and a read over TLS.
    let body = r#"{"v":1}"#;
    let put = https(
        &addr,
        &first.der,
        &format!(
            "PUT /v1/docs/t/1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .unwrap();
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    let read = get(&addr, &first.der, "/v1/docs/t/1").unwrap();
    assert!(
        read.starts_with("HTTP/1.1 200") && read.ends_with(body),
        "{read}"
    );

    // The command-line client, trusting the certificate file.
    let port = addr.rsplit(':').next().unwrap();
    let out = Command::new(support::cluster::causeway_bin())
        .args([
            "doc",
            "get",
            "t/1",
            "--url",
            &format!("https://localhost:{port}"),
        ])
        .arg("--ca-cert")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, serde_json::json!({"v": 1}));

    // The automerge-repo endpoint upgrades over TLS too.
    let upgrade = https(
        &addr,
        &first.der,
        "GET /automerge-repo HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    assert!(upgrade.starts_with("HTTP/1.1 101"), "{upgrade}");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = support::cluster::try_http(&addr, "GET", "/v1/docs", &[], b"");
    assert!(plain.is_none(), "plain HTTP was answered: {plain:?}");

    // A client that trusts another certificate is refused.
    let other = self_signed();
    assert!(get(&addr, &other.der, "/health").is_err());

    // Renewal: new files are served within the poll, without a restart.
    replace(&key, &other.key_pem, 0o600);
    replace(&cert, &other.cert_pem, 0o644);
    let took = wait_until(Duration::from_secs(10), "the renewed certificate", || {
        get(&addr, &other.der, "/health").is_ok()
    });
    assert!(get(&addr, &first.der, "/health").is_err());

    // A certificate whose key is not in the key file is not taken, even on
    // SIGHUP: the pair in use stays.
    let third = self_signed();
    replace(&cert, &third.cert_pem, 0o644);
    let hup = Command::new("kill")
        .args(["-HUP", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let log = node.dir.join("node.log");
    wait_until(
        Duration::from_secs(10),
        "the failed reload in the log",
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("could not be loaded")
        },
    );
    assert!(get(&addr, &other.der, "/health").is_ok());
    assert!(get(&addr, &third.der, "/health").is_err());
    // At least this failure is counted (a renewal looked at between the
    // replacement of its key and of its certificate fails too, and both
    // the poll and SIGHUP may try the mismatched pair).
    let metrics = get(&addr, &other.der, "/metrics").unwrap();
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("causeway_http_tls_certificate_reload_failures "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no reload failure figure: {metrics}"));
    assert!(failures >= 1, "{metrics}");
    println!(
        "TLS: write, read and WebSocket upgrade answered; plain HTTP not; renewed certificate \
         served {:.1} s after its files changed; a mismatched pair was refused and the \
         certificate in use stayed",
        took.as_secs_f64()
    );
}

#[test]
fn plain_http_beyond_loopback_needs_to_be_named() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(support::cluster::causeway_bin())
        .args(["node", "--data-dir"])
        .arg(root.path())
        .args(["--http-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("http.listen") && err.contains("http.insecure_plaintext"),
        "{err}"
    );
}
