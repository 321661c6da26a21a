//! `cargo run --release -p skiff-tests --bin bench`: skiff's figures, measured
//! against a peer in the same run where there is one.
//!
//! - container start: from `skiff apply` of a desired state to the app's
//!   process running (it touches a file in a bind mount, which this polls),
//!   median and p95 over 20, with the default seccomp profile and unconfined,
//!   against `runc run -d` of the same rootfs and command (no seccomp: the
//!   bundle is skiff's, which loads its filter itself) measured the same way;
//! - memory: PSS of the agent and its shims, idle, with 10 running apps;
//! - adopted: idle CPU of the agent and its shims (utime+stime from
//!   /proc/<pid>/stat, and the finer run time from schedstat) and the agent's
//!   wake-ups over a fixed window with N apps the agent started, then
//!   again after the agent is SIGKILLed and restarted (it adopts them), with
//!   the ratio and the load average next to each figure
//!   (`SKIFF_BENCH_APPS`, default 100; `SKIFF_BENCH_IDLE_SECS`, default 60);
//! - sizes of the stripped release binaries (and aarch64 ones if built);
//! - MQTT: skiffctl apply -> running, catch-up of 1,000 queued events, idle
//!   traffic per hour (see `bench_mqtt`).
//!
//! - reconcile: callgrind instruction counts of one reconcile pass with 50
//!   apps, the reconciler alone (exact and repeatable, for comparing changes).
//!
//! - board: on the emulated aarch64 board (QEMU), boot -> all apps running
//!   and the agent's memory with 5 apps (see `skiff_tests::board`).
//!
//! - storm: a desired state of 1,000 apps: time from `skiff apply` to all
//!   running, and `skiff ps` latency while they start (median, p95, max).
//!
//! - kill9: the agent SIGKILLed at random points during apply, up to 200
//!   rounds in 3 minutes: lost apps, duplicates, leaks, restarts.
//!
//! - registry: a 24 MiB 4-layer pull from a loopback docker-registry against
//!   `skopeo copy` of the same image, and resume efficiency with a cut every 1 MiB
//!   (see `bench_registry`).
//!
//! - pull: `skiff image pull` of a 50 MiB image (5 layers of 10 MiB) from
//!   docker-registry on 127.0.0.1: wall time against `skopeo copy docker://...
//!   oci:DIR` of the same image in the same run, and peak RSS (VmHWM) of the pull
//!   for one 5 MiB layer and for one 50 MiB layer (it must not grow: layers
//!   stream to disk); then the same for the agent itself: its VmHWM before and
//!   after a controller state makes it pull busybox plus a 5 MiB or a 50 MiB
//!   layer (through a real mosquitto and skiffctl) and run it.
//!
//! - rollback: a generation whose app exits 1 at once, 10 times: from the
//!   crash (the app prints the boot clock as it exits) to the last good
//!   generation's container running again (its process start time, same
//!   clock), median, p95 and min; and the flash writes of one successful update,
//!   from `skiff apply` to the commit, on a state dir of its own (a loop-mounted
//!   ext4: the kernel's count of bytes written to the device, journal included,
//!   and the bytes of the files written).
//!
//! Sections can be picked: `bench start memory adopted mqtt size reconcile board storm registry pull kill9 rollback`.

use serde_json::Value;
use skiff_tests::agent::{eventually, repo, wait_for, Sandbox};
use skiff_tests::bench_mqtt::stats;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 20;

fn main() {
    if std::env::var_os("SKIFF_BIN").is_none() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "--release", "-q", "-p", "skiff-agent", "-p", "skiff-controller"])
            .current_dir(repo())
            .status()
            .unwrap();
        assert!(st.success());
        std::env::set_var("SKIFF_BIN", repo().join("target/release/skiff"));
        std::env::set_var("SKIFFCTL_BIN", repo().join("target/release/skiffctl"));
    }
    println!("skiff benchmarks ({} runs where timed)\n", RUNS);
    let only: Vec<String> = std::env::args().skip(1).collect();
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    if run("start") {
        start_latency();
    }
    if run("memory") {
        memory();
    }
    if run("adopted") {
        adopted();
    }
    if run("mqtt") {
        skiff_tests::bench_mqtt::apply_to_running(RUNS);
        skiff_tests::bench_mqtt::catch_up(1000);
        skiff_tests::bench_mqtt::idle_traffic(Duration::from_secs(125));
    }
    if run("size") {
        sizes();
    }
    if run("reconcile") {
        reconcile();
    }
    if run("board") {
        board();
    }
    if run("storm") {
        storm(1000);
    }
    if run("kill9") {
        kill9(200, Duration::from_secs(180));
    }
    if run("registry") {
        skiff_tests::bench_registry::run();
    }
    if run("pull") {
        pull();
    }
    if run("rollback") {
        rollback(10);
    }
}

const RB_GOOD: &str = "[rollout]\nstable = \"1s\"\n[[app]]\nname = \"web\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"SECS\"]\n";
const RB_BAD: &str = "[rollout]\nstable = \"30s\"\n[[app]]\nname = \"web\"\nimage = \"busybox:1\"\ncommand = [\"sh\", \"-c\", \"cat /proc/uptime; exit 1\"]\n";

fn rollout_of(sb: &Sandbox) -> Value {
    sb.ps()["rollout"].clone()
}

/// Applies a good state (a new command each time) and waits for its commit.
fn commit_good(sb: &Sandbox, secs: u64) -> u64 {
    sb.apply(&RB_GOOD.replace("SECS", &secs.to_string()));
    let g = sb.ps()["generation"].as_u64().unwrap();
    wait_for(Duration::from_secs(60), "a commit", || {
        let r = rollout_of(sb);
        (r["testing"].is_null() && r["committed"].as_u64() >= Some(g))
            .then(|| r["committed"].as_u64().unwrap())
    })
}

fn boot_ms_of_pid(pid: i64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let ticks: f64 = after.split(' ').nth(19).unwrap().parse().unwrap();
    ticks * 1000.0 / 100.0
}

fn rollback(n: usize) {
    println!("== rollback: a generation whose app exits 1 at once, {n} times");
    let mut sb = Sandbox::new();
    sb.start_agent();
    let mut back = Vec::new();
    for i in 0..n {
        let secs = 3600 + i as u64;
        commit_good(&sb, secs);
        let good_pid = sb.wait_running("web")["pid"].clone();
        let before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let before = before.split(' ').take(3).collect::<Vec<_>>().join(" ");
        sb.apply(RB_BAD);
        let failed = wait_for(Duration::from_secs(60), "the rollback", || {
            let r = rollout_of(&sb);
            (r["failed"]["rolled_back"] == true && r["committed"].as_u64().is_some()).then_some(r)
        });
        // The last good generation's container, a new one: the same command as before.
        let web = sb.wait_app("web", Duration::from_secs(30), "back", |a| {
            a["phase"] == "running"
                && a["pid"].is_i64()
                && a["pid"] != good_pid
                && std::fs::read(format!("/proc/{}/cmdline", a["pid"])).is_ok_and(|c| {
                    String::from_utf8_lossy(&c).replace('\0', " ").trim() == format!("sleep {secs}")
                })
        });
        let log = sb.logs("web");
        let crash_s: f64 = log
            .lines()
            .rev()
            .find_map(|l| l.split(' ').next().and_then(|w| w.parse::<f64>().ok()))
            .expect("the crash's boot clock in the log");
        let ms = boot_ms_of_pid(web["pid"].as_i64().unwrap()) - crash_s * 1000.0;
        println!("  run {i}: {ms:.0} ms ({}; load {before})", failed["failed"]["reason"]);
        back.push(ms);
    }
    let (median, p95, min) = stats(back);
    println!(
        "  crash -> last good generation running again: median {median:.0} ms, p95 {p95:.0} ms, min {min:.0} ms (10 ms clock)"
    );
    drop(sb);
    flash_of_one_update();
}

/// Bytes written to flash by one successful update, on an ext4 of its own.
fn flash_of_one_update() {
    let mut sb = Sandbox::new();
    let img = sb.dir.path().join("flash.img");
    let state = sb.state_dir();
    let run = |c: &mut Command| {
        let out = c.output().unwrap();
        assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // The images the sandbox loaded move onto the new file system.
    let saved = sb.dir.path().join("state.saved");
    std::fs::rename(&state, &saved).unwrap();
    run(Command::new("truncate").args(["-s", "256M"]).arg(&img));
    run(Command::new("mkfs.ext4").args(["-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"]).arg(&img));
    std::fs::create_dir_all(&state).unwrap();
    run(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&state));
    run(Command::new("cp").arg("-a").arg(format!("{}/.", saved.display())).arg(&state));
    let dev = run(Command::new("findmnt").args(["-n", "-o", "SOURCE"]).arg(&state));
    let counter = PathBuf::from(format!(
        "/sys/fs/ext4/{}/lifetime_write_kbytes",
        Path::new(&dev).file_name().unwrap().to_string_lossy()
    ));
    let kbytes = || std::fs::read_to_string(&counter).unwrap().trim().parse::<u64>().unwrap();
    sb.start_agent();
    commit_good(&sb, 3600);
    run(Command::new("sync").arg("-f").arg(&state));
    std::thread::sleep(Duration::from_secs(2));
    let sizes = |f: &str| std::fs::metadata(state.join(f)).map(|m| m.len()).unwrap_or(0);
    let k0 = kbytes();
    commit_good(&sb, 3700);
    run(Command::new("sync").arg("-f").arg(&state));
    std::thread::sleep(Duration::from_secs(2));
    let k1 = kbytes();
    let (desired, record) = (sizes("desired.skf"), sizes("rollout.skf"));
    println!(
        "  one successful update, apply -> commit: {} KiB written to the device (ext4 lifetime_write_kbytes, journal and metadata included); files: desired.skf {desired} B (written once), rollout.skf {record} B (written twice: on test, committed), good.skf and desired.prev.skf hard links (0 B): {} B of file data",
        k1 - k0,
        desired + 2 * record
    );
    sb.stop_agent();
    skiff_tests::agent::kill_everything(sb.dir.path(), &sb.cgroup_root);
    // kill_everything unmounts what is below the sandbox; this is for a bench that failed half-way.
    let _ = Command::new("umount").arg(&state).output();
}

/// A layer tar of one file of `len` incompressible bytes.
fn random_layer(name: &str, len: usize, seed: u64) -> Vec<u8> {
    let data = skiff_tests::registry::random_bytes(len, seed);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, name, data.as_slice()).unwrap();
    b.into_inner().unwrap()
}

/// Runs `skiff image pull` into a fresh store; returns wall time and peak RSS (KiB).
fn skiff_pull(reference: &str) -> (Duration, u64) {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let mut child = Command::new(std::env::var("SKIFF_BIN").unwrap())
        .arg("--state-dir")
        .arg(dir.path())
        .args(["image", "pull", reference, "--insecure", "--registries", "/nonexistent"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut hwm = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            if let Some(kib) = text.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                hwm = hwm.max(kib.trim().trim_end_matches("kB").trim().parse().unwrap_or(0));
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "skiff image pull {reference} failed");
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (start.elapsed(), hwm)
}

fn pull() {
    use skiff_tests::registry::{write_layout, Registry};
    let reg = Registry::start().unwrap();
    let host = skiff_registry::Platform::host().to_string();
    let src = tempfile::tempdir().unwrap();
    let five: Vec<Vec<u8>> = (0..5).map(|i| random_layer(&format!("l{i}"), 10 << 20, i)).collect();
    let total: usize = five.iter().map(Vec::len).sum();
    let images = [
        ("multi", five),
        ("small", vec![random_layer("s", 5 << 20, 10)]),
        ("big", vec![random_layer("b", 50 << 20, 11)]),
    ];
    for (tag, layers) in &images {
        let dir = src.path().join(tag);
        write_layout(&dir, tag, &[(host.as_str(), layers.clone())]).unwrap();
        reg.push(&dir, tag, &format!("bench:{tag}"), &[]).unwrap();
    }
    let name = |tag: &str| format!("{}/bench:{tag}", reg.host());
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    for _ in 0..3 {
        ours.push(skiff_pull(&name("multi")).0);
        let out = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let st = Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{}", name("multi")))
            .arg(format!("oci:{}:x", out.path().join("oci").display()))
            .status()
            .unwrap();
        assert!(st.success(), "skopeo copy");
        peer.push(t.elapsed());
    }
    ours.sort();
    peer.sort();
    let (o, p) = (ours[1], peer[1]);
    println!(
        "pull of a {:.0} MiB image (5 layers) from the loopback registry, median of 3",
        total as f64 / (1 << 20) as f64
    );
    println!("  skiff image pull (download, verify, unpack)  {:8.0} ms", o.as_secs_f64() * 1e3);
    println!("  skopeo copy to an OCI dir (download only)    {:8.0} ms", p.as_secs_f64() * 1e3);
    println!("  ratio                                        {:8.2}", o.as_secs_f64() / p.as_secs_f64());
    let (_, small) = skiff_pull(&name("small"));
    let (_, big) = skiff_pull(&name("big"));
    println!("peak RSS of skiff image pull (KiB)");
    println!("  one 5 MiB layer                              {small:8}");
    println!("  one 50 MiB layer                             {big:8}");
    println!("peak RSS of the agent (KiB), idle -> after pulling and running the app");
    for (tag, mib) in [("agent5", 5usize), ("agent50", 50)] {
        let dir = src.path().join(tag);
        skiff_tests::registry::busybox_variant(&dir, tag, tag, mib << 20, mib as u64);
        reg.push(&dir, tag, &format!("bench:{tag}"), &[]).unwrap();
        let (idle, peak) = agent_pull_rss(&reg.host(), &name(tag));
        println!("  busybox + one {mib:2} MiB layer                 {idle:8} -> {peak:8}");
    }
    println!();
}

/// VmHWM (KiB) of `pid`.
fn hwm_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = text.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap_or("0 kB");
    line.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
}

/// An agent linked to a real broker: its peak RSS once idle, and after a
/// controller state made it pull `image` and run an app from it.
fn agent_pull_rss(registry: &str, image: &str) -> (u64, u64) {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let regs = work.path().join("registries.toml");
    std::fs::write(&regs, format!("[[registry]]\nhost = \"{registry}\"\ninsecure = true\n")).unwrap();
    std::fs::set_permissions(&regs, std::fs::Permissions::from_mode(0o600)).unwrap();
    let regs = regs.display().to_string();
    let fleet = skiff_tests::fleet::Fleet::new("pi-bench");
    let mut sb = fleet.agent();
    sb.agent_args.extend(["--registries".to_string(), regs.clone()]);
    sb.start_agent();
    let pid = sb.agent_pid().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let idle = hwm_kib(pid);
    let toml = format!(
        "[[app]]\nname = \"web\"\nimage = \"{image}\"\ncommand = [\"/bin/sleep\", \"3600\"]\nstop_grace = \"1s\"\n"
    );
    let out = fleet.apply(work.path(), &toml, &["--registries", &regs]);
    assert!(out.status.success(), "skiffctl apply: {}", String::from_utf8_lossy(&out.stderr));
    sb.wait_app("web", Duration::from_secs(300), "the pulled app running", |a| a["phase"] == "running");
    let peak = hwm_kib(pid);
    sb.kill_agent();
    (idle, peak)
}

/// The agent SIGKILLed at a random point (0-150 ms) after `skiff apply` of a
/// new generation, then restarted, `rounds` times or until `budget` is spent.
/// Each generation replaces two apps (new command) and keeps two. After each
/// round, once everything settles: apps not running (lost), apps with more
/// than one container process (duplicates), shims, rootfs mounts and cgroups
/// beyond one per app (leaks), kept apps whose pid changed (restarted).
fn kill9(rounds: usize, budget: Duration) {
    use rand::Rng;
    let mut sb = Sandbox::new();
    sb.agent_args = vec!["--backoff-base".into(), "100ms".into()];
    sb.start_agent();
    let names = ["k0", "k1", "c0", "c1"];
    let state = |gen: usize| -> String {
        names
            .iter()
            .map(|n| {
                let secs = if n.starts_with('k') { 100000 } else { 100000 + gen };
                format!("[[app]]\nname = \"{n}\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"{secs}\"]\nstop_grace = \"0s\"\n")
            })
            .collect()
    };
    let settled = |sb: &Sandbox| {
        let ps = sb.ps();
        let apps = ps["apps"].as_array().cloned().unwrap_or_default();
        apps.len() == names.len() && apps.iter().all(|a| a["phase"] == "running" && a["pid"].is_i64())
    };
    sb.apply(&state(0));
    wait_for(Duration::from_secs(60), "first start", || settled(&sb).then_some(()));
    let run = sb.run_dir().to_string_lossy().into_owned();
    let (mut lost, mut dups, mut shims, mut mounts, mut cgroups, mut restarted) = (0, 0, 0, 0, 0, 0);
    let t0 = Instant::now();
    let mut done = 0;
    let mut rng = rand::thread_rng();
    while done < rounds && t0.elapsed() < budget {
        let kept: Vec<Value> = ["k0", "k1"].iter().map(|n| sb.app(n)["pid"].clone()).collect();
        let f = sb.dir.path().join("apps.toml");
        std::fs::write(&f, state(done + 1)).unwrap();
        let mut apply = sb.cmd(&["apply", "-f", f.to_str().unwrap()]).stdout(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        sb.kill_agent();
        let _ = apply.wait();
        sb.start_agent();
        // The state on disk may be the old or the new one: either is fine, as
        // long as what it says runs.
        if !eventually(Duration::from_secs(30), || settled(&sb)) {
            let ps = sb.ps();
            if std::env::var_os("KILL9_VERBOSE").is_some() {
                for a in ps["apps"].as_array().into_iter().flatten() {
                    println!("  round {done}: {} {} {}", a["name"], a["phase"], a["last_error"]);
                }
            }
            lost += ps["apps"]
                .as_array()
                .map_or(names.len(), |a| names.len() - a.iter().filter(|a| a["phase"] == "running").count());
        }
        for (n, before) in ["k0", "k1"].iter().zip(&kept) {
            if sb.app(n)["pid"] != *before {
                restarted += 1;
            }
        }
        for n in names {
            let procs =
                std::fs::read_to_string(sb.cgroup_file("pids", n, "cgroup.procs")).unwrap_or_default();
            if procs.lines().count() > 1 {
                dups += 1;
            }
        }
        let shim_count = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|p| {
                let c = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                let c = String::from_utf8_lossy(&c);
                c.contains("\0shim\0") && c.contains(&run)
            })
            .count();
        shims += shim_count.saturating_sub(names.len());
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let m = info
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&run) && p.ends_with("/rootfs")))
            .count();
        mounts += m.saturating_sub(names.len());
        let cg =
            sb.cgroup_file("pids", "x", "cgroup.procs").parent().unwrap().parent().unwrap().to_path_buf();
        let c =
            std::fs::read_dir(&cg).map(|d| d.flatten().filter(|e| e.path().is_dir()).count()).unwrap_or(0);
        cgroups += c.saturating_sub(names.len());
        done += 1;
    }
    println!("kill -9 during apply: {done} rounds in {:.0?} (4 apps, 2 replaced per round)", t0.elapsed());
    println!("  lost apps {lost}, duplicate containers {dups}, leaked shims {shims}, leaked rootfs mounts {mounts}, leaked cgroups {cgroups}, kept apps restarted {restarted}");
}

/// `n` apps applied at once: how long until all run, and how `ps` answers meanwhile.
fn storm(n: usize) {
    let mut sb = Sandbox::new();
    sb.start_agent();
    let mut toml = String::new();
    for i in 0..n {
        toml.push_str(&format!(
            "[[app]]\nname = \"storm-{i:04}\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"100000\"]\nstop_grace = \"0s\"\n"
        ));
    }
    let t = Instant::now();
    sb.apply(&toml);
    let mut ps_ms = Vec::new();
    let all_running = loop {
        let q = Instant::now();
        let ps = sb.ps();
        ps_ms.push(q.elapsed().as_secs_f64() * 1000.0);
        let apps = ps["apps"].as_array().unwrap();
        let running = apps.iter().filter(|a| a["phase"] == "running").count();
        if running == n {
            break t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(900), "only {running} of {n} running after 15 min");
        std::thread::sleep(Duration::from_millis(200));
    };
    let (med, p95, _) = stats(ps_ms.clone());
    let max = ps_ms.iter().cloned().fold(0.0, f64::max);
    println!("storm: {n} apps applied at once");
    println!(
        "  apply -> all running: {:.1} s ({:.1} ms per app)",
        all_running.as_secs_f64(),
        all_running.as_secs_f64() * 1000.0 / n as f64
    );
    println!(
        "  `skiff ps` during the start ({} calls): median {med:.1} ms, p95 {p95:.1} ms, max {max:.1} ms",
        ps_ms.len()
    );
    let t = Instant::now();
    sb.apply("");
    wait_for(Duration::from_secs(600), "every app removed", || {
        sb.ps()["apps"].as_array().unwrap().is_empty().then_some(())
    });
    println!("  removing all: {:.1} s\n", t.elapsed().as_secs_f64());
}

fn wait_file(p: &Path, timeout: Duration) -> Duration {
    let t = Instant::now();
    while !p.exists() {
        assert!(t.elapsed() < timeout, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_micros(200));
    }
    t.elapsed()
}

fn start_latency() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    let mark = sb.dir.path().join("mark");
    std::fs::create_dir_all(&mark).unwrap();
    let up = mark.join("up");
    let mut bundle: Option<Value> = None;
    // `extra`: TOML lines for the app (the seccomp setting).
    let mut measure = |extra: &str| -> Vec<f64> {
        let app = |i: usize| {
            format!(
                "[[app]]\nname = \"bench\"\nimage = \"busybox:1\"\ncommand = [\"sh\", \"-c\", \"touch /mark/up; exec sleep 600\"]\nenv = {{ RUN = \"{i}\" }}\nstop_grace = \"0s\"\nmounts = [{{ source = \"{}\", target = \"/mark\" }}]\n{extra}",
                mark.display()
            )
        };
        let mut times = Vec::new();
        for i in 0..RUNS + 1 {
            sb.apply("");
            wait_for(Duration::from_secs(20), "no app", || {
                sb.ps()["apps"].as_array().unwrap().is_empty().then_some(())
            });
            let _ = std::fs::remove_file(&up);
            let t = Instant::now();
            sb.apply(&app(i));
            wait_file(&up, Duration::from_secs(20));
            if i > 0 {
                times.push(t.elapsed().as_secs_f64() * 1000.0); // the first run warms caches
            }
            if bundle.is_none() {
                let a = sb.wait_running("bench");
                let _ = a;
                bundle = find_bundle(&sb.run_dir());
            }
        }
        times
    };
    let skiff = measure("");
    let unconfined = measure("[app.security]\nseccomp = \"unconfined\"\n");
    sb.apply("");

    // runc on the same rootfs, command and bind mount.
    let mut spec = bundle.expect("skiff's bundle config");
    let dir = sb.dir.path().join("runc");
    std::fs::create_dir_all(&dir).unwrap();
    let image_rootfs = image_rootfs(&sb);
    spec["root"] = serde_json::json!({"path": image_rootfs, "readonly": true});
    spec["linux"]["cgroupsPath"] = Value::from(format!("/{}/runc", sb.cgroup_root));
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let state = dir.join("state");
    let mut runc = Vec::new();
    for i in 0..RUNS + 1 {
        let _ = std::fs::remove_file(&up);
        let id = format!("bench-runc-{i}");
        let t = Instant::now();
        let st = Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(["run", "-d", "--bundle"])
            .arg(&dir)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .expect("runc (apt install runc)");
        assert!(st.success(), "runc run failed");
        wait_file(&up, Duration::from_secs(20));
        if i > 0 {
            runc.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let _ = Command::new("runc").arg("--root").arg(&state).args(["delete", "-f", &id]).status();
    }
    let (sm, sp, smin) = stats(skiff);
    let (um, up95, umin) = stats(unconfined);
    let (rm, rp, rmin) = stats(runc);
    println!("container start, desired state -> process running (ms)");
    println!(
        "  {:<44} median {sm:7.1}  p95 {sp:7.1}  min {smin:7.1}",
        "skiff apply -> running (seccomp default)"
    );
    println!(
        "  {:<44} median {um:7.1}  p95 {up95:7.1}  min {umin:7.1}",
        "skiff apply -> running (seccomp unconfined)"
    );
    println!(
        "  {:<44} median {rm:7.1}  p95 {rp:7.1}  min {rmin:7.1}",
        "runc run -d, same rootfs and command"
    );
    println!("  ratio skiff / runc (median): {:.2}\n", sm / rm);
}

fn find_bundle(run: &Path) -> Option<Value> {
    let apps = run.join("apps/bench");
    for e in std::fs::read_dir(apps).ok()?.flatten() {
        if let Ok(b) = std::fs::read(e.path().join("bundle/config.json")) {
            return serde_json::from_slice(&b).ok();
        }
    }
    None
}

fn image_rootfs(sb: &Sandbox) -> PathBuf {
    let root = sb.state_dir().join("images/rootfs");
    std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("bin/busybox").exists())
        .expect("unpacked busybox rootfs")
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Pss:").map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

fn memory() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    let apps: String = (0..10).map(|i| format!("[[app]]\nname = \"idle-{i}\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"3600\"]\nstop_grace = \"0s\"\n")).collect();
    sb.apply(&apps);
    for i in 0..10 {
        sb.wait_running(&format!("idle-{i}"));
    }
    std::thread::sleep(Duration::from_secs(3));
    let agent = pss_kib(sb.agent_pid().unwrap());
    let shims = shim_pids(&sb);
    let shim_total: u64 = shims.iter().map(|p| pss_kib(*p)).sum();
    println!("memory, idle with 10 running apps (PSS, KiB)");
    println!("  agent                      {agent:8}");
    println!(
        "  shims ({:2})                 {shim_total:8}  ({} each on average)",
        shims.len(),
        shim_total / shims.len().max(1) as u64
    );
    println!(
        "  total                      {:8}  ({:.1} MiB)\n",
        agent + shim_total,
        (agent + shim_total) as f64 / 1024.0
    );
    sb.apply("");
}

/// Pids of the shims of `sb`'s containers.
fn shim_pids(sb: &Sandbox) -> Vec<u32> {
    let needle = sb.run_dir().to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let c = String::from_utf8_lossy(&c);
            c.contains("\0shim\0") && c.contains(&needle)
        })
        .collect()
}

/// utime + stime of `pid` in clock ticks (0 once it is gone).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(end) = stat.rfind(')') else { return 0 };
    // Fields after the command name start at field 3 (state): utime is 14, stime 15.
    let f: Vec<&str> = stat[end + 2..].split(' ').collect();
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(14) + n(15)
}

/// Time on a CPU of `pid` in nanoseconds, summed over its threads
/// (/proc/<pid>/task/*/schedstat): finer than the clock ticks of `cpu_ticks`,
/// which an idle window may not reach. Threads that end take theirs along.
fn run_ns(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split(' ').next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// Context switches (voluntary, involuntary) summed over the threads of `pid`:
/// each voluntary one is a wake-up after a sleep.
fn ctxt_switches(pid: u32) -> (u64, u64) {
    let mut out = (0, 0);
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in status.lines() {
            let v = |p: &str| l.strip_prefix(p).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
            out.0 += v("voluntary_ctxt_switches:");
            out.1 += v("nonvoluntary_ctxt_switches:");
        }
    }
    out
}

fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split(' ').take(3).collect::<Vec<_>>().join(" ")
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// One idle window: CPU of the agent and of the shims, the agent's wake-ups.
struct Idle {
    agent_ms: f64,
    shims_ms: f64,
    /// The same from schedstat, in microseconds.
    agent_us: f64,
    shims_us: f64,
    agent_wakeups: u64,
    window: Duration,
    load_before: String,
    load_after: String,
}

impl Idle {
    fn measure(sb: &Sandbox, window: Duration) -> Idle {
        let hz = clock_ticks_per_second() as f64;
        let agent = sb.agent_pid().unwrap();
        let shims = shim_pids(sb);
        let load_before = loadavg();
        let a0 = cpu_ticks(agent);
        let s0: u64 = shims.iter().map(|p| cpu_ticks(*p)).sum();
        let an0 = run_ns(agent);
        let sn0: u64 = shims.iter().map(|p| run_ns(*p)).sum();
        let w0 = ctxt_switches(agent).0;
        let t = Instant::now();
        std::thread::sleep(window);
        let a1 = cpu_ticks(agent);
        let s1: u64 = shims.iter().map(|p| cpu_ticks(*p)).sum();
        let an1 = run_ns(agent);
        let sn1: u64 = shims.iter().map(|p| run_ns(*p)).sum();
        let w1 = ctxt_switches(agent).0;
        let window = t.elapsed();
        Idle {
            agent_ms: (a1 - a0) as f64 * 1000.0 / hz,
            shims_ms: s1.saturating_sub(s0) as f64 * 1000.0 / hz,
            agent_us: an1.saturating_sub(an0) as f64 / 1000.0,
            shims_us: sn1.saturating_sub(sn0) as f64 / 1000.0,
            agent_wakeups: w1 - w0,
            window,
            load_before,
            load_after: loadavg(),
        }
    }

    fn total_ms(&self) -> f64 {
        self.agent_ms + self.shims_ms
    }

    fn total_us(&self) -> f64 {
        self.agent_us + self.shims_us
    }

    fn print(&self, what: &str) {
        let secs = self.window.as_secs_f64();
        println!(
            "  {what:8} agent+shims {:9.0} us CPU in {secs:.0} s = {:.4}% of a core (agent {:.0} us, shims {:.0} us); \
             utime+stime {:.0} ms (agent {:.0}, shims {:.0}); agent wake-ups {} ({:.1}/s); load {} -> {}",
            self.total_us(),
            self.total_us() / secs / 1e4,
            self.agent_us,
            self.shims_us,
            self.total_ms(),
            self.agent_ms,
            self.shims_ms,
            self.agent_wakeups,
            self.agent_wakeups as f64 / secs,
            self.load_before,
            self.load_after,
        );
    }
}

/// Idle CPU with `n` apps the agent started, then with the same apps adopted
/// by a new agent after the first was SIGKILLed.
fn adopted() {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let n = env("SKIFF_BENCH_APPS", 100) as usize;
    let window = Duration::from_secs(env("SKIFF_BENCH_IDLE_SECS", 60));
    // Past tokio's 10 s keep-alive of blocking-pool threads, whose time would go with them.
    let settle = Duration::from_secs(12);
    let mut sb = Sandbox::new();
    sb.start_agent();
    let apps: String = (0..n)
        .map(|i| {
            format!("[[app]]\nname = \"idle-{i:03}\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"100000\"]\nstop_grace = \"0s\"\n")
        })
        .collect();
    sb.apply(&apps);
    let all_running = |sb: &Sandbox| -> Option<Vec<i64>> {
        let ps = sb.ps();
        let apps = ps["apps"].as_array().unwrap();
        let pids: Vec<i64> =
            apps.iter().filter(|a| a["phase"] == "running").filter_map(|a| a["pid"].as_i64()).collect();
        (pids.len() == n).then_some(pids)
    };
    let mut pids = wait_for(Duration::from_secs(600), "every app running", || all_running(&sb));
    std::thread::sleep(settle);
    println!("idle CPU with {n} apps, started vs adopted ({} s window each)", window.as_secs());
    let started = Idle::measure(&sb, window);
    started.print("started");
    sb.kill_agent();
    sb.start_agent();
    let mut adopted_pids = wait_for(Duration::from_secs(600), "every app adopted", || all_running(&sb));
    pids.sort_unstable();
    adopted_pids.sort_unstable();
    assert_eq!(pids, adopted_pids, "the new agent restarted apps instead of adopting them");
    std::thread::sleep(settle);
    let adopted = Idle::measure(&sb, window);
    adopted.print("adopted");
    // One clock tick is the resolution: a 0 ms figure reads as "under a tick".
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { format!("{a:.0} ms / 0 ms") };
    println!(
        "  ratio adopted/started: agent+shims {:.2} (schedstat), {} (utime+stime); agent {:.2}; wake-ups {:.2}\n",
        adopted.total_us() / started.total_us().max(1.0),
        ratio(adopted.total_ms(), started.total_ms()),
        adopted.agent_us / started.agent_us.max(1.0),
        adopted.agent_wakeups as f64 / started.agent_wakeups.max(1) as f64,
    );
    sb.apply("");
    wait_for(Duration::from_secs(600), "every app removed", || {
        sb.ps()["apps"].as_array().unwrap().is_empty().then_some(())
    });
}

fn sizes() {
    println!("stripped release binaries (bytes)");
    let t = repo().join("target");
    for (label, p) in [
        ("x86_64 skiff", t.join("release/skiff")),
        ("x86_64 skiffctl", t.join("release/skiffctl")),
        ("aarch64-musl skiff", t.join("cross/aarch64-unknown-linux-musl/skiff")),
        ("aarch64-musl skiffctl", t.join("cross/aarch64-unknown-linux-musl/skiffctl")),
        ("armv7-gnueabihf skiff", t.join("cross/armv7-unknown-linux-gnueabihf/skiff")),
        ("armv7-gnueabihf skiffctl", t.join("cross/armv7-unknown-linux-gnueabihf/skiffctl")),
    ] {
        match std::fs::metadata(&p) {
            Ok(m) => {
                println!("  {label:<24} {:>10}  ({:.2} MiB)", m.len(), m.len() as f64 / (1 << 20) as f64)
            }
            Err(_) => println!("  {label:<24} {:>10}  (not built: cross/build.sh)", "-"),
        }
    }
}

/// Instructions callgrind counts for `reconcile_pass <args>`.
fn callgrind(args: &[&str]) -> u64 {
    let exe = repo().join("target/release/reconcile_pass");
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.path().display()))
        .arg(&exe)
        .args(args)
        .output()
        .expect("valgrind (apt install valgrind)");
    assert!(out.status.success(), "callgrind: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no instruction count in: {err}"))
}

fn reconcile() {
    let st = Command::new(env!("CARGO"))
        .args(["build", "--release", "-q", "-p", "skiff-tests", "--bin", "reconcile_pass"])
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(st.success());
    const N: u64 = 20;
    let n = N.to_string();
    let steady = (callgrind(&["steady", &n]) - callgrind(&["steady", "0"])) / N;
    let changed = (callgrind(&["changed", &n]) - callgrind(&["setup", &n])) / N;
    println!("one reconcile pass, 50 apps with liveness and readiness probes (callgrind, instructions)");
    println!("  nothing changed (same desired state + tick)  {steady:>10}");
    println!("  every app changed (50 stops)                 {changed:>10}\n");
}

/// On the emulated aarch64 board (QEMU, see `skiff_tests::board`), state on its virtio disk:
/// cold boots with 5 idle apps in the stored desired state. Boot -> all 5 apps running (guest
/// uptime when `skiff ps` first shows them all running) and the PSS of the agent and its
/// shims, idle, 3 s later.
fn board() {
    use skiff_tests::board::{run_guest_with, Disk, GuestRun, GUEST_LIB};
    const BOOTS: usize = 5;
    const APPS: usize = 5;
    let script = [
        GUEST_LIB,
        r#"
set -u
if [ ! -f /var/lib/skiff/desired.skf ]; then
    skiff image load /images/busybox >/dev/null || exit 1
    for i in 0 1 2 3 4; do
        printf '[[app]]\nname = "idle-%s"\nimage = "busybox:1"\ncommand = ["sleep", "3600"]\n' $i
        printf 'stop_grace = "0s"\n\n'
    done >/tmp/apps.toml
    skiff apply -f /tmp/apps.toml >/dev/null || exit 1
    exit 0
fi
echo "AGENT-START: $(up)"
start_agent
if wait_running 5 60; then echo "ALL-RUNNING: $(up)"; else agent_log; exit 1; fi
sleep 3
pss() { awk '/^Pss:/ { print $2 }' "/proc/$1/smaps_rollup"; }
echo "PSS-AGENT: $(pss "$AGENT_PID")"
n=0 total=0
for d in /proc/[0-9]*; do
    case " $(tr '\0' ' ' <"$d/cmdline" 2>/dev/null)" in
        *" shim "*) n=$((n + 1)); total=$((total + $(pss "${d#/proc/}"))) ;;
    esac
done
echo "PSS-SHIMS: $n $total"
"#,
    ]
    .concat();
    let disk = Disk::new(64);
    let boot = || {
        let out = run_guest_with(&GuestRun {
            disk: Some(disk.path()),
            quiet: true,
            ..GuestRun::new(&script, Duration::from_secs(120))
        });
        out.assert_success();
        out
    };
    boot(); // loads the image and stores the apps
    let (mut up, mut agent_up, mut agent, mut shims) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..BOOTS {
        let out = boot();
        let all = out.expect_f64("ALL-RUNNING: ");
        up.push(all);
        agent_up.push(all - out.expect_f64("AGENT-START: "));
        agent.push(out.expect_f64("PSS-AGENT: "));
        let s: Vec<f64> = out.expect_value("PSS-SHIMS: ").split(' ').map(|v| v.parse().unwrap()).collect();
        assert_eq!(s[0] as usize, APPS, "one shim per app\n{}", out.transcript());
        shims.push(s[1]);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (um, umin, umax) = median(&mut up);
    let (am, amin, amax) = median(&mut agent_up);
    let (pa, pm) = (median(&mut agent).0, median(&mut shims).0);
    println!("ARM board (QEMU aarch64 cortex-a53, 2 CPUs, 512 MiB), {APPS} idle apps, {BOOTS} cold boots");
    println!(
        "  {:<40} median {um:6.2}  min {umin:6.2}  max {umax:6.2}",
        "boot -> all apps running (guest s)"
    );
    println!(
        "  {:<40} median {am:6.2}  min {amin:6.2}  max {amax:6.2}",
        "agent start -> all apps running (s)"
    );
    println!("  memory, idle (PSS, KiB, median)");
    println!("    agent                    {pa:8.0}");
    println!("    shims ({APPS})                {pm:8.0}  ({:.0} each)", pm / APPS as f64);
    println!("    total                    {:8.0}  ({:.1} MiB)\n", pa + pm, (pa + pm) / 1024.0);
}
