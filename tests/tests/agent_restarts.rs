//! Restart policies and backoff, probes, replacement of changed apps.

use skiff_tests::agent::{alive, eventually, wait_for, Sandbox};
use std::time::{Duration, Instant};

fn fast_backoff() -> Sandbox {
    let mut sb = Sandbox::new();
    sb.agent_args =
        ["--backoff-base", "300ms", "--backoff-max", "5s"].iter().map(|s| s.to_string()).collect();
    sb.start_agent();
    sb
}

#[test]
fn crashing_app_restarts_with_growing_delays() {
    let sb = fast_backoff();
    sb.apply("[[app]]\nname = \"crash\"\nimage = \"busybox:1\"\ncommand = [\"sh\", \"-c\", \"exit 3\"]\n");
    // Record when each restart is first seen.
    let mut seen: Vec<(u64, Instant)> = Vec::new();
    let end = Instant::now() + Duration::from_secs(30);
    while seen.len() < 5 && Instant::now() < end {
        let r = sb.app("crash")["restarts"].as_u64().unwrap_or(0);
        if r > 0 && seen.last().map(|s| s.0) != Some(r) {
            seen.push((r, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen.len() >= 5, "saw {seen:?}\n{}", sb.agent_log());
    let gaps: Vec<f64> = seen.windows(2).map(|w| (w[1].1 - w[0].1).as_secs_f64()).collect();
    println!("gaps between restarts: {gaps:?}");
    // Delays 0.6, 1.2, 2.4 s (+ start time): each gap clearly longer than the one before.
    for w in gaps.windows(2) {
        assert!(w[1] > w[0] * 1.4, "delays do not grow: {gaps:?}");
    }
    let a = sb.app("crash");
    assert_eq!(a["last_exit"]["code"], 3);
}

#[test]
fn never_stays_down_and_on_failure_stops_after_success() {
    let sb = fast_backoff();
    sb.apply(
        r#"
[[app]]
name = "once"
image = "busybox:1"
command = ["sh", "-c", "exit 1"]
restart = "never"

[[app]]
name = "ok"
image = "busybox:1"
command = ["sh", "-c", "exit 0"]
restart = "on-failure"

[[app]]
name = "fails"
image = "busybox:1"
command = ["sh", "-c", "exit 2"]
restart = "on-failure"
"#,
    );
    sb.wait_app("fails", Duration::from_secs(20), "restarted twice", |a| a["restarts"].as_u64() >= Some(2));
    for app in ["once", "ok"] {
        let a = sb.app(app);
        assert_eq!(a["phase"], "exited", "{a}");
        assert_eq!(a["restarts"], 0, "{a}");
    }
    assert_eq!(sb.app("once")["last_exit"]["code"], 1);
    assert_eq!(sb.app("ok")["last_exit"]["code"], 0);
}

#[test]
fn failing_liveness_probes_restart_the_app() {
    let sb = fast_backoff();
    let port = free_port();
    sb.apply(&format!(
        r#"
[[app]]
name = "http-dead"
image = "busybox:1"
command = ["sleep", "600"]
stop_grace = "1s"
[app.liveness]
http = {{ port = {port}, path = "/" }}
period = "300ms"
timeout = "200ms"
failure_threshold = 2

[[app]]
name = "tcp-dead"
image = "busybox:1"
command = ["sleep", "600"]
stop_grace = "1s"
[app.liveness]
tcp = {{ port = {port} }}
period = "300ms"
timeout = "200ms"
failure_threshold = 2

[[app]]
name = "exec-dead"
image = "busybox:1"
command = ["sleep", "600"]
stop_grace = "1s"
[app.liveness]
exec = ["cat", "/tmp/healthy"]
period = "300ms"
timeout = "300ms"
failure_threshold = 2
"#
    ));
    for app in ["http-dead", "tcp-dead", "exec-dead"] {
        let a = sb.wait_app(app, Duration::from_secs(30), "restarted by its liveness probe", |a| {
            a["restarts"].as_u64() >= Some(1)
        });
        assert!(a["last_exit"]["signal"].as_i64().is_some(), "killed by a signal: {a}");
    }
    assert!(sb.agent_log().contains("unhealthy"), "{}", sb.agent_log());
}

#[test]
fn passing_probes_keep_the_app_and_readiness_is_reported() {
    let sb = fast_backoff();
    let port = free_port();
    sb.apply(&format!(
        r#"
[[app]]
name = "web"
image = "busybox:1"
command = ["httpd", "-f", "-p", "127.0.0.1:{port}", "-h", "/var/www"]
[app.liveness]
http = {{ port = {port}, path = "/" }}
period = "300ms"
[app.readiness]
tcp = {{ port = {port} }}
period = "300ms"

[[app]]
name = "notready"
image = "busybox:1"
command = ["sleep", "600"]
[app.readiness]
exec = ["cat", "/tmp/ready"]
period = "300ms"
failure_threshold = 1
"#
    ));
    let web = sb.wait_app("web", Duration::from_secs(20), "ready", |a| a["ready"] == "passing");
    assert_eq!(web["live"], "passing", "{web}");
    let nr = sb.wait_app("notready", Duration::from_secs(20), "not ready", |a| a["ready"] == "failing");
    std::thread::sleep(Duration::from_secs(2));
    let (web, nr2) = (sb.app("web"), sb.app("notready"));
    assert_eq!(web["restarts"], 0, "{web}");
    assert_eq!(nr2["restarts"], 0, "readiness never restarts: {nr2}");
    assert_eq!(nr2["pid"], nr["pid"]);
    // Becoming ready is noticed.
    let pid = nr2["pid"].as_i64().unwrap();
    let root = format!("/proc/{pid}/root/tmp/ready");
    std::fs::write(&root, "ok").unwrap();
    sb.wait_app("notready", Duration::from_secs(10), "ready", |a| a["ready"] == "passing");
}

#[test]
fn changed_spec_replaces_and_removed_app_stops() {
    let sb = fast_backoff();
    let v1 = "[[app]]\nname = \"a\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"600\"]\nstop_grace = \"1s\"\n\n[[app]]\nname = \"b\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"600\"]\nstop_grace = \"1s\"\n";
    sb.apply(v1);
    let a1 = sb.wait_running("a");
    let b1 = sb.wait_running("b");
    // Re-applying the same file changes nothing.
    sb.apply(v1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sb.app("a")["pid"], a1["pid"]);
    let v2 =
        "[[app]]\nname = \"a\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"601\"]\nstop_grace = \"1s\"\n";
    sb.apply(v2);
    let a2 = sb.wait_app("a", Duration::from_secs(20), "replaced", |a| {
        a["phase"] == "running" && a["pid"] != a1["pid"]
    });
    assert!(a2["pid"].is_i64());
    wait_for(Duration::from_secs(20), "b to be gone", || sb.app("b").is_null().then_some(()));
    let bpid = b1["pid"].as_i64().unwrap();
    assert!(!alive(bpid), "b's process still runs");
    let gone = eventually(Duration::from_secs(5), || sb.app_cgroups("b").is_empty());
    assert!(gone, "b's cgroups remain: {:?}", sb.app_cgroups("b"));
    // The replaced container of "a" left nothing behind either: only the new one's cgroup.
    assert!(!sb.app_cgroups("a").is_empty());
}

#[test]
fn removing_apps_that_ignore_sigterm_leaves_no_cgroups() {
    let sb = fast_backoff();
    let apps: String = (0..4)
        .map(|i| format!("[[app]]\nname = \"stubborn-{i}\"\nimage = \"busybox:1\"\ncommand = [\"sh\", \"-c\", \"while true; do sleep 1; done\"]\nstop_grace = \"500ms\"\n"))
        .collect();
    for round in 0..3 {
        sb.apply(&apps);
        for i in 0..4 {
            sb.wait_running(&format!("stubborn-{i}"));
        }
        sb.apply("");
        wait_for(Duration::from_secs(20), "all apps removed", || {
            sb.ps()["apps"].as_array().unwrap().is_empty().then_some(())
        });
        for i in 0..4 {
            let app = format!("stubborn-{i}");
            let gone = eventually(Duration::from_secs(5), || sb.app_cgroups(&app).is_empty());
            assert!(gone, "round {round}: {app} left {:?}", sb.app_cgroups(&app));
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
