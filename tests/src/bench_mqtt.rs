//! The MQTT figures of `bench`: skiffctl apply -> container running, idle
//! traffic per hour, and catch-up of 1,000 events queued during an outage.

use crate::agent::{skiffctl_bin, wait_for, Sandbox};
use crate::mqtt::{link, Broker, CONTROLLER};
use skiff_common::protocol::{decode_event, topic, Channel, DeviceId, EventKind, SigningKey};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEV: &str = "pi-1";

fn agent_args(b: &Broker, url: &str, keys: &Path, keepalive: &str) -> Vec<String> {
    [
        "--mqtt-broker",
        url,
        "--device",
        DEV,
        "--controller-key",
        &keys.join("controller.pub").display().to_string(),
        "--mqtt-ca",
        &b.ca().display().to_string(),
        "--mqtt-cert",
        &b.cert(DEV).display().to_string(),
        "--mqtt-key",
        &b.key(DEV).display().to_string(),
        "--mqtt-keepalive",
        keepalive,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn skiffctl_apply(b: &Broker, keys: &Path, file: &Path) {
    let out = Command::new(skiffctl_bin())
        .args(["apply", "-f", file.to_str().unwrap(), "--device", DEV, "--key"])
        .arg(keys.join("controller.key"))
        .args(["--broker", &b.controller_url(), "--ca"])
        .arg(b.ca())
        .arg("--cert")
        .arg(b.cert(CONTROLLER))
        .arg("--tls-key")
        .arg(b.key(CONTROLLER))
        .output()
        .unwrap();
    assert!(out.status.success(), "skiffctl apply: {}", String::from_utf8_lossy(&out.stderr));
}

fn keygen() -> tempfile::TempDir {
    let keys = tempfile::tempdir().unwrap();
    assert!(Command::new(skiffctl_bin())
        .arg("keygen")
        .arg("--out")
        .arg(keys.path())
        .output()
        .unwrap()
        .status
        .success());
    keys
}

/// Median, p95, min of milliseconds.
pub fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p95 = v[((v.len() as f64 * 0.95).ceil() as usize).min(v.len()) - 1];
    (v[v.len() / 2], p95, v[0])
}

pub fn apply_to_running(runs: usize) {
    let broker = Broker::start(&[DEV]).expect("mosquitto");
    let keys = keygen();
    let mut sb = Sandbox::new();
    sb.agent_args = agent_args(&broker, &broker.device_url(), keys.path(), "30s");
    sb.start_agent();
    let mark = sb.dir.path().join("mark");
    std::fs::create_dir_all(&mark).unwrap();
    let up = mark.join("up");
    let file = sb.dir.path().join("fleet.toml");
    let mut times = Vec::new();
    for i in 0..runs + 1 {
        std::fs::write(&file, "").unwrap();
        skiffctl_apply(&broker, keys.path(), &file);
        wait_for(Duration::from_secs(30), "no app", || {
            sb.ps()["apps"].as_array().unwrap().is_empty().then_some(())
        });
        let _ = std::fs::remove_file(&up);
        std::fs::write(
            &file,
            format!(
                "[[app]]\nname = \"bench\"\nimage = \"busybox:1\"\ncommand = [\"sh\", \"-c\", \"touch /mark/up; exec sleep 600\"]\nenv = {{ RUN = \"{i}\" }}\nstop_grace = \"0s\"\nmounts = [{{ source = \"{}\", target = \"/mark\" }}]\n",
                mark.display()
            ),
        )
        .unwrap();
        let t = Instant::now();
        skiffctl_apply(&broker, keys.path(), &file);
        while !up.exists() {
            assert!(t.elapsed() < Duration::from_secs(30), "the app never ran");
            std::thread::sleep(Duration::from_micros(200));
        }
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let (m, p95, min) = stats(times);
    println!("skiffctl apply -> container running on the device (ms, mTLS, image cached, {runs} runs)");
    println!("  median {m:7.1}  p95 {p95:7.1}  min {min:7.1}");
    println!("  (includes skiffctl's own start, TLS connect, publish and wait for the broker's echo)\n");
}

/// A TCP proxy counting what passes in each direction (bytes and reads).
struct Counter {
    port: u16,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    segments: Arc<AtomicU64>,
}

fn counting_proxy(target: u16) -> Counter {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (up, down, segments) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (u, d, s) = (up.clone(), down.clone(), segments.clone());
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let Ok(b) = TcpStream::connect(("127.0.0.1", target)) else { continue };
            let pipe = |mut from: TcpStream, mut to: TcpStream, n: Arc<AtomicU64>, s: Arc<AtomicU64>| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(k) = from.read(&mut buf) {
                        if k == 0 || to.write_all(&buf[..k]).is_err() {
                            break;
                        }
                        n.fetch_add(k as u64, Ordering::Relaxed);
                        s.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            };
            pipe(c.try_clone().unwrap(), b.try_clone().unwrap(), u.clone(), s.clone());
            pipe(b, c, d.clone(), s.clone());
        }
    });
    Counter { port, up, down, segments }
}

pub fn idle_traffic(window: Duration) {
    let broker = Broker::start(&[DEV]).expect("mosquitto");
    let keys = keygen();
    let proxy = counting_proxy(broker.device_port);
    let mut sb = Sandbox::new();
    sb.agent_args = agent_args(&broker, &format!("mqtts://127.0.0.1:{}", proxy.port), keys.path(), "30s");
    sb.start_agent();
    sb.apply("[[app]]\nname = \"idle\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"3600\"]\n");
    sb.wait_running("idle");
    wait_for(Duration::from_secs(20), "the link", || (sb.ps()["link"]["connected"] == true).then_some(()));
    std::thread::sleep(Duration::from_secs(3)); // connect, subscribe and first report done
    let (u0, d0, s0) = (
        proxy.up.load(Ordering::Relaxed),
        proxy.down.load(Ordering::Relaxed),
        proxy.segments.load(Ordering::Relaxed),
    );
    std::thread::sleep(window);
    let up = proxy.up.load(Ordering::Relaxed) - u0;
    let down = proxy.down.load(Ordering::Relaxed) - d0;
    let segs = proxy.segments.load(Ordering::Relaxed) - s0;
    let per_hour = |b: u64| b as f64 * 3600.0 / window.as_secs_f64();
    // Each TLS record rides one TCP segment here; on a real link each also
    // costs ~66 B of Ethernet/IP/TCP headers and usually an ACK of the same size.
    let wire = per_hour(up + down) + per_hour(segs) * 66.0 * 2.0;
    println!("idle MQTT traffic, keepalive 30s, mTLS, measured over {window:?}");
    println!("  TLS bytes up {up}, down {down}, in {segs} segments");
    println!(
        "  per hour: {:.0} B of TLS records; about {:.1} KB on the wire with TCP/IP headers and ACKs\n",
        per_hour(up + down),
        wire / 1000.0
    );
}

pub fn catch_up(events: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut broker = Broker::start(&[DEV]).expect("mosquitto");
        let dev = DeviceId::try_from(DEV).unwrap();
        let key = SigningKey::from_bytes(&rand::random());
        let mut obs = broker.controller("observer", false).unwrap();
        obs.connected(1).await.unwrap();
        obs.client.subscribe(topic(&dev, Channel::Events), rumqttc::QoS::AtLeastOnce).await.unwrap();
        crate::mqtt::wait_for(&mut obs.subacks, |v| v.len() == 1, Duration::from_secs(5)).await.unwrap();
        let mut cfg = broker.link_config(DEV, key.verifying_key().to_bytes());
        cfg.reconnect_min = Duration::from_millis(200);
        cfg.reconnect_max = Duration::from_secs(1);
        let (h, _rx) = link::spawn(cfg, 0).unwrap();
        let mut status = h.status();
        crate::mqtt::wait_for(&mut status, |s| s.connected, Duration::from_secs(5)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        broker.stop();
        crate::mqtt::wait_for(&mut status, |s| !s.connected, Duration::from_secs(5)).await.unwrap();
        for i in 0..events {
            h.event(EventKind::Exited, None, format!("queued {i}"));
        }
        broker.restart().unwrap();
        let t = Instant::now();
        crate::mqtt::wait_for(&mut status, |s| s.connected, Duration::from_secs(30)).await.unwrap();
        let connected = t.elapsed();
        let mut got = 0;
        let mut dropped = 0;
        while got < events {
            let p = obs.next_on("/events", Duration::from_secs(30)).await.expect("events stopped arriving");
            let e = decode_event(&p.payload).unwrap();
            dropped += e.dropped_before;
            got += 1;
        }
        let all = t.elapsed();
        println!("catch-up after an outage, {events} events queued in the link");
        println!(
            "  broker back -> link connected  {:8.1} ms (reconnect backoff 200 ms..1 s)",
            connected.as_secs_f64() * 1000.0
        );
        println!(
            "  broker back -> all delivered   {:8.1} ms ({dropped} dropped)",
            all.as_secs_f64() * 1000.0
        );
        println!("  connected -> all delivered     {:8.1} ms\n", (all - connected).as_secs_f64() * 1000.0);
    });
}
