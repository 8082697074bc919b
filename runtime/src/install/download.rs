//! Downloading a RuntimeProfile's runtime binary onto the node.
//!
//! The file lands in a content-addressed directory as `<sha256>`, so a restarted agent finds
//! what it already fetched without any network traffic, and two profiles naming the same
//! binary share it. What ends up there is executed as root on every selected node, so:
//! - only `https` is fetched, at every redirect hop, with the node's own CA bundle as the
//!   only roots (the agent's image is `FROM scratch`; a TLS-intercepting corporate proxy is
//!   trusted exactly when the node trusts it);
//! - the sha256 is checked while streaming and the file only appears, by an atomic rename,
//!   once it matched: a wrong or truncated download leaves nothing behind;
//! - the size is capped while reading, whatever `Content-Length` said.
//!
//! The API is blocking (the agent calls it from `spawn_blocking`): `ureq` on the rustls +
//! ring stack the workspace already builds, with no system TLS library, so the static musl
//! binary keeps working.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::http::{StatusCode, Uri};
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use crate::host::HostRoot;
use crate::install::files::{hex, is_sha256_hex, sha256_file};

/// Where distributions keep the system CA bundle, in the order [`Downloader::for_host`]
/// tries them (host paths).
pub const HOST_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu
    "/etc/pki/tls/certs/ca-bundle.crt",   // RHEL, Fedora
    "/etc/ssl/ca-bundle.pem",             // SUSE
    "/etc/ssl/cert.pem",                  // Alpine, macOS-like
];

/// Enough for any OCI runtime binary (runc and crun are 10-15 MiB) while keeping a broken
/// or hostile server from filling the node's disk.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Covers a slow mirror for a runtime-sized file; a stalled connection fails instead of
/// holding an agent worker thread forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// GitHub release assets take one hop (to objects.githubusercontent.com); 5 leaves room
/// for mirrors and CDNs while a redirect loop fails fast.
pub const MAX_REDIRECTS: u32 = 5;

/// Mode of the downloaded binary: the CRI runtime executes it as root.
const BINARY_MODE: u32 = 0o755;

/// Why a download did not produce a verified file. Messages name the URL and what was
/// expected; [`DownloadError::label`] is the short code for metrics and status conditions.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url}: the expected sha256 {sha256:?} is not 64 lower-case hex digits")]
    BadSha256 { url: String, sha256: String },
    #[error("{url}: redirected to {to}, which is not https: only https downloads are allowed")]
    InsecureRedirect { url: String, to: String },
    #[error("{url}: more than {max} redirects (the last one to {last})")]
    TooManyRedirects { url: String, max: u32, last: String },
    #[error("{url}: HTTP {}{}", status_text(*status), hop_note(hop))]
    HttpStatus {
        url: String,
        status: u16,
        /// The redirect target that answered, when it is not `url`.
        hop: Option<String>,
    },
    #[error("{url}: certificate not trusted by {roots}: {reason}{}", hop_note(hop))]
    UntrustedCertificate {
        url: String,
        /// Which roots were used, e.g. `the node's CA bundle (/etc/ssl/certs/ca-certificates.crt)`.
        roots: String,
        reason: String,
        hop: Option<String>,
    },
    #[error("{url}: not finished within {}s{}", timeout.as_secs_f64(), hop_note(hop))]
    Timeout {
        url: String,
        timeout: Duration,
        hop: Option<String>,
    },
    #[error("{url}: {} the limit of {max} bytes", too_large_text(*declared))]
    TooLarge {
        url: String,
        max: u64,
        /// The `Content-Length` when that alone exceeded the limit; `None` when the body
        /// was cut off while streaming.
        declared: Option<u64>,
    },
    #[error("{url}: sha256 is {actual}, the profile expects {expected}")]
    Sha256Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: {reason}{}", hop_note(hop))]
    Failed {
        url: String,
        reason: String,
        hop: Option<String>,
    },
    #[error("no CA bundle on the host under {root}: looked for {}", HOST_CA_BUNDLES.join(", "))]
    NoCaBundle { root: PathBuf },
    #[error("CA bundle {source_name}: {reason}")]
    BadCaBundle { source_name: String, reason: String },
    #[error("proxy setting {var}={value}: {reason}")]
    BadProxy {
        var: String,
        /// The setting without any credentials it held.
        value: String,
        reason: String,
    },
    #[error("{url}: {path}: {source}")]
    Io {
        url: String,
        path: PathBuf,
        source: io::Error,
    },
}

impl DownloadError {
    /// A short, stable code per kind of failure (metric label, condition reason).
    pub fn label(&self) -> &'static str {
        match self {
            DownloadError::BadUrl { .. } => "bad_url",
            DownloadError::BadSha256 { .. } => "bad_sha256",
            DownloadError::InsecureRedirect { .. } => "insecure_redirect",
            DownloadError::TooManyRedirects { .. } => "too_many_redirects",
            DownloadError::HttpStatus { .. } => "http_status",
            DownloadError::UntrustedCertificate { .. } => "untrusted_certificate",
            DownloadError::Timeout { .. } => "download_timeout",
            DownloadError::TooLarge { .. } => "download_too_large",
            DownloadError::Sha256Mismatch { .. } => "sha256_mismatch",
            DownloadError::Failed { .. } => "download_failed",
            DownloadError::NoCaBundle { .. } => "no_ca_bundle",
            DownloadError::BadCaBundle { .. } => "bad_ca_bundle",
            DownloadError::BadProxy { .. } => "bad_proxy",
            DownloadError::Io { .. } => "write_failed",
        }
    }
}

fn status_text(status: u16) -> String {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason());
    match reason {
        Some(r) => format!("{status} {r}"),
        None => status.to_string(),
    }
}

fn hop_note(hop: &Option<String>) -> String {
    match hop {
        Some(h) => format!(" (at the redirect to {h})"),
        None => String::new(),
    }
}

fn too_large_text(declared: Option<u64>) -> String {
    match declared {
        Some(n) => format!("Content-Length {n} exceeds"),
        None => "the body exceeds".to_string(),
    }
}

/// Downloads runtime binaries over HTTPS with a fixed set of trusted roots and proxy
/// settings; built once per agent and shared by its workers.
#[derive(Clone)]
pub struct Downloader {
    tls: TlsConfig,
    /// How the roots are named in errors.
    roots: String,
    proxy: ProxyConfig,
    direct: ureq::Agent,
    proxied: Option<ureq::Agent>,
    timeout: Duration,
    max_bytes: u64,
}

impl fmt::Debug for Downloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Downloader")
            .field("roots", &self.roots)
            .field("proxy", &self.proxy.shown)
            .field("no_proxy", &self.proxy.no_proxy)
            .field("timeout", &self.timeout)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl Downloader {
    /// Trusts the CA bundle of the host: the agent's image is `FROM scratch` and has none,
    /// and the node's bundle is the one its administrators maintain (corporate CAs
    /// included). The first of [`HOST_CA_BUNDLES`] found under the host root is used,
    /// symlinks resolved inside the host (RHEL's bundle is an absolute symlink). Proxy
    /// settings come from the environment, as for [`Downloader::with_roots_pem`].
    pub fn for_host(host: &HostRoot) -> Result<Self, DownloadError> {
        for candidate in HOST_CA_BUNDLES {
            let Some(resolved) = host.resolve(Path::new(candidate)) else {
                continue;
            };
            let local = host.path(&resolved);
            if !fs::metadata(&local).is_ok_and(|m| m.is_file()) {
                continue;
            }
            let pem = fs::read(&local).map_err(|e| DownloadError::BadCaBundle {
                source_name: candidate.to_string(),
                reason: format!("cannot read {}: {e}", local.display()),
            })?;
            return Self::build(&pem, candidate, format!("the node's CA bundle ({candidate})"));
        }
        Err(DownloadError::NoCaBundle {
            root: host.root().to_path_buf(),
        })
    }

    /// Trusts exactly the certificates in `pem` (tests, and an explicitly configured CA
    /// file). Proxy settings come from `HTTPS_PROXY`/`https_proxy` and `NO_PROXY`/`no_proxy`,
    /// the variables DaemonSets in corporate networks set; [`Downloader::with_proxy`]
    /// replaces them.
    pub fn with_roots_pem(pem: &[u8]) -> Result<Self, DownloadError> {
        Self::build(pem, "(given PEM)", "the given CA certificates".to_string())
    }

    fn build(pem: &[u8], source_name: &str, roots: String) -> Result<Self, DownloadError> {
        let certs = parse_roots(pem).map_err(|reason| DownloadError::BadCaBundle {
            source_name: source_name.to_string(),
            reason,
        })?;
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::Specific(Arc::new(certs)))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let proxy = ProxyConfig::from_lookup(|var| std::env::var(var).ok())?;
        Ok(Self::assemble(tls, roots, proxy))
    }

    fn assemble(tls: TlsConfig, roots: String, proxy: ProxyConfig) -> Self {
        let direct = agent(&tls, None);
        let proxied = proxy.proxy.clone().map(|p| agent(&tls, Some(p)));
        Downloader {
            tls,
            roots,
            proxy,
            direct,
            proxied,
            timeout: DEFAULT_TIMEOUT,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    /// The whole download, redirects and body included, must finish within `d`.
    pub fn with_timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Bodies longer than `n` bytes are refused (default [`DEFAULT_MAX_BYTES`]).
    pub fn with_max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }

    /// Replaces the proxy settings read from the environment: `https_proxy` is a proxy URL
    /// (`http://host:port`, scheme optional; `None` or empty for none), `no_proxy` a
    /// `NO_PROXY` list (hosts, `.domain` suffixes, IPs, CIDRs, `*`).
    pub fn with_proxy(
        self,
        https_proxy: Option<&str>,
        no_proxy: Option<&str>,
    ) -> Result<Self, DownloadError> {
        let proxy = ProxyConfig::from_lookup(|var| match var {
            "HTTPS_PROXY" => https_proxy.map(str::to_string),
            "NO_PROXY" => no_proxy.map(str::to_string),
            _ => None,
        })?;
        let Downloader {
            tls,
            roots,
            timeout,
            max_bytes,
            ..
        } = self;
        Ok(Downloader {
            timeout,
            max_bytes,
            ..Self::assemble(tls, roots, proxy)
        })
    }

    /// Downloads `url` (https only) into `dir` (a local path, e.g. the host's
    /// `/var/lib/usernsguard/downloads` under the host root, created if missing) as
    /// `<sha256>` with mode 0755, verifying the lower-case hex `sha256` while streaming, and
    /// returns the file's path. When `dir/<sha256>` already holds content with that hash it
    /// is returned without any network traffic, so a restarted agent does not download
    /// again; a file there with other content is replaced.
    pub fn fetch(&self, url: &str, sha256: &str, dir: &Path) -> Result<PathBuf, DownloadError> {
        let start = Instant::now();
        let uri = parse_https(url).map_err(|reason| DownloadError::BadUrl {
            url: url.to_string(),
            reason,
        })?;
        if !is_sha256_hex(sha256) {
            return Err(DownloadError::BadSha256 {
                url: url.to_string(),
                sha256: sha256.to_string(),
            });
        }
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DownloadError::Io {
                url: url.to_string(),
                path,
                source,
            }
        };
        let target = dir.join(sha256);
        if existing_matches(&target, sha256).map_err(io_err(&target))? {
            tracing::debug!(url, path = %target.display(), "runtime binary already downloaded");
            return Ok(target);
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;

        let mut response = self.get_following_redirects(url, uri, start)?;
        let declared = response.body().content_length();
        if let Some(n) = declared.filter(|n| *n > self.max_bytes) {
            return Err(DownloadError::TooLarge {
                url: url.to_string(),
                max: self.max_bytes,
                declared: Some(n),
            });
        }

        // Dropped (and so removed) on every early return below.
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{sha256}."))
            .suffix(".part")
            .tempfile_in(dir)
            .map_err(io_err(dir))?;
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut reader = response.body_mut().as_reader();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.network_error(url, None, ureq::Error::from(e))),
            };
            total += n as u64;
            if total > self.max_bytes {
                return Err(DownloadError::TooLarge {
                    url: url.to_string(),
                    max: self.max_bytes,
                    declared: None,
                });
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(io_err(tmp.path()))?;
        }
        let actual = hex(hasher.finish().as_ref());
        if actual != sha256 {
            return Err(DownloadError::Sha256Mismatch {
                url: url.to_string(),
                expected: sha256.to_string(),
                actual,
            });
        }
        let file = tmp.as_file();
        file.set_permissions(fs::Permissions::from_mode(BINARY_MODE))
            .map_err(io_err(tmp.path()))?;
        file.sync_all().map_err(io_err(tmp.path()))?;
        tmp.persist(&target).map_err(|e| io_err(&target)(e.error))?;
        // The rename is durable only once the directory entry is.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
        tracing::info!(url, path = %target.display(), bytes = total, "downloaded runtime binary");
        Ok(target)
    }

    /// Follows redirects itself rather than letting ureq do it, so that every hop is held
    /// to https, matched against `NO_PROXY` on its own host, and named in errors.
    fn get_following_redirects(
        &self,
        url: &str,
        mut uri: Uri,
        start: Instant,
    ) -> Result<ureq::http::Response<ureq::Body>, DownloadError> {
        let mut redirects = 0;
        loop {
            let hop = (redirects > 0).then(|| uri.to_string());
            let remaining = self.timeout.saturating_sub(start.elapsed());
            if remaining.is_zero() {
                return Err(DownloadError::Timeout {
                    url: url.to_string(),
                    timeout: self.timeout,
                    hop,
                });
            }
            let agent = match &self.proxied {
                Some(proxied) if !self.proxy.no_proxy.bypasses(&uri) => proxied,
                _ => &self.direct,
            };
            let response = agent
                .get(uri.clone())
                .config()
                .timeout_global(Some(remaining))
                .build()
                .call()
                .map_err(|e| self.network_error(url, hop.clone(), e))?;
            let status = response.status();
            if status == StatusCode::OK {
                return Ok(response);
            }
            if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
                return Err(DownloadError::HttpStatus {
                    url: url.to_string(),
                    status: status.as_u16(),
                    hop,
                });
            }
            let location = response
                .headers()
                .get(ureq::http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| DownloadError::Failed {
                    url: url.to_string(),
                    reason: format!("HTTP {} without a Location header", status_text(status.as_u16())),
                    hop: hop.clone(),
                })?;
            let next = resolve_location(&uri, location);
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(DownloadError::TooManyRedirects {
                    url: url.to_string(),
                    max: MAX_REDIRECTS,
                    last: next,
                });
            }
            uri = match parse_https(&next) {
                Ok(u) => u,
                Err(_) if !next.to_ascii_lowercase().starts_with("https:") => {
                    return Err(DownloadError::InsecureRedirect {
                        url: url.to_string(),
                        to: next,
                    })
                }
                Err(reason) => {
                    return Err(DownloadError::Failed {
                        url: url.to_string(),
                        reason: format!("redirected to {next:?}: {reason}"),
                        hop,
                    })
                }
            };
        }
    }

    fn network_error(&self, url: &str, hop: Option<String>, e: ureq::Error) -> DownloadError {
        if let Some(cert) = certificate_error(&e) {
            return DownloadError::UntrustedCertificate {
                url: url.to_string(),
                roots: self.roots.clone(),
                reason: cert.to_string(),
                hop,
            };
        }
        if let ureq::Error::Timeout(_) = e {
            return DownloadError::Timeout {
                url: url.to_string(),
                timeout: self.timeout,
                hop,
            };
        }
        let via = match (&self.proxy.shown, &self.proxied) {
            (Some(p), Some(_)) => {
                let target = hop.as_deref().unwrap_or(url);
                match target.parse::<Uri>() {
                    Ok(u) if !self.proxy.no_proxy.bypasses(&u) => format!(" (through proxy {p})"),
                    _ => String::new(),
                }
            }
            _ => String::new(),
        };
        DownloadError::Failed {
            url: url.to_string(),
            reason: format!("{}{via}", describe(&e)),
            hop,
        }
    }
}

fn agent(tls: &TlsConfig, proxy: Option<ureq::Proxy>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .tls_config(tls.clone())
        // Explicit: ureq would otherwise read ALL_PROXY/HTTP_PROXY itself.
        .proxy(proxy)
        .max_redirects(0)
        .http_status_as_error(false)
        .user_agent(concat!("usernsguard/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

/// The certificate problem inside a ureq error, if that is what failed: handshake errors
/// arrive either as ureq's own variant or as an I/O error wrapping rustls's.
fn certificate_error(e: &ureq::Error) -> Option<&rustls::CertificateError> {
    let tls = match e {
        ureq::Error::Rustls(t) => t,
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        _ => return None,
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => Some(c),
        _ => None,
    }
}

fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::HostNotFound => "host not found".to_string(),
        ureq::Error::ConnectProxyFailed(m) => format!("proxy refused the CONNECT: {m}"),
        other => other.to_string(),
    }
}

fn existing_matches(path: &Path, sha256: &str) -> io::Result<bool> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    if sha256_file(path)? != sha256 {
        tracing::warn!(path = %path.display(), "downloaded file does not match its name's sha256; downloading again");
        return Ok(false);
    }
    if fs::metadata(path)?.permissions().mode() & 0o7777 != BINARY_MODE {
        fs::set_permissions(path, fs::Permissions::from_mode(BINARY_MODE))?;
    }
    Ok(true)
}

fn parse_roots(pem: &[u8]) -> Result<Vec<Certificate<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        let der = item.map_err(|e| format!("not a PEM certificate list: {e}"))?;
        certs.push(Certificate::from_der(der.as_ref()).to_owned());
    }
    // Rejects what rustls would silently skip, so an empty trust store is an error here
    // rather than every download failing as untrusted.
    let mut store = rustls::RootCertStore::empty();
    let (added, _ignored) =
        store.add_parsable_certificates(certs.iter().map(|c| CertificateDer::from(c.der().to_vec())));
    if added == 0 {
        return Err("holds no usable CA certificate".to_string());
    }
    Ok(certs)
}

fn parse_https(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("https") => {}
        Some(s) => {
            return Err(format!(
                "only https URLs are downloaded (the binary runs as root on the node), not {s}"
            ))
        }
        None => return Err("not an absolute https URL".to_string()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_string());
    }
    Ok(uri)
}

/// Resolves a `Location` header against the URL that sent it (RFC 3986 reference forms,
/// without dot-segment removal: servers send absolute URLs or absolute paths in practice).
fn resolve_location(base: &Uri, location: &str) -> String {
    let location = location.trim();
    let has_scheme = location.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    if has_scheme {
        location.to_string()
    } else if location.starts_with("//") {
        format!("{scheme}:{location}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else if location.starts_with('?') {
        format!("{scheme}://{authority}{}{location}", base.path())
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        format!("{scheme}://{authority}{dir}{location}")
    }
}

/// The proxy for https URLs and the hosts that bypass it.
#[derive(Clone, Debug, Default)]
struct ProxyConfig {
    proxy: Option<ureq::Proxy>,
    /// The proxy URL without credentials, for messages.
    shown: Option<String>,
    no_proxy: NoProxy,
}

impl ProxyConfig {
    /// Reads the variables Go programs (and so most of Kubernetes) honour for https URLs:
    /// `HTTPS_PROXY`, `https_proxy`, `NO_PROXY`, `no_proxy`; the first non-empty one wins.
    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<ProxyConfig, DownloadError> {
        let first = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find_map(|n| get(n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
        };
        let no_proxy = first(["NO_PROXY", "no_proxy"])
            .map(|(_, v)| NoProxy::parse(&v))
            .unwrap_or_default();
        let Some((var, value)) = first(["HTTPS_PROXY", "https_proxy"]) else {
            return Ok(ProxyConfig {
                no_proxy,
                ..ProxyConfig::default()
            });
        };
        let value = value.trim();
        let bad = |reason: &str| DownloadError::BadProxy {
            var: var.to_string(),
            value: redact(value),
            reason: reason.to_string(),
        };
        let proxy = ureq::Proxy::new(value).map_err(|e| bad(&e.to_string()))?;
        if !matches!(
            proxy.protocol(),
            ureq::ProxyProtocol::Http | ureq::ProxyProtocol::Https
        ) {
            return Err(bad("only http:// and https:// (CONNECT) proxies are supported"));
        }
        let shown = format!(
            "{}://{}:{}",
            proxy.protocol().to_string().to_ascii_lowercase(),
            proxy.host(),
            proxy.port()
        );
        Ok(ProxyConfig {
            proxy: Some(proxy),
            shown: Some(shown),
            no_proxy,
        })
    }
}

/// A proxy URL with any `user:password@` removed.
fn redact(value: &str) -> String {
    let (scheme, rest) = match value.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), value),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => value.to_string(),
    }
}

/// `NO_PROXY` as curl and Go read it: comma-separated; `*` for everything; an IP or CIDR
/// matches IP hosts; a domain, with or without a leading `.` or `*.`, matches itself and
/// its subdomains; an entry with `:port` matches that port only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NoProxy {
    entries: Vec<NoProxyEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum NoProxyEntry {
    All,
    Cidr(IpAddr, u8),
    Domain(String, Option<u16>),
    Ip(IpAddr, Option<u16>),
}

impl NoProxy {
    fn parse(list: &str) -> NoProxy {
        let entries = list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .filter_map(NoProxyEntry::parse)
            .collect();
        NoProxy { entries }
    }

    fn bypasses(&self, uri: &Uri) -> bool {
        let Some(host) = uri.host() else { return false };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(443);
        let ip: Option<IpAddr> = host.parse().ok();
        self.entries.iter().any(|entry| match entry {
            NoProxyEntry::All => true,
            NoProxyEntry::Cidr(net, bits) => ip.is_some_and(|ip| in_cidr(ip, *net, *bits)),
            NoProxyEntry::Ip(addr, p) => ip == Some(*addr) && p.is_none_or(|p| p == port),
            NoProxyEntry::Domain(d, p) => {
                (host == *d || host.ends_with(&format!(".{d}"))) && p.is_none_or(|p| p == port)
            }
        })
    }
}

impl NoProxyEntry {
    fn parse(entry: &str) -> Option<NoProxyEntry> {
        if entry == "*" {
            return Some(NoProxyEntry::All);
        }
        if let Some((net, bits)) = entry.split_once('/') {
            let net: IpAddr = net.parse().ok()?;
            let bits: u8 = bits.parse().ok()?;
            let max = if net.is_ipv4() { 32 } else { 128 };
            return (bits <= max).then_some(NoProxyEntry::Cidr(net, bits));
        }
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return Some(NoProxyEntry::Ip(ip, None));
        }
        // `[v6]:port`, `[v6]`, `host:port`, `host`.
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (h, after) = rest.split_once(']')?;
            (h, after.strip_prefix(':'))
        } else {
            match entry.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (entry, None),
            }
        };
        let port = match port {
            Some(p) => Some(p.parse::<u16>().ok()?),
            None => None,
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Some(NoProxyEntry::Ip(ip, port));
        }
        let domain = host
            .trim_start_matches('*')
            .trim_start_matches('.')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        (!domain.is_empty()).then_some(NoProxyEntry::Domain(domain, port))
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (ip, net, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        (IpAddr::V6(a), IpAddr::V4(b)) => match a.to_ipv4_mapped() {
            Some(a) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            None => return false,
        },
        (IpAddr::V4(_), IpAddr::V6(_)) => return false,
    };
    if bits == 0 {
        return true;
    }
    let shift = width - u32::from(bits);
    (ip >> shift) == (net >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn no_proxy_matches_like_curl_and_go() {
        let np = NoProxy::parse(
            " localhost, .svc ,cluster.local,*.corp.example, 10.0.0.0/8, 192.168.1.5, \
             mirror.example:8443, [fd00::1], fd01::/16, ,bad/99",
        );
        for yes in [
            "https://localhost/x",
            "https://api.svc/x",
            "https://svc/x",
            "https://kubernetes.default.svc.cluster.local/",
            "https://a.corp.example/",
            "https://corp.example/",
            "https://10.3.4.5/",
            "https://192.168.1.5:8443/",
            "https://mirror.example:8443/",
            "https://[fd00::1]/",
            "https://[fd01::7]/",
            "https://LOCALHOST./",
        ] {
            assert!(np.bypasses(&uri(yes)), "{yes} should bypass the proxy");
        }
        for no in [
            "https://github.com/x",
            "https://notsvc/",
            "https://mylocalhost/",
            "https://11.0.0.1/",
            "https://192.168.1.6/",
            "https://mirror.example/",
            "https://[fd02::1]/",
        ] {
            assert!(!np.bypasses(&uri(no)), "{no} should go through the proxy");
        }
        assert!(NoProxy::parse("*").bypasses(&uri("https://github.com/")));
        assert!(!NoProxy::parse("").bypasses(&uri("https://github.com/")));
    }

    #[test]
    fn proxy_settings_come_from_https_variables_only() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let none =
            ProxyConfig::from_lookup(env(&[("HTTP_PROXY", "http://p:1"), ("ALL_PROXY", "http://p:2")]))
                .unwrap();
        assert!(
            none.proxy.is_none(),
            "http_proxy is for http URLs, which are never fetched"
        );

        let upper = ProxyConfig::from_lookup(env(&[
            ("HTTPS_PROXY", "http://user:secret@proxy.corp:3128"),
            ("https_proxy", "http://other:1"),
            ("no_proxy", ".svc"),
        ]))
        .unwrap();
        assert_eq!(upper.shown.as_deref(), Some("http://proxy.corp:3128"));
        assert!(upper.no_proxy.bypasses(&uri("https://x.svc/")));

        let lower =
            ProxyConfig::from_lookup(env(&[("HTTPS_PROXY", " "), ("https_proxy", "proxy:8080")])).unwrap();
        assert_eq!(lower.shown.as_deref(), Some("http://proxy:8080"));

        let socks = ProxyConfig::from_lookup(env(&[("HTTPS_PROXY", "socks5://u:pw@s:1080")])).unwrap_err();
        assert_eq!(socks.label(), "bad_proxy");
        let msg = socks.to_string();
        assert!(msg.contains("HTTPS_PROXY=socks5://***@s:1080"), "{msg}");
        assert!(!msg.contains("pw"), "{msg}");
    }

    #[test]
    fn locations_resolve_against_the_redirecting_url() {
        let base = uri("https://github.com/o/r/releases/download/v1/runc.amd64?x=1");
        for (loc, want) in [
            ("https://objects.example/a?b=c", "https://objects.example/a?b=c"),
            ("http://insecure.example/a", "http://insecure.example/a"),
            ("//cdn.example/a", "https://cdn.example/a"),
            ("/other/path", "https://github.com/other/path"),
            (
                "runc.arm64",
                "https://github.com/o/r/releases/download/v1/runc.arm64",
            ),
            (
                "?y=2",
                "https://github.com/o/r/releases/download/v1/runc.amd64?y=2",
            ),
        ] {
            assert_eq!(resolve_location(&base, loc), want, "{loc}");
        }
    }

    #[test]
    fn urls_must_be_https_with_a_host() {
        assert!(parse_https("https://example.com/runc").is_ok());
        assert!(parse_https("HTTPS://example.com/runc").is_ok());
        for bad in [
            "http://example.com/runc",
            "ftp://x/y",
            "example.com/runc",
            "https:///x",
            "",
        ] {
            assert!(parse_https(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_downloader_serves_every_worker_thread() {
        fn shared<T: Send + Sync + Clone>() {}
        shared::<Downloader>();
    }

    #[test]
    fn every_error_has_a_distinct_label() {
        let url = || "https://x/runc".to_string();
        let io = || io::Error::other("boom");
        let all = [
            DownloadError::BadUrl {
                url: url(),
                reason: String::new(),
            },
            DownloadError::BadSha256 {
                url: url(),
                sha256: String::new(),
            },
            DownloadError::InsecureRedirect {
                url: url(),
                to: String::new(),
            },
            DownloadError::TooManyRedirects {
                url: url(),
                max: 5,
                last: String::new(),
            },
            DownloadError::HttpStatus {
                url: url(),
                status: 404,
                hop: None,
            },
            DownloadError::UntrustedCertificate {
                url: url(),
                roots: String::new(),
                reason: String::new(),
                hop: None,
            },
            DownloadError::Timeout {
                url: url(),
                timeout: Duration::from_secs(1),
                hop: None,
            },
            DownloadError::TooLarge {
                url: url(),
                max: 1,
                declared: None,
            },
            DownloadError::Sha256Mismatch {
                url: url(),
                expected: String::new(),
                actual: String::new(),
            },
            DownloadError::Failed {
                url: url(),
                reason: String::new(),
                hop: None,
            },
            DownloadError::NoCaBundle { root: PathBuf::new() },
            DownloadError::BadCaBundle {
                source_name: String::new(),
                reason: String::new(),
            },
            DownloadError::BadProxy {
                var: String::new(),
                value: String::new(),
                reason: String::new(),
            },
            DownloadError::Io {
                url: url(),
                path: PathBuf::new(),
                source: io(),
            },
        ];
        let mut labels: Vec<_> = all.iter().map(DownloadError::label).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), all.len());
        assert_eq!(
            DownloadError::HttpStatus {
                url: url(),
                status: 404,
                hop: None
            }
            .to_string(),
            "https://x/runc: HTTP 404 Not Found"
        );
    }
}
