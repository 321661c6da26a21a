//! Resource limits on real containers: memory (OOM kill reported), CPU quota
//! (measured from the cgroup), pids, and the device cgroup.

use skiff_tests::agent::{wait_for, Sandbox};
use std::time::{Duration, Instant};

#[test]
fn memory_limit_oom_kill_is_reported() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    sb.apply(
        r#"
[[app]]
name = "hog"
image = "busybox:1"
command = ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]
restart = "never"
[app.resources]
memory = "32Mi"
"#,
    );
    let a = sb.wait_app("hog", Duration::from_secs(30), "exited", |a| a["phase"] == "exited");
    assert_eq!(a["last_exit"]["oom_killed"], true, "{a}");
    assert_eq!(a["last_exit"]["signal"], 9, "{a}");
    let ps = sb.skiff(&["ps"]);
    assert!(String::from_utf8_lossy(&ps.stdout).contains("oom-killed"));
}

#[test]
fn cpu_quota_holds_a_busy_loop_to_half_a_core() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    sb.apply(
        r#"
[[app]]
name = "spin"
image = "busybox:1"
command = ["sh", "-c", "while :; do :; done"]
[app.resources]
cpus = 0.5
"#,
    );
    sb.wait_running("spin");
    let usage_file = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        sb.cgroup_file("cpu", "spin", "cpu.stat")
    } else {
        sb.cgroup_file("cpuacct", "spin", "cpuacct.usage")
    };
    let read = || -> f64 {
        let text = std::fs::read_to_string(&usage_file).unwrap();
        match text.lines().find_map(|l| l.strip_prefix("usage_usec ")) {
            Some(us) => us.trim().parse::<f64>().unwrap() / 1e6,
            None => text.trim().parse::<f64>().unwrap() / 1e9,
        }
    };
    std::thread::sleep(Duration::from_millis(500));
    let (u0, t0) = (read(), Instant::now());
    std::thread::sleep(Duration::from_secs(4));
    let cores = (read() - u0) / t0.elapsed().as_secs_f64();
    println!("busy loop with cpus = 0.5 used {cores:.3} cores");
    assert!((0.4..=0.6).contains(&cores), "measured {cores:.3} cores");
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    sb.apply(
        r#"
[[app]]
name = "forker"
image = "busybox:1"
command = ["sh", "-c", "(for i in $(seq 40); do sleep 600 & done); echo spawned; exec sleep 600"]
[app.resources]
pids = 10
"#,
    );
    sb.wait_running("forker");
    let current = sb.cgroup_file("pids", "forker", "pids.current");
    wait_for(Duration::from_secs(20), "the fork loop to finish", || {
        sb.logs("forker").contains("spawned").then_some(())
    });
    let n: u32 = std::fs::read_to_string(&current).unwrap().trim().parse().unwrap();
    assert!(n <= 10, "pids.current = {n}");
    assert_eq!(std::fs::read_to_string(sb.cgroup_file("pids", "forker", "pids.max")).unwrap().trim(), "10");
    assert_eq!(sb.app("forker")["phase"], "running");
    assert!(sb.logs("forker").contains("can't fork"), "logs: {}", sb.logs("forker"));
}

#[test]
fn device_cgroup_allows_listed_devices_only() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    // loop0 (block 7:0) exists on the host and is not among the defaults.
    // Each outcome is a whole line of its own ("other=open", "loop0=denied"),
    // compared as a line, so no token can stand in for another.
    let probe = "mknod /tmp/l0 b 7 0; (exec 3</tmp/l0) 2>&1 && echo other=open || echo other=denied; \
                 if [ -e /dev/loop0 ]; then (exec 3</dev/loop0) && echo loop0=open || echo loop0=denied; fi; sleep 600";
    sb.apply(&format!(
        r#"
[[app]]
name = "plain"
image = "busybox:1"
command = ["sh", "-c", "{probe}"]

[[app]]
name = "withdev"
image = "busybox:1"
command = ["sh", "-c", "{probe}"]
devices = ["/dev/loop0"]
"#
    ));
    sb.wait_running("plain");
    sb.wait_running("withdev");
    let has = |log: &str, line: &str| log.lines().any(|l| l.trim_end() == line);
    let plain = wait_for(Duration::from_secs(10), "plain's output", || {
        let l = sb.logs("plain");
        (has(&l, "other=open") || has(&l, "other=denied")).then_some(l)
    });
    assert!(has(&plain, "other=denied"), "plain opened a device it does not list: {plain}");
    // loop0 is not listed for plain: not even its node exists there.
    assert!(!plain.lines().any(|l| l.starts_with("loop0=")), "plain has /dev/loop0: {plain}");
    let with = wait_for(Duration::from_secs(10), "withdev's loop0 line", || {
        let l = sb.logs("withdev");
        (has(&l, "loop0=open") || has(&l, "loop0=denied")).then_some(l)
    });
    // (Its /tmp/l0 is the same device, 7:0, so "other" may open there.)
    assert!(has(&with, "loop0=open"), "withdev cannot open its listed /dev/loop0: {with}");
}
