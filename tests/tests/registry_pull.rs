//! The registry client against a real `docker-registry` on 127.0.0.1, with a
//! fault-injecting proxy in front: platform resolution, verification, resume
//! after link cuts and stalls, the rate cap, and basic and bearer auth.

use skiff_registry::{
    media, Client, ClientOptions, Error, ImageRef, Platform, RateLimiter, RegistriesConfig, RegistryConfig,
    RetryPolicy, Secret,
};
use skiff_tests::registry::{
    busybox_layout, random_bytes, sha256, write_layout, Faults, Proxy, ProxyAuth, Registry,
};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn options(hosts: &[&str]) -> ClientOptions {
    let mut registries = RegistriesConfig::default();
    for h in hosts {
        registries.set_insecure(h);
    }
    ClientOptions {
        registries,
        stall_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            budget: Duration::from_secs(5),
        },
        ..ClientOptions::default()
    }
}

fn r(s: &str) -> ImageRef {
    ImageRef::try_from(s).unwrap()
}

fn p(s: &str) -> Platform {
    Platform::parse(s).unwrap()
}

fn no_progress(_: u64) {}

#[tokio::test]
async fn multi_arch_index_resolves_to_each_platform() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let platforms = ["linux/amd64", "linux/arm64", "linux/arm/v6", "linux/arm/v7"];
    let images: Vec<(&str, Vec<Vec<u8>>)> =
        platforms.iter().enumerate().map(|(i, p)| (*p, vec![random_bytes(1000 + i, i as u64)])).collect();
    let (index_digest, written) = write_layout(dir.path(), "v1", &images).unwrap();
    reg.push(dir.path(), "v1", "multi:v1", &[]).unwrap();
    let client = Client::new(options(&[&reg.host()]));
    let tag = r(&format!("{}/multi:v1", reg.host()));

    for (i, want) in platforms.iter().enumerate() {
        let res = client.resolve(&tag, &p(want)).await.unwrap();
        assert_eq!(res.digest, written[i].manifest_digest, "{want}");
        assert_eq!(res.top_digest, index_digest);
        assert_eq!(res.media_type, media::OCI_MANIFEST);
        assert_eq!(sha256(&res.manifest), res.digest);
        assert_eq!(res.config.digest, written[i].config_digest);
        assert_eq!(res.layers.len(), 1);
        assert_eq!(res.layers[0].digest, written[i].layers[0].0);
    }
    // The host's own platform.
    let host = Platform::host();
    let res = client.resolve(&tag, &host).await.unwrap();
    let i = platforms.iter().position(|x| p(x) == host).expect("host platform in the test index");
    assert_eq!(res.digest, written[i].manifest_digest);
    // No image for riscv64: the error names the registry, the reference and what there is.
    let e = client.resolve(&tag, &p("linux/riscv64")).await.unwrap_err();
    assert!(matches!(e, Error::NoPlatform { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("registry {}: {tag}: no image for linux/riscv64", reg.host())), "{msg}");
    assert!(msg.ends_with("(index has: linux/amd64, linux/arm64, linux/arm/v6, linux/arm/v7)"), "{msg}");

    // Pins: the index digest and a manifest digest both resolve; resolve_digest gives the index.
    assert_eq!(client.resolve_digest(&tag).await.unwrap(), index_digest);
    let by_index = tag.with_digest(&index_digest).unwrap();
    assert_eq!(
        client.resolve(&by_index, &p("linux/arm/v7")).await.unwrap().digest,
        written[3].manifest_digest
    );
    let by_manifest = tag.with_digest(&written[2].manifest_digest).unwrap();
    let res = client.resolve(&by_manifest, &p("linux/arm64")).await.unwrap();
    assert_eq!(
        (res.digest.as_str(), res.top_digest.as_str()),
        (written[2].manifest_digest.as_str(), written[2].manifest_digest.as_str())
    );
    // A pin the registry does not have.
    let missing = tag.with_digest(&sha256(b"nothing")).unwrap();
    let e = client.resolve(&missing, &host).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let e = client.resolve(&r(&format!("{}/multi:nope", reg.host())), &host).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
}

#[tokio::test]
async fn busybox_pulls_with_oci_and_docker_media_types() {
    let reg = Registry::start().unwrap();
    let layout = busybox_layout();
    reg.push(&layout, "1", "busybox:1", &[]).unwrap();
    reg.push(&layout, "1", "busybox-docker:1", &["--format", "v2s2"]).unwrap();
    let client = Client::new(options(&[&reg.host()]));
    let dir = tempfile::tempdir().unwrap();
    for (name, mt) in [("busybox", media::OCI_MANIFEST), ("busybox-docker", media::DOCKER_MANIFEST)] {
        let tag = r(&format!("{}/{name}:1", reg.host()));
        for plat in ["linux/amd64", "linux/arm64"] {
            let res = client.resolve(&tag, &p(plat)).await.unwrap();
            assert_eq!(res.media_type, mt, "{name} {plat}");
            let config = dir.path().join(format!("{name}-{}", &res.config.digest[7..]));
            client.fetch_blob(&tag, &res.config, &config, &no_progress).await.unwrap();
            let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
            assert_eq!(cfg["architecture"], p(plat).architecture, "{name} {plat}");
            for l in &res.layers {
                let f = dir.path().join(&l.digest[7..]);
                let seen = std::sync::Mutex::new(0u64);
                client.fetch_blob(&tag, l, &f, &|n| *seen.lock().unwrap() = n).await.unwrap();
                assert_eq!(*seen.lock().unwrap(), l.size);
                assert_eq!(sha256(&std::fs::read(&f).unwrap()), l.digest);
                // The layer is the one in the layout.
                assert!(layout.join("blobs/sha256").join(&l.digest[7..]).exists(), "{}", l.digest);
            }
        }
    }
}

/// One image of `layers` pushed as `name:v1`; a proxy in front.
fn setup(name: &str, layers: Vec<Vec<u8>>) -> (Registry, Proxy, tempfile::TempDir, Vec<(String, Vec<u8>)>) {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let (_, written) = write_layout(&layout, "v1", &[("linux/arm64", layers)]).unwrap();
    reg.push(&layout, "v1", &format!("{name}:v1"), &[]).unwrap();
    let proxy = Proxy::start(reg.port).unwrap();
    let layers = written[0].layers.clone();
    (reg, proxy, dir, layers)
}

async fn layer_desc(client: &Client, tag: &ImageRef, i: usize) -> skiff_registry::Descriptor {
    client.resolve(tag, &p("linux/arm64")).await.unwrap().layers[i].clone()
}

#[tokio::test]
async fn tampered_blob_fails_verification_and_leaves_no_partial() {
    let (_reg, proxy, dir, layers) = setup("tamper", vec![random_bytes(100_000, 7)]);
    let client = Client::new(options(&[&proxy.host()]));
    let tag = r(&format!("{}/tamper:v1", proxy.host()));
    let desc = layer_desc(&client, &tag, 0).await;
    let partial = dir.path().join("partial");
    proxy.set_faults(Faults { flip_at: Some(54_321), ..Faults::default() });
    let e = client.fetch_blob(&tag, &desc, &partial, &no_progress).await.unwrap_err();
    match &e {
        Error::DigestMismatch { expected, actual, .. } => {
            assert_eq!(expected, &layers[0].0);
            assert_ne!(actual, expected);
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(e.to_string().starts_with(&format!("registry {}: {tag}: blob ", proxy.host())), "{e}");
    assert!(!partial.exists(), "the bad partial file is deleted");

    // A partial whose prefix is wrong (say, flash corruption): detected at the end, deleted.
    proxy.set_faults(Faults::default());
    let mut bad = layers[0].1[..50_000].to_vec();
    bad[10] ^= 1;
    std::fs::write(&partial, &bad).unwrap();
    let e = client.fetch_blob(&tag, &desc, &partial, &no_progress).await.unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    assert!(!partial.exists());
    // Clean link: it works.
    client.fetch_blob(&tag, &desc, &partial, &no_progress).await.unwrap();
    assert!(std::fs::read(&partial).unwrap() == layers[0].1, "content");
}

#[tokio::test]
async fn cuts_and_stalls_resume_without_downloading_finished_bytes_again() {
    let (_reg, proxy, dir, layers) =
        setup("resume", vec![random_bytes(3 * 1024 * 1024 + 123, 1), random_bytes(400_000, 2)]);
    let size = layers[0].1.len();
    let client = Client::new(options(&[&proxy.host()]));
    let tag = r(&format!("{}/resume:v1", proxy.host()));
    let desc = layer_desc(&client, &tag, 0).await;

    // Cut every 300 000 bytes, many times per layer.
    let partial = dir.path().join("a");
    proxy.set_faults(Faults { cut_after: Some(300_000), cuts_left: u32::MAX, ..Faults::default() });
    let last = std::sync::Mutex::new(0u64);
    client.fetch_blob(&tag, &desc, &partial, &|n| *last.lock().unwrap() = n).await.unwrap();
    assert!(std::fs::read(&partial).unwrap() == layers[0].1, "content");
    assert_eq!(*last.lock().unwrap(), size as u64);
    assert_eq!(proxy.blob_bytes(), size as u64, "every byte served once");
    let requests = proxy.state.blob_requests.load(Ordering::SeqCst);
    assert_eq!(requests as usize, size.div_ceil(300_000));
    let ranges = proxy.state.ranges.lock().unwrap().clone();
    assert_eq!(ranges[0], None);
    assert_eq!(ranges[1].as_deref(), Some("bytes=300000-"));

    // An agent killed mid-pull left 1 234 567 bytes: only the rest is fetched.
    proxy.set_faults(Faults::default());
    let before = proxy.blob_bytes();
    let partial = dir.path().join("b");
    std::fs::write(&partial, &layers[0].1[..1_234_567]).unwrap();
    client.fetch_blob(&tag, &desc, &partial, &no_progress).await.unwrap();
    assert_eq!(proxy.blob_bytes() - before, (size - 1_234_567) as u64);
    assert!(std::fs::read(&partial).unwrap() == layers[0].1, "content");

    // A finished partial (power cut after the last write) is verified, not fetched.
    let before = proxy.blob_bytes();
    client.fetch_blob(&tag, &desc, &partial, &no_progress).await.unwrap();
    assert_eq!(proxy.blob_bytes(), before);

    // Stalls: the proxy stops sending twice; the client notices (stall timeout) and resumes.
    let desc2 = layer_desc(&client, &tag, 1).await;
    let partial = dir.path().join("c");
    let before = proxy.blob_bytes();
    proxy.set_faults(Faults { stall_after: Some(100_000), stalls_left: 2, ..Faults::default() });
    let mut opts = options(&[&proxy.host()]);
    opts.stall_timeout = Duration::from_millis(500);
    let staller = Client::new(opts);
    let t = Instant::now();
    staller.fetch_blob(&tag, &desc2, &partial, &no_progress).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1), "two stalls of 0.5 s each");
    assert_eq!(proxy.blob_bytes() - before, layers[1].1.len() as u64);
    assert!(std::fs::read(&partial).unwrap() == layers[1].1, "content");

    // A partial longer than the blob is discarded and the blob fetched whole.
    proxy.set_faults(Faults::default());
    let partial = dir.path().join("d");
    std::fs::write(&partial, random_bytes(500_000, 9)).unwrap();
    client.fetch_blob(&tag, &desc2, &partial, &no_progress).await.unwrap();
    assert!(std::fs::read(&partial).unwrap() == layers[1].1, "content");

    // A registry that ignores Range: a 200 restarts from zero, and the result is right.
    proxy.set_faults(Faults { ignore_range: true, ..Faults::default() });
    let partial = dir.path().join("e");
    std::fs::write(&partial, &layers[1].1[..1000]).unwrap();
    client.fetch_blob(&tag, &desc2, &partial, &no_progress).await.unwrap();
    assert!(std::fs::read(&partial).unwrap() == layers[1].1, "content");
}

#[tokio::test]
async fn link_down_for_longer_than_the_budget_fails_and_keeps_the_partial() {
    let (reg, proxy, dir, layers) = setup("budget", vec![random_bytes(200_000, 3)]);
    let mut opts = options(&[&proxy.host()]);
    opts.retry.budget = Duration::from_millis(300);
    let client = Client::new(opts);
    let tag = r(&format!("{}/budget:v1", proxy.host()));
    let desc = layer_desc(&client, &tag, 0).await;
    let partial = dir.path().join("p");
    proxy.set_faults(Faults { cut_after: Some(50_000), cuts_left: 1, ..Faults::default() });
    // The registry goes away once the first 50 000 bytes are in (the proxy cuts there).
    let reg = std::sync::Mutex::new(Some(reg));
    let stop = |n: u64| {
        if n >= 50_000 {
            drop(reg.lock().unwrap().take());
        }
    };
    let e = client.fetch_blob(&tag, &desc, &partial, &stop).await.unwrap_err();
    assert!(reg.lock().unwrap().is_none());
    assert!(matches!(e, Error::RetriesExhausted { .. }) && e.is_transient(), "{e}");
    assert!(std::fs::read(&partial).unwrap() == layers[0].1[..50_000], "the good prefix stays for later");
}

#[tokio::test]
async fn rate_cap_holds_within_20_percent_over_2_mib() {
    let (_reg, proxy, dir, layers) = setup("rate", vec![random_bytes(2 * 1024 * 1024, 5)]);
    let size = layers[0].1.len();
    let cap = 1024 * 1024;
    let mut opts = options(&[&proxy.host()]);
    opts.rate = Some(RateLimiter::new(cap));
    let client = Client::new(opts);
    let tag = r(&format!("{}/rate:v1", proxy.host()));
    let desc = layer_desc(&client, &tag, 0).await;
    let t = Instant::now();
    client.fetch_blob(&tag, &desc, &dir.path().join("p"), &no_progress).await.unwrap();
    let rate = size as f64 / t.elapsed().as_secs_f64();
    assert!(rate <= cap as f64 * 1.2 && rate >= cap as f64 * 0.8, "rate {rate:.0} B/s for a cap of {cap}");
}

fn with_credentials(host: &str, user: &str, pass: &str) -> ClientOptions {
    let mut o = options(&[]);
    o.registries.registries.push(RegistryConfig {
        host: host.into(),
        insecure: true,
        username: Some(user.into()),
        password: Some(Secret::new(pass)),
        ..RegistryConfig::default()
    });
    o
}

async fn check_auth(proxy: &Proxy, tag: &ImageRef, secret: &str) {
    let dir = tempfile::tempdir().unwrap();
    // Right credentials: resolve and fetch.
    let client = Client::new(with_credentials(&proxy.host(), "fleet", secret));
    let res = client.resolve(tag, &p("linux/arm64")).await.unwrap();
    client.fetch_blob(tag, &res.layers[0], &dir.path().join("l"), &no_progress).await.unwrap();
    client.fetch_blob(tag, &res.config, &dir.path().join("c"), &no_progress).await.unwrap();
    // Wrong password, and none at all: errors name the registry, never the secret.
    let wrong = format!("{secret}-wrong");
    for opts in [with_credentials(&proxy.host(), "fleet", &wrong), options(&[&proxy.host()])] {
        let e = Client::new(opts).resolve(tag, &p("linux/arm64")).await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
        let text = format!("{e} {e:?}");
        assert!(
            text.starts_with(&format!("registry {}: {tag}: authentication failed (", proxy.host())),
            "{text}"
        );
        assert!(!text.contains(secret), "{text}");
    }
}

#[tokio::test]
async fn basic_auth_right_credentials_work_wrong_ones_are_named() {
    let (_reg, proxy, _dir, _) = setup("basic", vec![random_bytes(10_000, 4)]);
    let secret = "b4sic-s3cret";
    proxy.set_auth(ProxyAuth::Basic { user: "fleet".into(), pass: secret.into() });
    check_auth(&proxy, &r(&format!("{}/basic:v1", proxy.host())), secret).await;
}

#[tokio::test]
async fn token_auth_right_credentials_work_wrong_ones_are_named() {
    let (_reg, proxy, _dir, _) = setup("token", vec![random_bytes(10_000, 6)]);
    let secret = "t0ken-s3cret";
    proxy.set_auth(ProxyAuth::Bearer { user: "fleet".into(), pass: secret.into(), token: "tok-123".into() });
    let tag = r(&format!("{}/token:v1", proxy.host()));
    let before = proxy.state.token_requests.load(Ordering::SeqCst);
    check_auth(&proxy, &tag, secret).await;
    // One token for the good client's manifest + 2 blobs; one refused try per bad client.
    assert_eq!(proxy.state.token_requests.load(Ordering::SeqCst) - before, 3);
}

#[tokio::test]
async fn plain_http_only_for_insecure_registries() {
    let reg = Registry::start().unwrap();
    let tag = r(&format!("{}/none:v1", reg.host()));
    let client = Client::new(ClientOptions {
        retry: RetryPolicy { budget: Duration::ZERO, ..RetryPolicy::default() },
        ..options(&[])
    });
    let e = client.resolve_digest(&tag).await.unwrap_err();
    // HTTPS to a plain-HTTP registry: the TLS handshake fails; nothing is asked over HTTP.
    let msg = e.to_string();
    let want = format!(
        "registry {}: {tag}: cannot connect: https://{}/v2/none/manifests/v1: ",
        reg.host(),
        reg.host()
    );
    assert!(msg.starts_with(&want), "{msg}");
}

#[tokio::test]
async fn https_with_a_private_ca() {
    let reg = Registry::start_tls().unwrap();
    reg.push(&busybox_layout(), "1", "busybox:1", &[]).unwrap();
    let tag = r(&format!("{}/busybox:1", reg.host()));
    let with_ca = |ca: Option<std::path::PathBuf>, insecure: bool| {
        let mut o = options(&[]);
        o.retry.budget = Duration::ZERO;
        o.registries.registries.push(RegistryConfig {
            host: reg.host(),
            insecure,
            ca,
            ..RegistryConfig::default()
        });
        Client::new(o)
    };
    let client = with_ca(Some(reg.ca()), false);
    let res = client.resolve(&tag, &p("linux/arm64")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    client.fetch_blob(&tag, &res.layers[0], &dir.path().join("l"), &no_progress).await.unwrap();
    assert_eq!(sha256(&std::fs::read(dir.path().join("l")).unwrap()), res.layers[0].digest);

    // Without the CA the certificate is refused, and nothing falls back to plain HTTP.
    let e = with_ca(None, false).resolve_digest(&tag).await.unwrap_err().to_string();
    let want = format!(
        "registry {}: {tag}: cannot connect: https://{}/v2/busybox/manifests/1: ",
        reg.host(),
        reg.host()
    );
    assert!(e.starts_with(&want) && e.contains("UnknownIssuer"), "{e}");
    // Marked insecure (plain HTTP) against an HTTPS registry: the registry answers 400.
    let e = with_ca(None, true).resolve_digest(&tag).await.unwrap_err();
    assert!(matches!(e, Error::Status { status: 400, .. }), "{e}");
}
