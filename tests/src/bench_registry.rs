//! Registry pull figures (`bench registry`): skiff-registry against `skopeo copy`
//! of the same multi-layer image from the same loopback `docker-registry`, and
//! resume efficiency with the link cut every 1 MiB.

use crate::registry::{random_bytes, write_layout, Faults, Proxy, Registry};
use skiff_registry::{Client, ClientOptions, ImageRef, Platform, RegistriesConfig, RetryPolicy};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LAYERS: usize = 4;
const LAYER: usize = 6 * 1024 * 1024;

fn client(host: &str) -> Client {
    let mut registries = RegistriesConfig::default();
    registries.set_insecure(host);
    Client::new(ClientOptions {
        registries,
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(50),
            budget: Duration::from_secs(30),
        },
        ..ClientOptions::default()
    })
}

/// Pulls manifest, config and every layer into `dir`; returns the blob bytes.
async fn pull(client: &Client, r: &ImageRef, dir: &Path) -> u64 {
    let res = client.resolve(r, &Platform::parse("linux/arm64").unwrap()).await.unwrap();
    let mut bytes = 0;
    for d in std::iter::once(&res.config).chain(res.layers.iter()) {
        client.fetch_blob(r, d, &dir.join(&d.digest[7..]), &|_| {}).await.unwrap();
        bytes += d.size;
    }
    bytes
}

pub fn run() {
    println!("registry pull ({LAYERS} layers of {} MiB, loopback docker-registry)", LAYER >> 20);
    let reg = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let layers: Vec<Vec<u8>> = (0..LAYERS).map(|i| random_bytes(LAYER, 100 + i as u64)).collect();
    write_layout(&layout, "v1", &[("linux/arm64", layers)]).unwrap();
    reg.push(&layout, "v1", "bench:v1", &[]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let host = reg.host();
    let r = ImageRef::try_from(format!("{host}/bench:v1")).unwrap();

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut size = 0;
    for i in 0..5 {
        let d = work.path().join(format!("ours{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let c = client(&host);
        let t = Instant::now();
        size = rt.block_on(pull(&c, &r, &d));
        ours.push(t.elapsed().as_secs_f64());

        let d = work.path().join(format!("skopeo{i}"));
        let t = Instant::now();
        let st = Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false", "--override-arch", "arm64"])
            .arg(format!("docker://{host}/bench:v1"))
            .arg(format!("oci:{}:v1", d.display()))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        theirs.push(t.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (o, t) = (med(&mut ours), med(&mut theirs));
    println!(
        "  pull of {:.1} MiB of blobs: skiff-registry {:.0} ms, skopeo copy {:.0} ms (ratio {:.2}; median of 5)",
        size as f64 / 1048576.0,
        o * 1000.0,
        t * 1000.0,
        o / t
    );

    // Resume efficiency: the proxy cuts every response after 1 MiB.
    let proxy = Proxy::start(reg.port).unwrap();
    proxy.set_faults(Faults { cut_after: Some(1 << 20), cuts_left: u32::MAX, ..Faults::default() });
    let r = ImageRef::try_from(format!("{}/bench:v1", proxy.host())).unwrap();
    let d = work.path().join("cut");
    std::fs::create_dir_all(&d).unwrap();
    let c = client(&proxy.host());
    let t = Instant::now();
    let size = rt.block_on(pull(&c, &r, &d));
    let wall = t.elapsed().as_secs_f64();
    let served = proxy.blob_bytes();
    let requests = proxy.state.blob_requests.load(std::sync::atomic::Ordering::SeqCst);
    println!(
        "  cut every 1 MiB: {requests} blob requests, {served} blob bytes served for {size} (ratio {:.4}), {:.0} ms",
        served as f64 / size as f64,
        wall * 1000.0
    );
}
