//! A real registry for the pull tests: Debian's `docker-registry` (distribution
//! 2.8) on a free loopback port with its storage in a throw-away directory,
//! stopped by its PID on drop; images pushed with `skopeo` from OCI layouts
//! (the busybox test image, or layouts of random layers written here).
//!
//! [`Proxy`] sits between the client and the registry and can count the blob
//! bytes it serves, cut or stall a blob response after N bytes, flip one byte,
//! ignore `Range`, and act as the registry's auth: Basic, or a bearer-token realm
//! of its own (the registry behind it is open, so the proxy decides).

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The workspace's built test images (`images/build.sh`).
pub fn busybox_layout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out/busybox")
}

pub struct Registry {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Registry {
    /// Plain HTTP.
    pub fn start() -> Result<Registry> {
        Registry::start_with(false)
    }

    /// HTTPS with a certificate for 127.0.0.1 from a throw-away CA ([`Registry::ca`]).
    pub fn start_tls() -> Result<Registry> {
        Registry::start_with(true)
    }

    /// The CA that signed the HTTPS registry's certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn start_with(tls: bool) -> Result<Registry> {
        let dir = tempfile::Builder::new().prefix("skiff-registry-").tempdir()?;
        let port = free_port()?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if tls {
            make_server_cert(dir.path())?;
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("server.crt").display(),
                dir.path().join("server.key").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry (scripts/deps.sh installs it)")?;
        let mut reg = Registry { dir, port, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = if tls {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            } else {
                get_status(port, "/v2/").ok() == Some(200)
            };
            if ready {
                return Ok(reg);
            }
            if let Some(c) = reg.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("docker-registry exited ({st}): {}", reg.log());
                }
            }
            if Instant::now() > deadline {
                bail!("docker-registry did not answer on 127.0.0.1:{port}: {}", reg.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `skopeo copy --all oci:LAYOUT:TAG docker://HOST/DEST`, with `extra` flags
    /// (`--format v2s2` pushes Docker v2 media types).
    pub fn push(&self, layout: &Path, tag: &str, dest: &str, extra: &[&str]) -> Result<()> {
        let out = Command::new("skopeo")
            .args(["copy", "--all", "-q", "--dest-tls-verify=false"])
            .args(extra)
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{dest}", self.host()))
            .stdin(Stdio::null())
            .output()
            .context("running skopeo (scripts/deps.sh installs it)")?;
        if !out.status.success() {
            bail!("skopeo copy to {dest} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) if Instant::now() > deadline => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `ca.crt` and a `server.crt`/`server.key` for IP 127.0.0.1 signed by it.
fn make_server_cert(dir: &Path) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl").args(args).current_dir(dir).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=skiff-registry-test-ca"]);
    ca.extend([
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&ca)?;
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    let mut req = vec!["req"];
    req.extend(ec);
    req.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    run(&req)?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ])
}

fn get_status(port: u16, path: &str) -> Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf)?;
    Ok(std::str::from_utf8(&buf[9..12])?.parse()?)
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Deterministic pseudo-random bytes (incompressible layers).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What [`write_layout`] wrote.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    pub platform: String,
    pub manifest_digest: String,
    pub config_digest: String,
    /// (digest, bytes) per layer.
    pub layers: Vec<(String, Vec<u8>)>,
}

/// Writes an OCI layout at `dir` with one image per `(platform, layers)`, tagged
/// `tag`: a single manifest when there is one image, else an index (nested in
/// `index.json`, as `images/build.sh` does). Layers are stored gzipped (their
/// digests and bytes in the result are the gzipped ones); nobody looks inside. Returns the top digest and the images.
pub fn write_layout(
    dir: &Path,
    tag: &str,
    images: &[(&str, Vec<Vec<u8>>)],
) -> Result<(String, Vec<LayoutImage>)> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let put = |b: &[u8]| -> Result<String> {
        let d = sha256(b);
        std::fs::write(blobs.join(&d[7..]), b)?;
        Ok(d)
    };
    let mut out = Vec::new();
    let mut entries = Vec::new();
    for (platform, layers) in images {
        let mut parts = platform.split('/');
        let (os, arch, variant) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
        let mut descs = Vec::new();
        let mut ls = Vec::new();
        let mut diff_ids = Vec::new();
        for l in layers {
            // gzip, so that skopeo pushes the blob as is (it compresses uncompressed ones).
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(l)?;
            let gz = gz.finish()?;
            let d = put(&gz)?;
            descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": gz.len()}));
            diff_ids.push(sha256(l));
            ls.push((d, gz));
        }
        let mut config = serde_json::json!({"architecture": arch, "os": os, "rootfs": {"type": "layers", "diff_ids": diff_ids}, "config": {}});
        if let Some(v) = variant {
            config["variant"] = v.into();
        }
        let config = serde_json::to_vec(&config)?;
        let cd = put(&config)?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": descs,
        }))?;
        let md = put(&manifest)?;
        let mut plat = serde_json::json!({"os": os, "architecture": arch});
        if let Some(v) = variant {
            plat["variant"] = v.into();
        }
        entries.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(), "platform": plat}));
        out.push(LayoutImage {
            platform: platform.to_string(),
            manifest_digest: md,
            config_digest: cd,
            layers: ls,
        });
    }
    let ann = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let (top, top_entry) = if entries.len() == 1 {
        let mut e = entries[0].clone();
        e.as_object_mut().map(|o| o.remove("platform"));
        e["annotations"] = ann;
        (out[0].manifest_digest.clone(), e)
    } else {
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries,
        }))?;
        let d = put(&index)?;
        (
            d.clone(),
            serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": index.len(), "annotations": ann}),
        )
    };
    let index_json = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [top_entry]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index_json)?)?;
    Ok((top, out))
}

/// How the proxy authenticates clients.
#[derive(Clone, Debug, Default)]
pub enum ProxyAuth {
    #[default]
    Open,
    Basic {
        user: String,
        pass: String,
    },
    /// A token realm at `/token` on the proxy: Basic credentials there buy `token`,
    /// which `/v2/` requests must carry.
    Bearer {
        user: String,
        pass: String,
        token: String,
    },
}

/// Faults and counters; change them between requests.
#[derive(Default)]
pub struct ProxyState {
    /// Body bytes of blob responses written to clients.
    pub blob_bytes: AtomicU64,
    /// Blob responses started.
    pub blob_requests: AtomicU32,
    pub token_requests: AtomicU32,
    /// `/v2/` requests that reached the registry.
    pub forwarded: AtomicU32,
    pub faults: Mutex<Faults>,
    pub auth: Mutex<ProxyAuth>,
    /// The Range header of each blob request (None when absent).
    pub ranges: Mutex<Vec<Option<String>>>,
}

#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Close a blob response's connection after this many body bytes...
    pub cut_after: Option<u64>,
    /// ...this many times (then serve normally).
    pub cuts_left: u32,
    /// Stop sending (keep the connection open) after this many body bytes, this many times.
    pub stall_after: Option<u64>,
    pub stalls_left: u32,
    /// Flip (xor 0xff) the body byte at this offset of every blob response.
    pub flip_at: Option<u64>,
    /// Drop the Range header (the registry then answers 200 with the whole blob).
    pub ignore_range: bool,
}

pub struct Proxy {
    pub port: u16,
    pub state: Arc<ProxyState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free loopback port, forwarding to the registry on `upstream`.
    pub fn start(upstream: u16) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(ProxyState::default());
        let st = state.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("proxy runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("proxy listener");
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((conn, _)) = accepted else { break };
                            let st = st.clone();
                            tokio::spawn(async move {
                                let _ = serve(conn, upstream, port, st).await;
                            });
                        }
                    }
                }
            });
            rt.shutdown_background();
        });
        Ok(Proxy { port, state, stop: Some(stop), thread: Some(thread) })
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn set_faults(&self, f: Faults) {
        *self.state.faults.lock().unwrap() = f;
    }

    pub fn set_auth(&self, a: ProxyAuth) {
        *self.state.auth.lock().unwrap() = a;
    }

    pub fn blob_bytes(&self) -> u64 {
        self.state.blob_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn read_head(s: &mut tokio::net::TcpStream) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("closed before the head ended");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = head.split_off(i + 4);
            return Ok((head, rest));
        }
        if head.len() > 65536 {
            bail!("head too long");
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn reply(
    conn: &mut tokio::net::TcpStream,
    status: &str,
    headers: &[String],
    body: &[u8],
) -> Result<()> {
    let mut h = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for x in headers {
        h.push_str(x);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    conn.write_all(h.as_bytes()).await?;
    conn.write_all(body).await?;
    Ok(())
}

pub fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            out.push(if k <= c.len() { T[(n >> (18 - 6 * k) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

async fn serve(mut conn: tokio::net::TcpStream, upstream: u16, me: u16, st: Arc<ProxyState>) -> Result<()> {
    let (head, _body) = read_head(&mut conn).await?;
    let head = String::from_utf8(head)?;
    let first = head.lines().next().unwrap_or("").to_string();
    let path = first.split(' ').nth(1).unwrap_or("/").to_string();
    let auth = st.auth.lock().unwrap().clone();
    let given = header(&head, "authorization").map(str::to_string);
    // The token realm.
    if path.starts_with("/token") {
        st.token_requests.fetch_add(1, Ordering::SeqCst);
        if let ProxyAuth::Bearer { user, pass, token } = &auth {
            if given.as_deref() == Some(&format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))) {
                let body = serde_json::to_vec(&serde_json::json!({"token": token, "expires_in": 300}))?;
                return reply(&mut conn, "200 OK", &["Content-Type: application/json".into()], &body).await;
            }
        }
        return reply(&mut conn, "401 Unauthorized", &[], b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}")
            .await;
    }
    let challenge = match &auth {
        ProxyAuth::Open => None,
        ProxyAuth::Basic { user, pass } => {
            let want = format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()));
            (given.as_deref() != Some(&want))
                .then(|| "WWW-Authenticate: Basic realm=\"skiff-test\"".to_string())
        }
        ProxyAuth::Bearer { token, .. } => {
            let repo = path
                .strip_prefix("/v2/")
                .and_then(|p| p.split("/manifests/").next())
                .and_then(|p| p.split("/blobs/").next())
                .unwrap_or("");
            (given.as_deref() != Some(&format!("Bearer {token}"))).then(|| {
                format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{me}/token\",service=\"skiff-test\",scope=\"repository:{repo}:pull\"")
            })
        }
    };
    if let Some(c) = challenge {
        return reply(&mut conn, "401 Unauthorized", &[c], b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}")
            .await;
    }
    let faults = st.faults.lock().unwrap().clone();
    let is_blob = path.contains("/blobs/") && first.starts_with("GET ");
    // Forward the head without Authorization (the registry is open) and, when told, without Range.
    let mut fwd = String::new();
    for (i, l) in head.split("\r\n").enumerate() {
        let lower = l.to_ascii_lowercase();
        if i > 0
            && (lower.starts_with("authorization:") || (faults.ignore_range && lower.starts_with("range:")))
        {
            continue;
        }
        fwd.push_str(l);
        fwd.push_str("\r\n");
    }
    let fwd = fwd.trim_end_matches("\r\n").to_string() + "\r\n\r\n";
    if is_blob {
        st.blob_requests.fetch_add(1, Ordering::SeqCst);
        st.ranges.lock().unwrap().push(header(&head, "range").map(str::to_string));
    }
    st.forwarded.fetch_add(1, Ordering::SeqCst);
    let mut up = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
    up.write_all(fwd.as_bytes()).await?;
    let (rhead, mut rest) = read_head(&mut up).await?;
    conn.write_all(&rhead).await?;
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let chunk: Vec<u8> = if !rest.is_empty() {
            std::mem::take(&mut rest)
        } else {
            let n = up.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            buf[..n].to_vec()
        };
        let mut chunk = chunk;
        if !is_blob {
            conn.write_all(&chunk).await?;
            continue;
        }
        if let Some(at) = faults.flip_at {
            if at >= sent && at < sent + chunk.len() as u64 {
                chunk[(at - sent) as usize] ^= 0xff;
            }
        }
        // Cut or stall at a byte limit: send up to it, then act.
        let limit = [faults.cut_after, faults.stall_after].into_iter().flatten().min();
        if let Some(limit) = limit {
            if sent + chunk.len() as u64 >= limit {
                let take = (limit.saturating_sub(sent)) as usize;
                let is_cut = faults.cut_after == Some(limit);
                let allowed = {
                    let mut f = st.faults.lock().unwrap();
                    let left = if is_cut { &mut f.cuts_left } else { &mut f.stalls_left };
                    if *left > 0 {
                        *left -= 1;
                        true
                    } else {
                        false
                    }
                };
                if allowed {
                    conn.write_all(&chunk[..take]).await?;
                    st.blob_bytes.fetch_add(take as u64, Ordering::SeqCst);
                    conn.flush().await?;
                    if is_cut {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return Ok(());
                }
            }
        }
        conn.write_all(&chunk).await?;
        sent += chunk.len() as u64;
        st.blob_bytes.fetch_add(chunk.len() as u64, Ordering::SeqCst);
    }
    Ok(())
}

/// The host's busybox image plus one layer holding `/version` (`text`) and
/// `/ballast` (`ballast` incompressible bytes), as an OCI layout tagged `tag`.
/// Returns the manifest digest and the digest of the layer of its own.
pub fn busybox_variant(dir: &Path, tag: &str, text: &str, ballast: usize, seed: u64) -> (String, String) {
    let layout = busybox_layout();
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let json = |b: Vec<u8>| -> serde_json::Value { serde_json::from_slice(&b).unwrap() };
    let top = json(std::fs::read(layout.join("index.json")).unwrap());
    let index = json(blob(top["manifests"][0]["digest"].as_str().unwrap()));
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no busybox test image for {other}"),
    };
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == arch)
        .expect("host platform in the busybox layout");
    let manifest = json(blob(entry["digest"].as_str().unwrap()));
    let mut layers = Vec::new();
    for l in manifest["layers"].as_array().unwrap() {
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&blob(l["digest"].as_str().unwrap())[..]).read_to_end(&mut tar).unwrap();
        layers.push(tar);
    }
    layers.push(tar_of(&[("version", text.as_bytes().to_vec()), ("ballast", random_bytes(ballast, seed))]));
    let (_, images) = write_layout(dir, tag, &[(&format!("linux/{arch}"), layers)]).unwrap();
    let own = images[0].layers.last().unwrap().0.clone();
    (images[0].manifest_digest.clone(), own)
}

/// A tar with regular files at the root.
pub fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |buf: &mut [u8], v: u64| {
            let s = format!("{v:0width$o}\0", width = buf.len() - 1);
            buf.copy_from_slice(s.as_bytes());
        };
        octal(&mut h[100..108], 0o644);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}
