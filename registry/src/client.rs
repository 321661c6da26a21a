//! The registry client: resolve references, download blobs.

use crate::auth::{base64, parse_challenges};
use crate::config::{RegistriesConfig, RegistryConfig};
use crate::error::Error;
use crate::http::{self, encode_query, Response, Url};
use crate::manifest::{self, media, Descriptor, Doc};
use crate::platform::Platform;
use crate::rate::RateLimiter;
use sha2::{Digest, Sha256};
use skiff_common::ImageRef;
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::time::Instant;

/// Manifests larger than this are refused (the distribution spec suggests 4 MiB).
const MAX_MANIFEST: usize = 4 * 1024 * 1024;
const MAX_REDIRECTS: u32 = 5;

/// How transient failures (link cuts, stalls, 5xx) are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// First backoff delay; doubles per failure up to `max_delay`. Each sleep is
    /// drawn uniformly from [delay/2, delay] (jitter).
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// How long to keep retrying without progress: a download that received
    /// bytes since the last failure starts a new budget (and the delay resets).
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            budget: Duration::from_secs(600),
        }
    }
}

/// Everything a [`Client`] is configured with.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub registries: RegistriesConfig,
    /// Shared download cap; `None` for no cap.
    pub rate: Option<RateLimiter>,
    /// A connection that brings no byte for this long is dropped and retried.
    pub stall_timeout: Duration,
    pub connect_timeout: Duration,
    pub retry: RetryPolicy,
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            registries: RegistriesConfig::default(),
            rate: None,
            stall_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            user_agent: concat!("skiff/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// A reference resolved for one platform. `manifest` holds the image manifest's
/// bytes, verified against `digest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// `sha256:` digest of the image manifest (for this platform).
    pub digest: String,
    /// The manifest's media type (OCI or Docker v2).
    pub media_type: String,
    pub manifest: Vec<u8>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// The digest the reference itself names: the index's when it is multi-arch,
    /// else the same as `digest`. This is what `resolve_digest` returns.
    pub top_digest: String,
}

/// A registry client. Cheap to clone: clones share bearer tokens and TLS settings.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    opts: ClientOptions,
    /// Bearer tokens by `registry/repository`, reused until a 401.
    tokens: Mutex<HashMap<String, String>>,
    /// Registries that asked for Basic auth: credentials are sent up front.
    basic: Mutex<HashMap<String, bool>>,
    /// rustls settings by registry host (system roots plus the registry's `ca`).
    tls: Mutex<HashMap<String, Arc<rustls::ClientConfig>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("options", &self.inner.opts).finish_non_exhaustive()
    }
}

/// Names the registry and the reference in errors.
struct Ctx<'a> {
    r: &'a ImageRef,
}

impl Ctx<'_> {
    fn registry(&self) -> String {
        self.r.registry().to_string()
    }
    fn reference(&self) -> String {
        self.r.to_string()
    }
    fn transfer(&self, what: &str, e: io::Error) -> Error {
        Error::Transfer {
            registry: self.registry(),
            reference: self.reference(),
            msg: format!("{what}: {e}"),
        }
    }
    fn protocol(&self, msg: impl Into<String>) -> Error {
        Error::Protocol { registry: self.registry(), reference: self.reference(), msg: msg.into() }
    }
    fn status(&self, status: u16, what: &str) -> Error {
        let (registry, reference) = (self.registry(), self.reference());
        match status {
            404 => Error::NotFound { registry, reference, what: what.into() },
            401 => Error::Unauthorized { registry, reference, detail: format!("HTTP 401 for {what}") },
            403 => Error::Unauthorized {
                registry,
                reference,
                detail: format!("access denied (HTTP 403) for {what}"),
            },
            _ => Error::Status { registry, reference, status, what: what.into() },
        }
    }
}

enum Auth {
    None,
    Basic(String),
    Bearer(String),
}

impl Client {
    pub fn new(opts: ClientOptions) -> Client {
        Client {
            inner: Arc::new(Inner {
                opts,
                tokens: Mutex::new(HashMap::new()),
                basic: Mutex::new(HashMap::new()),
                tls: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    /// Fetches `r`'s manifest, verifies it, and when it is an index picks the image
    /// for `platform` and fetches and verifies that manifest too.
    pub async fn resolve(&self, r: &ImageRef, platform: &Platform) -> Result<Resolved, Error> {
        let ctx = Ctx { r };
        let (top, top_digest, ct) =
            self.retrying(r, || self.get_manifest(r, r.manifest_reference(), None)).await?;
        let (media_type, doc) = manifest::parse(&top, ct.as_deref()).map_err(|m| ctx.protocol(m))?;
        let entries = match doc {
            Doc::Manifest { config, layers } => {
                return Ok(Resolved {
                    digest: top_digest.clone(),
                    media_type,
                    manifest: top,
                    config,
                    layers,
                    top_digest,
                });
            }
            Doc::Index(entries) => entries,
        };
        let entry = manifest::pick(&entries, platform).ok_or_else(|| Error::NoPlatform {
            registry: ctx.registry(),
            reference: ctx.reference(),
            platform: platform.to_string(),
            available: manifest::platforms(&entries),
        })?;
        let (bytes, digest, ct) =
            self.retrying(r, || self.get_manifest(r, &entry.digest, Some(entry.size))).await?;
        let (media_type, doc) = manifest::parse(&bytes, ct.as_deref().or(Some(&entry.media_type)))
            .map_err(|m| ctx.protocol(m))?;
        match doc {
            Doc::Manifest { config, layers } => {
                Ok(Resolved { digest, media_type, manifest: bytes, config, layers, top_digest })
            }
            Doc::Index(_) => {
                Err(ctx.protocol(format!("index entry {} for {platform} is an index itself", entry.digest)))
            }
        }
    }

    /// The digest `r` names (the index's for a multi-arch image), verified.
    pub async fn resolve_digest(&self, r: &ImageRef) -> Result<String, Error> {
        let (_, digest, _) = self.retrying(r, || self.get_manifest(r, r.manifest_reference(), None)).await?;
        Ok(digest)
    }

    /// Downloads blob `desc` of `r` into `partial`, resuming from the bytes already
    /// there (`Range: bytes=N-`; a 200 answer starts over). The existing prefix is
    /// hashed with the rest. Link cuts and stalls (`stall_timeout`) are retried with
    /// capped, jittered backoff within the retry budget. On success the file holds
    /// exactly the blob, verified and fsynced. When the finished content does not
    /// match the digest the file is deleted and `DigestMismatch` returned; a
    /// partial file longer than the blob is discarded and downloaded again.
    /// `progress` gets the bytes on disk so far (prefix included) as they grow.
    pub async fn fetch_blob(
        &self,
        r: &ImageRef,
        desc: &Descriptor,
        partial: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), Error> {
        let ctx = Ctx { r };
        manifest::check_digest(&desc.digest).map_err(|m| ctx.protocol(m))?;
        let io_err = |e| Error::io(partial, e);
        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(partial)
            .await
            .map_err(io_err)?;
        let mut len = file.metadata().await.map_err(io_err)?.len();
        let mut hasher = Sha256::new();
        if len > desc.size {
            tracing::warn!(file = %partial.display(), len, size = desc.size, "partial blob longer than the blob: starting over");
            file.set_len(0).await.map_err(io_err)?;
            len = 0;
        }
        if len > 0 {
            file.seek(io::SeekFrom::Start(0)).await.map_err(io_err)?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let n = file.read(&mut buf[..want]).await.map_err(io_err)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
            if left > 0 {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while hashing",
                )));
            }
        }
        file.seek(io::SeekFrom::Start(len)).await.map_err(io_err)?;
        progress(len);
        let mut state = Download { file, hasher, len };

        let policy = &self.inner.opts.retry;
        let mut delay = policy.initial_delay;
        let mut deadline = Instant::now() + policy.budget;
        let mut attempts: u32 = 0;
        while state.len < desc.size {
            let before = state.len;
            let res = self.fetch_once(&ctx, desc, partial, &mut state, progress).await;
            attempts = attempts.saturating_add(1);
            match res {
                Ok(()) => {}
                Err(e) if e.is_transient() => {
                    if state.len > before {
                        delay = policy.initial_delay;
                        deadline = Instant::now() + policy.budget;
                    }
                    let sleep = jitter(delay);
                    if Instant::now() + sleep > deadline {
                        return Err(Error::RetriesExhausted { attempts, last: Box::new(e) });
                    }
                    tracing::warn!(error = %e, retry_in_ms = sleep.as_millis() as u64, done = state.len, size = desc.size, "blob download interrupted");
                    tokio::time::sleep(sleep).await;
                    delay = delay.saturating_mul(2).min(policy.max_delay);
                }
                Err(e) => return Err(e),
            }
        }
        let Download { mut file, hasher, len } = state;
        file.flush().await.map_err(io_err)?;
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != desc.digest || len != desc.size {
            drop(file);
            let _ = tokio::fs::remove_file(partial).await;
            return Err(Error::DigestMismatch {
                registry: ctx.registry(),
                reference: ctx.reference(),
                what: format!("blob {}", short(&desc.digest)),
                expected: desc.digest.clone(),
                actual,
            });
        }
        file.sync_all().await.map_err(io_err)?;
        Ok(())
    }

    /// One GET of the rest of the blob, appending to the file. Returns when the
    /// file holds `desc.size` bytes, or on the first error.
    async fn fetch_once(
        &self,
        ctx: &Ctx<'_>,
        desc: &Descriptor,
        partial: &Path,
        st: &mut Download,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), Error> {
        let io_err = |e| Error::io(partial, e);
        let what = format!("blob {}", short(&desc.digest));
        let path = format!("/v2/{}/blobs/{}", ctx.r.repository(), desc.digest);
        let mut extra = Vec::new();
        if st.len > 0 {
            extra.push(("Range", format!("bytes={}-", st.len)));
        }
        let mut resp = self.request(ctx, &path, "GET", &extra, &what).await?;
        match resp.status {
            206 => {
                let cr =
                    resp.header("content-range").ok_or_else(|| ctx.protocol("206 without Content-Range"))?;
                let (start, total) = parse_content_range(cr)
                    .ok_or_else(|| ctx.protocol(format!("bad Content-Range {cr:?}")))?;
                if start != st.len {
                    return Err(ctx.protocol(format!("asked for bytes from {}, got from {start}", st.len)));
                }
                if total.is_some_and(|t| t != desc.size) {
                    return Err(ctx.protocol(format!(
                        "{what}: registry says {} bytes, manifest {}",
                        total.unwrap_or(0),
                        desc.size
                    )));
                }
            }
            200 => {
                if st.len > 0 {
                    tracing::info!(%what, had = st.len, "registry ignored the Range request: starting over");
                    st.file.set_len(0).await.map_err(io_err)?;
                    st.file.seek(io::SeekFrom::Start(0)).await.map_err(io_err)?;
                    st.hasher = Sha256::new();
                    st.len = 0;
                    progress(0);
                }
            }
            416 => {
                // The registry has fewer bytes than the file: start over next time.
                st.file.set_len(0).await.map_err(io_err)?;
                st.file.seek(io::SeekFrom::Start(0)).await.map_err(io_err)?;
                st.hasher = Sha256::new();
                st.len = 0;
                return Err(Error::Transfer {
                    registry: ctx.registry(),
                    reference: ctx.reference(),
                    msg: format!("{what}: range not satisfiable, starting over"),
                });
            }
            s => return Err(ctx.status(s, &what)),
        }
        let stall = self.inner.opts.stall_timeout;
        let rate = self.inner.opts.rate.clone();
        let chunk = match &rate {
            Some(r) => usize::try_from(r.rate() / 8).unwrap_or(usize::MAX).clamp(1024, 64 * 1024),
            None => 64 * 1024,
        };
        let mut buf = vec![0u8; chunk];
        while st.len < desc.size {
            let want = usize::try_from(desc.size - st.len).unwrap_or(usize::MAX).min(buf.len());
            let n = match tokio::time::timeout(stall, resp.read(&mut buf[..want])).await {
                Err(_) => {
                    return Err(Error::Stalled {
                        registry: ctx.registry(),
                        reference: ctx.reference(),
                        what: what.clone(),
                        ms: u64::try_from(stall.as_millis()).unwrap_or(u64::MAX),
                    })
                }
                Ok(Err(e)) => return Err(ctx.transfer(&what, e)),
                Ok(Ok(0)) => {
                    return Err(Error::Transfer {
                        registry: ctx.registry(),
                        reference: ctx.reference(),
                        msg: format!("{what}: body ended at {} of {} bytes", st.len, desc.size),
                    })
                }
                Ok(Ok(n)) => n,
            };
            if let Some(r) = &rate {
                r.acquire(n as u64).await;
            }
            st.file.write_all(&buf[..n]).await.map_err(io_err)?;
            st.hasher.update(&buf[..n]);
            st.len += n as u64;
            progress(st.len);
        }
        Ok(())
    }

    /// Retries `f` on transient errors within the retry budget.
    async fn retrying<T, F, Fut>(&self, r: &ImageRef, f: F) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let policy = &self.inner.opts.retry;
        let deadline = Instant::now() + policy.budget;
        let mut delay = policy.initial_delay;
        let mut attempts: u32 = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() => {
                    attempts = attempts.saturating_add(1);
                    let sleep = jitter(delay);
                    if Instant::now() + sleep > deadline {
                        return Err(Error::RetriesExhausted { attempts, last: Box::new(e) });
                    }
                    tracing::warn!(reference = %r, error = %e, retry_in_ms = sleep.as_millis() as u64, "registry request failed");
                    tokio::time::sleep(sleep).await;
                    delay = delay.saturating_mul(2).min(policy.max_delay);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// GETs a manifest by tag or digest and verifies it: against `reference` when
    /// that is a digest (and `size` when given), else against the registry's
    /// Docker-Content-Digest header when it sends one. Returns the bytes, their
    /// digest and the Content-Type.
    async fn get_manifest(
        &self,
        r: &ImageRef,
        reference: &str,
        size: Option<u64>,
    ) -> Result<(Vec<u8>, String, Option<String>), Error> {
        let ctx = Ctx { r };
        let what = format!("manifest {}", short(reference));
        let path = format!("/v2/{}/manifests/{reference}", r.repository());
        let mut resp =
            self.request(&ctx, &path, "GET", &[("Accept", media::ACCEPT.to_string())], &what).await?;
        if resp.status != 200 {
            return Err(ctx.status(resp.status, &what));
        }
        let limit =
            size.map_or(MAX_MANIFEST, |s| usize::try_from(s).unwrap_or(MAX_MANIFEST).min(MAX_MANIFEST));
        let bytes = resp.bytes(limit, self.inner.opts.stall_timeout).await.map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                ctx.protocol(format!("{what}: {e}"))
            } else {
                ctx.transfer(&what, e)
            }
        })?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_string())
        } else {
            resp.header("docker-content-digest").filter(|d| d.starts_with("sha256:")).map(str::to_string)
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(Error::DigestMismatch {
                    registry: ctx.registry(),
                    reference: ctx.reference(),
                    what,
                    expected,
                    actual: digest,
                });
            }
        }
        if size.is_some_and(|s| s != bytes.len() as u64) {
            return Err(ctx.protocol(format!(
                "{what}: {} bytes, index says {}",
                bytes.len(),
                size.unwrap_or(0)
            )));
        }
        let ct = resp.header("content-type").map(str::to_string);
        Ok((bytes, digest, ct))
    }

    fn registry_config(&self, host: &str) -> Option<&RegistryConfig> {
        self.inner.opts.registries.get(host)
    }

    /// The API endpoint of a registry.
    fn base_url(&self, registry: &str) -> Result<Url, Error> {
        let insecure = self.registry_config(registry).is_some_and(|c| c.insecure);
        let host = if registry == skiff_common::name::DOCKER_HUB { "registry-1.docker.io" } else { registry };
        let scheme = if insecure { "http" } else { "https" };
        Url::parse(&format!("{scheme}://{host}/")).ok_or_else(|| Error::Protocol {
            registry: registry.into(),
            reference: String::new(),
            msg: "not a valid host[:port]".into(),
        })
    }

    fn tls_for(&self, registry: &str) -> Result<Arc<rustls::ClientConfig>, Error> {
        let mut cache = self.inner.tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(registry) {
            return Ok(c.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if let Some(ca) = self.registry_config(registry).and_then(|c| c.ca.clone()) {
            let pem = std::fs::read(&ca).map_err(|e| Error::io(&ca, e))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| Error::io(&ca, e))?;
                roots.add(cert).map_err(|e| Error::Config {
                    path: ca.clone(),
                    msg: format!("bad CA certificate: {e}"),
                })?;
                n += 1;
            }
            if n == 0 {
                return Err(Error::Config { path: ca, msg: "no PEM certificate in the file".into() });
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Protocol {
                registry: registry.into(),
                reference: String::new(),
                msg: format!("TLS: {e}"),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let config = Arc::new(config);
        cache.insert(registry.to_string(), config.clone());
        Ok(config)
    }

    /// Sends a request to `r`'s registry with the right credentials, following
    /// redirects and answering one authentication challenge. Any status is returned
    /// except a 401 that remains after authenticating.
    async fn request(
        &self,
        ctx: &Ctx<'_>,
        path: &str,
        method: &str,
        extra: &[(&str, String)],
        what: &str,
    ) -> Result<Response, Error> {
        let registry = ctx.r.registry();
        let scope_key = format!("{registry}/{}", ctx.r.repository());
        let mut retried_auth = false;
        loop {
            let auth = self.auth_for(registry, &scope_key);
            let resp = self.send_following(ctx, path, method, extra, &auth, what).await?;
            if resp.status != 401 {
                return Ok(resp);
            }
            let sent_credentials = !matches!(auth, Auth::None);
            if retried_auth {
                let detail = if sent_credentials {
                    format!("credentials refused for {what}")
                } else {
                    format!("{what} needs credentials")
                };
                return Err(Error::Unauthorized {
                    registry: ctx.registry(),
                    reference: ctx.reference(),
                    detail,
                });
            }
            retried_auth = true;
            self.lock_tokens().remove(&scope_key);
            let challenges = resp.header("www-authenticate").map(parse_challenges).unwrap_or_default();
            drop(resp);
            let cfg = self.registry_config(registry);
            if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
                let token = self.fetch_token(ctx, bearer, cfg).await?;
                self.lock_tokens().insert(scope_key.clone(), token);
            } else if challenges.iter().any(|c| c.scheme == "basic") {
                if cfg.and_then(|c| c.username.as_ref()).is_none() {
                    return Err(Error::Unauthorized {
                        registry: ctx.registry(),
                        reference: ctx.reference(),
                        detail: format!(
                            "the registry asks for a username and password; none configured for {registry}"
                        ),
                    });
                }
                self.inner.basic.lock().unwrap_or_else(|p| p.into_inner()).insert(registry.to_string(), true);
            } else {
                return Err(Error::Unauthorized {
                    registry: ctx.registry(),
                    reference: ctx.reference(),
                    detail: "HTTP 401 without a Basic or Bearer challenge".into(),
                });
            }
        }
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.inner.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn auth_for(&self, registry: &str, scope_key: &str) -> Auth {
        if let Some(t) = self.lock_tokens().get(scope_key) {
            return Auth::Bearer(t.clone());
        }
        let cfg = self.registry_config(registry);
        if let Some(t) = cfg.and_then(|c| c.token.as_ref()) {
            return Auth::Bearer(t.expose().to_string());
        }
        let basic = self.inner.basic.lock().unwrap_or_else(|p| p.into_inner()).contains_key(registry);
        match (basic, basic_credentials(cfg)) {
            (true, Some(b)) => Auth::Basic(b),
            _ => Auth::None,
        }
    }

    /// Asks a bearer challenge's realm for a pull token.
    async fn fetch_token(
        &self,
        ctx: &Ctx<'_>,
        ch: &crate::auth::Challenge,
        cfg: Option<&RegistryConfig>,
    ) -> Result<String, Error> {
        let realm = ch.params.get("realm").ok_or_else(|| ctx.protocol("bearer challenge without realm"))?;
        let mut url = Url::parse(realm).ok_or_else(|| ctx.protocol("bearer realm is not an http(s) URL"))?;
        let insecure = cfg.is_some_and(|c| c.insecure);
        if !url.https && !insecure {
            return Err(Error::NotInsecure { registry: ctx.registry() });
        }
        let scope = ch
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", ctx.r.repository()));
        let mut query = vec![format!("scope={}", encode_query(&scope))];
        if let Some(service) = ch.params.get("service") {
            query.push(format!("service={}", encode_query(service)));
        }
        let sep = if url.path.contains('?') { '&' } else { '?' };
        url.path = format!("{}{sep}{}", url.path, query.join("&"));
        let mut headers = vec![("User-Agent", self.inner.opts.user_agent.clone())];
        if let Some(b) = basic_credentials(cfg) {
            headers.push(("Authorization", format!("Basic {b}")));
        }
        let tls = if url.https { Some(self.tls_for(ctx.r.registry())?) } else { None };
        let timeout = self.inner.opts.connect_timeout.max(self.inner.opts.stall_timeout);
        let what = "the token service";
        let mut resp = http::send(tls, &url, "GET", &headers, timeout).await.map_err(|e| Error::Connect {
            registry: ctx.registry(),
            reference: ctx.reference(),
            msg: format!("{what} {url}: {e}"),
        })?;
        if resp.status == 401 || resp.status == 403 {
            let detail = if cfg.and_then(|c| c.username.as_ref()).is_some() {
                format!("{what} {url} refused the credentials (HTTP {})", resp.status)
            } else {
                format!(
                    "{what} {url} refused an anonymous token (HTTP {}); no credentials configured",
                    resp.status
                )
            };
            return Err(Error::Unauthorized { registry: ctx.registry(), reference: ctx.reference(), detail });
        }
        if resp.status != 200 {
            return Err(ctx.status(resp.status, what));
        }
        let body = resp
            .bytes(1024 * 1024, self.inner.opts.stall_timeout)
            .await
            .map_err(|e| ctx.transfer(what, e))?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| ctx.protocol(format!("{what} did not answer a JSON token")))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ctx.protocol(format!("{what} answered no token")))
    }

    /// Sends, following up to 5 redirects. Credentials go only to the registry's
    /// own host; an https URL never redirects to http.
    async fn send_following(
        &self,
        ctx: &Ctx<'_>,
        path: &str,
        method: &str,
        extra: &[(&str, String)],
        auth: &Auth,
        what: &str,
    ) -> Result<Response, Error> {
        let registry = ctx.r.registry();
        let base = self.base_url(registry)?;
        let mut url = base.join(path).ok_or_else(|| ctx.protocol("bad request path"))?;
        let timeout = self.inner.opts.connect_timeout.max(self.inner.opts.stall_timeout);
        for _ in 0..=MAX_REDIRECTS {
            let mut headers: Vec<(&str, String)> = vec![("User-Agent", self.inner.opts.user_agent.clone())];
            headers.extend(extra.iter().cloned());
            let same_host = url.host == base.host && url.port == base.port;
            if same_host {
                match auth {
                    Auth::None => {}
                    Auth::Basic(b) => headers.push(("Authorization", format!("Basic {b}"))),
                    Auth::Bearer(t) => headers.push(("Authorization", format!("Bearer {t}"))),
                }
            }
            let tls = if url.https { Some(self.tls_for(registry)?) } else { None };
            let resp = http::send(tls, &url, method, &headers, timeout).await.map_err(|e| {
                if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::UnexpectedEof {
                    Error::Transfer {
                        registry: ctx.registry(),
                        reference: ctx.reference(),
                        msg: format!("{what}: {url}: {e}"),
                    }
                } else {
                    Error::Connect {
                        registry: ctx.registry(),
                        reference: ctx.reference(),
                        msg: format!("{url}: {e}"),
                    }
                }
            })?;
            if !matches!(resp.status, 301 | 302 | 303 | 307 | 308) {
                return Ok(resp);
            }
            let loc = resp
                .header("location")
                .ok_or_else(|| ctx.protocol(format!("redirect without Location for {what}")))?;
            let next = url.join(loc).ok_or_else(|| ctx.protocol(format!("bad redirect for {what}")))?;
            if url.https && !next.https {
                return Err(ctx.protocol(format!("{what}: refusing a redirect from https to http")));
            }
            url = next;
        }
        Err(ctx.protocol(format!("too many redirects for {what}")))
    }
}

struct Download {
    file: tokio::fs::File,
    hasher: Sha256,
    len: u64,
}

fn basic_credentials(cfg: Option<&RegistryConfig>) -> Option<String> {
    let cfg = cfg?;
    let user = cfg.username.as_ref()?;
    let pass = cfg.password.as_ref().map(|p| p.expose()).unwrap_or("");
    Some(base64(format!("{user}:{pass}").as_bytes()))
}

/// `bytes START-END/TOTAL` -> (START, TOTAL) (`*` total -> None).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, total))
}

/// A sleep drawn uniformly from [d/2, d].
fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    let half = d / 2;
    let extra = rand::thread_rng().gen_range(0..=half.as_millis().min(u64::MAX as u128) as u64);
    half + Duration::from_millis(extra)
}

/// `sha256:0123456789ab` for messages.
fn short(d: &str) -> &str {
    d.get(..19).unwrap_or(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_secs(1) && j <= Duration::from_secs(2));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
