//! `install::download` against real TLS on loopback: a CA and server certificates made at
//! test time, small rustls servers in threads that count their connections, a plain TCP
//! listener standing in for an http server, and a tiny CONNECT proxy. No internet needed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::install::download::{DownloadError, Downloader};

/// A CA and a server certificate it signed for 127.0.0.1, localhost and downloads.test.
struct Pki {
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

fn new_pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "downloads.test".to_string(),
    ])
    .unwrap()
    .signed_by(&key, &issuer)
    .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        chain: vec![leaf.der().clone(), ca_cert.der().clone()],
        key_der: key.serialize_der(),
    }
}

type Handler = dyn Fn(&str, &mut dyn Write) + Send + Sync;

/// An HTTPS/1.1 server on 127.0.0.1 answering one request per connection.
struct Server {
    port: u16,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(pki: &Pki, handler: impl Fn(&str, &mut dyn Write) + Send + Sync + 'static) -> Server {
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    pki.chain.clone(),
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone())),
                )
                .unwrap();
        let config = Arc::new(config);
        let handler: Arc<Handler> = Arc::new(handler);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (connections.clone(), requests.clone());
        thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let (config, handler, seen) = (config.clone(), handler.clone(), seen.clone());
                thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let Some(path) = read_request_path(&mut tls) else {
                        return; // handshake refused by the client, or garbage
                    };
                    seen.lock().unwrap().push(path.clone());
                    handler(&path, &mut tls);
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        Server {
            port,
            connections,
            requests,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn read_request_path(stream: &mut impl Read) -> Option<String> {
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
            break;
        }
    }
    first.split_whitespace().nth(1).map(str::to_string)
}

/// A plain TCP listener that only counts connections: where an http:// URL would lead.
fn plain_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    thread::spawn(move || {
        for _ in listener.incoming() {
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, count)
}

fn ok(w: &mut dyn Write, body: &[u8]) {
    let _ = write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = w.write_all(body);
}

fn status(w: &mut dyn Write, line: &str) {
    let _ = write!(
        w,
        "HTTP/1.1 {line}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

fn redirect(w: &mut dyn Write, code: &str, location: &str) {
    let _ = write!(
        w,
        "HTTP/1.1 {code}\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

fn chunked(w: &mut dyn Write, body: &[u8]) {
    let _ = write!(
        w,
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for chunk in body.chunks(16 * 1024) {
        let _ = write!(w, "{:x}\r\n", chunk.len());
        let _ = w.write_all(chunk);
        let _ = w.write_all(b"\r\n");
    }
    let _ = w.write_all(b"0\r\n\r\n");
}

/// No Content-Length at all: the body ends when the connection closes.
fn close_delimited(w: &mut dyn Write, body: &[u8]) {
    let _ = write!(w, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
    let _ = w.write_all(body);
}

/// A runtime-binary-sized payload that no off-by-one in buffering can fake.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn sha256(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn downloader(pki: &Pki) -> Downloader {
    Downloader::with_roots_pem(pki.ca_pem.as_bytes())
        .unwrap()
        // Hermetic: whatever HTTPS_PROXY the machine running the tests has.
        .with_proxy(None, None)
        .unwrap()
        .with_timeout(Duration::from_secs(20))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn serve(pki: &Pki, body: Vec<u8>) -> Server {
    Server::start(pki, move |_, w| ok(w, &body))
}

#[test]
fn good_download_is_verified_named_by_sha256_and_executable() {
    let pki = new_pki();
    let body = payload(700 * 1024 + 17);
    let hash = sha256(&body);
    let server = serve(&pki, body.clone());
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/releases/runc.amd64");

    let path = downloader(&pki).fetch(&url, &hash, dir.path()).unwrap();

    assert_eq!(path, dir.path().join(&hash));
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755);
    assert_eq!(entries(dir.path()), vec![hash], "no temp file left beside it");
    assert_eq!(*server.requests.lock().unwrap(), vec!["/releases/runc.amd64"]);
}

#[test]
fn missing_download_dir_is_created() {
    let pki = new_pki();
    let body = payload(1000);
    let hash = sha256(&body);
    let server = serve(&pki, body);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("var/lib/usernsguard/downloads");
    let path = downloader(&pki).fetch(&server.url("/runc"), &hash, &dir).unwrap();
    assert_eq!(path, dir.join(&hash));
}

#[test]
fn already_present_file_is_returned_without_connecting() {
    let pki = new_pki();
    let body = payload(64 * 1024);
    let hash = sha256(&body);
    let server = serve(&pki, body.clone());
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/runc");

    downloader(&pki).fetch(&url, &hash, dir.path()).unwrap();
    assert_eq!(server.connections(), 1);
    // A restarted agent: a new Downloader, the same directory.
    let again = downloader(&pki).fetch(&url, &hash, dir.path()).unwrap();
    assert_eq!(again, dir.path().join(&hash));
    assert_eq!(server.connections(), 1, "the second fetch must not connect");

    // A file placed by an earlier version with another mode is reused and made executable.
    std::fs::set_permissions(&again, std::fs::Permissions::from_mode(0o600)).unwrap();
    downloader(&pki).fetch(&url, &hash, dir.path()).unwrap();
    assert_eq!(server.connections(), 1);
    let mode = std::fs::metadata(&again).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755);
}

#[test]
fn corrupt_file_under_the_hash_name_is_downloaded_again() {
    let pki = new_pki();
    let body = payload(10_000);
    let hash = sha256(&body);
    let server = serve(&pki, body.clone());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(&hash), b"truncated by a crash").unwrap();

    let path = downloader(&pki)
        .fetch(&server.url("/runc"), &hash, dir.path())
        .unwrap();

    assert_eq!(server.connections(), 1);
    assert_eq!(std::fs::read(path).unwrap(), body);
    assert_eq!(entries(dir.path()), vec![hash]);
}

#[test]
fn sha256_mismatch_is_an_error_and_leaves_nothing() {
    let pki = new_pki();
    let body = payload(300 * 1024);
    let actual = sha256(&body);
    let expected = sha256(b"what the profile author built");
    let server = serve(&pki, body);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/runc");

    let err = downloader(&pki).fetch(&url, &expected, dir.path()).unwrap_err();

    assert!(matches!(err, DownloadError::Sha256Mismatch { .. }), "{err:?}");
    assert_eq!(err.label(), "sha256_mismatch");
    assert_eq!(
        err.to_string(),
        format!("{url}: sha256 is {actual}, the profile expects {expected}")
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn malformed_expected_sha256_is_refused_before_connecting() {
    let pki = new_pki();
    let server = serve(&pki, b"x".to_vec());
    let dir = tempfile::tempdir().unwrap();
    let upper = sha256(b"x").to_ascii_uppercase();
    for bad in ["", "abc", upper.as_str()] {
        let err = downloader(&pki)
            .fetch(&server.url("/runc"), bad, dir.path())
            .unwrap_err();
        assert_eq!(err.label(), "bad_sha256", "{bad}: {err}");
    }
    assert_eq!(server.connections(), 0);
}

#[test]
fn http_url_is_refused_without_connecting() {
    let pki = new_pki();
    let (port, connections) = plain_listener();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/runc");

    let err = downloader(&pki)
        .fetch(&url, &sha256(b"x"), dir.path())
        .unwrap_err();

    assert_eq!(err.label(), "bad_url", "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with(&url) && msg.contains("only https"), "{msg}");
    thread::sleep(Duration::from_millis(50));
    assert_eq!(connections.load(Ordering::SeqCst), 0);
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn redirects_are_followed_https_to_https() {
    let pki = new_pki();
    let body = payload(200 * 1024);
    let hash = sha256(&body);
    // Like GitHub: the release URL redirects to another host, which redirects once more
    // with an absolute path.
    let objects = Server::start(&pki, {
        let body = body.clone();
        move |path, w| match path {
            "/o/runc" => redirect(w, "301 Moved Permanently", "/blob/123"),
            "/blob/123" => ok(w, &body),
            _ => status(w, "404 Not Found"),
        }
    });
    let objects_url = objects.url("/o/runc");
    let releases = Server::start(&pki, move |_, w| redirect(w, "302 Found", &objects_url));
    let dir = tempfile::tempdir().unwrap();

    let path = downloader(&pki)
        .fetch(&releases.url("/download/v1/runc"), &hash, dir.path())
        .unwrap();

    assert_eq!(std::fs::read(path).unwrap(), body);
    assert_eq!(*releases.requests.lock().unwrap(), vec!["/download/v1/runc"]);
    assert_eq!(*objects.requests.lock().unwrap(), vec!["/o/runc", "/blob/123"]);
}

#[test]
fn at_most_five_redirects_are_followed() {
    let pki = new_pki();
    let body = payload(1000);
    let hash = sha256(&body);
    // /hop/N redirects to /hop/N-1; /hop/0 serves the file.
    let server = Server::start(&pki, move |path, w| {
        let n: u32 = path.trim_start_matches("/hop/").parse().unwrap();
        if n == 0 {
            ok(w, &body)
        } else {
            redirect(w, "307 Temporary Redirect", &format!("/hop/{}", n - 1))
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let d = downloader(&pki);

    d.fetch(&server.url("/hop/5"), &hash, dir.path()).unwrap();
    std::fs::remove_file(dir.path().join(&hash)).unwrap();
    let before = server.requests.lock().unwrap().len();
    assert_eq!(before, 6);

    let err = d.fetch(&server.url("/hop/6"), &hash, dir.path()).unwrap_err();
    assert_eq!(err.label(), "too_many_redirects", "{err}");
    assert!(err.to_string().contains("/hop/0"), "{err}");
    assert_eq!(
        server.requests.lock().unwrap().len() - before,
        6,
        "the sixth hop is not requested"
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn redirect_to_http_is_refused() {
    let pki = new_pki();
    let (port, plain) = plain_listener();
    let insecure = format!("http://127.0.0.1:{port}/runc");
    let target = insecure.clone();
    let server = Server::start(&pki, move |_, w| redirect(w, "302 Found", &target));
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/runc");

    let err = downloader(&pki)
        .fetch(&url, &sha256(b"x"), dir.path())
        .unwrap_err();

    assert_eq!(err.label(), "insecure_redirect", "{err}");
    assert_eq!(
        err.to_string(),
        format!("{url}: redirected to {insecure}, which is not https: only https downloads are allowed")
    );
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        plain.load(Ordering::SeqCst),
        0,
        "the http URL must not be contacted"
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn server_certificate_from_another_ca_is_refused() {
    let trusted = new_pki();
    let other = new_pki();
    let server = serve(&other, b"runc".to_vec());
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/runc");

    let err = downloader(&trusted)
        .fetch(&url, &sha256(b"runc"), dir.path())
        .unwrap_err();

    assert_eq!(err.label(), "untrusted_certificate", "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "{url}: certificate not trusted by the given CA certificates: "
        )),
        "{msg}"
    );
    assert_eq!(server.connections(), 1);
    assert!(
        server.requests.lock().unwrap().is_empty(),
        "no request after a refused handshake"
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn body_over_the_cap_is_refused_while_streaming() {
    let pki = new_pki();
    let cap: u64 = 256 * 1024;
    let exact = payload(cap as usize);
    let big = payload(cap as usize + 1);
    let server = Server::start(&pki, {
        let (exact, big) = (exact.clone(), big.clone());
        move |path, w| match path {
            "/exact" => chunked(w, &exact),
            "/chunked" => chunked(w, &big),
            "/no-length" => close_delimited(w, &big),
            _ => status(w, "404 Not Found"),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let d = downloader(&pki).with_max_bytes(cap);

    // Exactly at the cap is allowed: the check is not off by one.
    let path = d
        .fetch(&server.url("/exact"), &sha256(&exact), dir.path())
        .unwrap();
    std::fs::remove_file(path).unwrap();

    for path in ["/chunked", "/no-length"] {
        let err = d.fetch(&server.url(path), &sha256(&big), dir.path()).unwrap_err();
        assert_eq!(err.label(), "download_too_large", "{path}: {err:?}");
        assert!(
            matches!(err, DownloadError::TooLarge { declared: None, max, .. } if max == cap),
            "{path}: {err:?}"
        );
        assert_eq!(
            entries(dir.path()),
            Vec::<String>::new(),
            "{path}: temp file removed"
        );
    }
}

#[test]
fn declared_length_over_the_cap_is_refused_before_the_body() {
    let pki = new_pki();
    // Announces 1 GiB, then sends nothing: only refusing on the header ends this quickly.
    let server = Server::start(&pki, |_, w| {
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n");
        let _ = w.flush();
        thread::sleep(Duration::from_secs(30));
    });
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/runc");
    let started = Instant::now();

    let err = downloader(&pki)
        .with_max_bytes(1024 * 1024)
        .with_timeout(Duration::from_secs(10))
        .fetch(&url, &sha256(b"x"), dir.path())
        .unwrap_err();

    assert_eq!(err.label(), "download_too_large", "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{url}: Content-Length 1073741824 exceeds the limit of 1048576 bytes")
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn stalled_body_times_out_and_leaves_nothing() {
    let pki = new_pki();
    let server = Server::start(&pki, |_, w| {
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b");
        let _ = w.flush();
        thread::sleep(Duration::from_secs(30));
    });
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();

    let err = downloader(&pki)
        .with_timeout(Duration::from_millis(800))
        .fetch(&server.url("/runc"), &sha256(b"x"), dir.path())
        .unwrap_err();

    assert_eq!(err.label(), "download_timeout", "{err:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(700) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn http_404_is_an_error_naming_the_status() {
    let pki = new_pki();
    let server = Server::start(&pki, |_, w| status(w, "404 Not Found"));
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/releases/v9/runc");

    let err = downloader(&pki)
        .fetch(&url, &sha256(b"x"), dir.path())
        .unwrap_err();

    assert_eq!(err.label(), "http_status");
    assert!(
        matches!(err, DownloadError::HttpStatus { status: 404, .. }),
        "{err:?}"
    );
    assert_eq!(err.to_string(), format!("{url}: HTTP 404 Not Found"));
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn for_host_trusts_the_ca_bundle_inside_the_host_root() {
    let pki = new_pki();
    let body = payload(5000);
    let hash = sha256(&body);
    let server = serve(&pki, body.clone());
    // A RHEL-like host: the bundle path is an absolute symlink, meaningful only inside the
    // host root (this machine has no /etc/pki).
    let root = tempfile::tempdir().unwrap();
    let extracted = root.path().join("etc/pki/ca-trust/extracted/pem");
    std::fs::create_dir_all(&extracted).unwrap();
    std::fs::write(extracted.join("tls-ca-bundle.pem"), &pki.ca_pem).unwrap();
    std::fs::create_dir_all(root.path().join("etc/pki/tls/certs")).unwrap();
    symlink(
        "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        root.path().join("etc/pki/tls/certs/ca-bundle.crt"),
    )
    .unwrap();
    let host = HostRoot::at(root.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let d = Downloader::for_host(&host)
        .unwrap()
        .with_proxy(None, None)
        .unwrap();
    let path = d.fetch(&server.url("/runc"), &hash, dir.path()).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), body);

    // A Debian path comes first: its (other) CA now decides, and errors name it.
    let other = new_pki();
    std::fs::create_dir_all(root.path().join("etc/ssl/certs")).unwrap();
    std::fs::write(
        root.path().join("etc/ssl/certs/ca-certificates.crt"),
        &other.ca_pem,
    )
    .unwrap();
    let d = Downloader::for_host(&host)
        .unwrap()
        .with_proxy(None, None)
        .unwrap();
    let url = server.url("/runc");
    let err = d.fetch(&url, &sha256(b"other"), dir.path()).unwrap_err();
    assert_eq!(err.label(), "untrusted_certificate", "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "{url}: certificate not trusted by the node's CA bundle (/etc/ssl/certs/ca-certificates.crt): "
        )),
        "{msg}"
    );
}

#[test]
fn for_host_without_a_usable_ca_bundle_is_an_error() {
    let root = tempfile::tempdir().unwrap();
    let host = HostRoot::at(root.path()).unwrap();
    let err = Downloader::for_host(&host).unwrap_err();
    assert_eq!(err.label(), "no_ca_bundle");
    assert!(
        err.to_string().contains("/etc/ssl/certs/ca-certificates.crt"),
        "{err}"
    );

    std::fs::create_dir_all(root.path().join("etc/ssl")).unwrap();
    std::fs::write(
        root.path().join("etc/ssl/cert.pem"),
        "# emptied by a broken update\n",
    )
    .unwrap();
    let err = Downloader::for_host(&host).unwrap_err();
    assert_eq!(err.label(), "bad_ca_bundle", "{err}");
    assert!(
        err.to_string().starts_with("CA bundle /etc/ssl/cert.pem: "),
        "{err}"
    );
}

/// A CONNECT proxy that records each target and tunnels to 127.0.0.1 on the target's port;
/// targets containing "forbidden" get a 403.
fn connect_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let log = log.clone();
            thread::spawn(move || {
                // Byte by byte: nothing of the tunnelled TLS may be swallowed.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                log.lock().unwrap().push(format!(
                    "{} {target}",
                    head.split_whitespace().next().unwrap_or("")
                ));
                if target.contains("forbidden") {
                    let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
                    return;
                }
                let port = target.rsplit(':').next().unwrap_or("0");
                let Ok(upstream) = TcpStream::connect(format!("127.0.0.1:{port}")) else {
                    return;
                };
                let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let pump = thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut u_write);
                    let _ = u_write.shutdown(Shutdown::Write);
                });
                let (mut u_read, mut c_write) = (upstream, client);
                let _ = std::io::copy(&mut u_read, &mut c_write);
                let _ = c_write.shutdown(Shutdown::Write);
                let _ = pump.join();
            });
        }
    });
    (port, seen)
}

#[test]
fn downloads_go_through_the_https_proxy_except_no_proxy_hosts() {
    let pki = new_pki();
    let body = payload(150 * 1024);
    let hash = sha256(&body);
    let server = serve(&pki, body.clone());
    let (proxy_port, proxied) = connect_proxy();
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let dir = tempfile::tempdir().unwrap();

    // downloads.test does not resolve here: only the proxy can reach it.
    let d = Downloader::with_roots_pem(pki.ca_pem.as_bytes())
        .unwrap()
        .with_proxy(Some(&proxy), Some("localhost,.svc,10.0.0.0/8"))
        .unwrap();
    let url = format!("https://downloads.test:{}/runc", server.port);
    let path = d.fetch(&url, &hash, dir.path()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(
        *proxied.lock().unwrap(),
        vec![format!("CONNECT downloads.test:{}", server.port)]
    );
    assert_eq!(server.connections(), 1);
    std::fs::remove_file(path).unwrap();

    // A NO_PROXY host connects directly.
    let d = d.with_proxy(Some(&proxy), Some("localhost, 127.0.0.1")).unwrap();
    d.fetch(&server.url("/runc"), &hash, dir.path()).unwrap();
    assert_eq!(proxied.lock().unwrap().len(), 1, "127.0.0.1 is in NO_PROXY");
    assert_eq!(server.connections(), 2);

    // A proxy that refuses: the error says a proxy was involved.
    let url = format!("https://forbidden.test:{}/runc", server.port);
    let err = d.fetch(&url, &sha256(b"x"), dir.path()).unwrap_err();
    assert_eq!(err.label(), "download_failed", "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&url) && msg.contains(&format!("through proxy {proxy}")),
        "{msg}"
    );
}
