//! The board keeps its headroom: the parent cgroup of all apps is limited to
//! MemTotal minus `--reserve-memory`, so an app with no memory limit of its
//! own that allocates without bound is OOM-killed there while the agent keeps
//! answering. The reserve is made so large here that apps get only 64 MiB,
//! which keeps the test safe on a big machine.

use skiff_tests::agent::Sandbox;
use std::path::{Path, PathBuf};
use std::time::Duration;

const APPS_BUDGET: u64 = 64 << 20;

fn mem_total() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("MemTotal in /proc/meminfo");
    kb * 1024
}

fn v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A file of the parent cgroup of all the sandbox's apps.
fn parent_file(sb: &Sandbox, controller: &str, file: &str) -> PathBuf {
    let base = Path::new("/sys/fs/cgroup");
    if v2() {
        base.join(&sb.cgroup_root).join(file)
    } else {
        base.join(controller).join(&sb.cgroup_root).join(file)
    }
}

fn read_u64(p: &Path) -> u64 {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    text.trim().parse().unwrap_or_else(|e| panic!("{}: {text:?}: {e}", p.display()))
}

#[test]
fn an_app_without_a_limit_is_stopped_by_the_reserve_and_the_agent_answers() {
    let total = mem_total();
    let mut sb = Sandbox::new();
    // MemTotal is a multiple of 1 KiB; the budget is whole pages when MemTotal is.
    let reserve = total - APPS_BUDGET;
    sb.agent_args =
        vec!["--reserve-memory".into(), reserve.to_string(), "--reserve-pids".into(), "1000".into()];
    sb.start_agent();

    let mem_file = if v2() { "memory.max" } else { "memory.limit_in_bytes" };
    let limit = read_u64(&parent_file(&sb, "memory", mem_file));
    let page = 4096;
    assert_eq!(limit, (total - reserve) / page * page, "the parent's {mem_file}");
    let pid_capacity = std::cmp::min(
        read_u64(Path::new("/proc/sys/kernel/pid_max")),
        read_u64(Path::new("/proc/sys/kernel/threads-max")),
    );
    assert_eq!(read_u64(&parent_file(&sb, "pids", "pids.max")), pid_capacity - 1000);

    let ps = sb.ps();
    let h = &ps["headroom"];
    assert_eq!(h["reserve_memory"], reserve, "{ps}");
    assert_eq!(h["apps_memory"], limit, "{ps}");
    assert_eq!(h["reserve_pids"], 1000, "{ps}");
    assert_eq!(h["cgroup"], format!("/{}", sb.cgroup_root), "{ps}");
    let text = String::from_utf8_lossy(&sb.skiff(&["ps"]).stdout).into_owned();
    assert!(text.contains("reserve ") && text.contains(&format!("apps {}MiB", limit >> 20)), "{text}");

    // The string doubles until the shell cannot hold it: no limit of its own.
    sb.apply(
        r#"
[[app]]
name = "hog"
image = "busybox:1"
command = ["sh", "-c", "x=a; while :; do x=$x$x; done"]
restart = "never"
"#,
    );
    let app_limit = sb.cgroup_file("memory", "hog", mem_file);
    let a = sb.wait_app("hog", Duration::from_secs(60), "exited", |a| {
        // While the hog grows the agent keeps answering (each poll is a `skiff ps`).
        if let Ok(text) = std::fs::read_to_string(&app_limit) {
            let own: u64 = text.trim().parse().unwrap_or(0);
            assert!(own == 0 || own >= limit, "the hog got a limit of its own: {own}");
        }
        a["phase"] == "exited"
    });
    assert_eq!(a["last_exit"]["oom_killed"], true, "{a}");
    assert_eq!(a["last_exit"]["signal"], 9, "{a}");
    let ps = sb.skiff(&["ps"]);
    assert!(ps.status.success());
    assert!(String::from_utf8_lossy(&ps.stdout).contains("oom-killed"));
    // The agent is alive and still answers after the kill.
    assert!(sb.agent_pid().is_some_and(|p| skiff_tests::agent::alive(p as i64)));
    assert_eq!(sb.ps()["headroom"]["apps_memory"], limit);
    // The kill was the parent's: its OOM counter moved too (v2 hierarchical
    // memory.events; v1 counts under_oom at the parent's limit).
    if v2() {
        let events = std::fs::read_to_string(parent_file(&sb, "memory", "memory.events")).unwrap();
        assert!(events.lines().any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"), "{events}");
    } else {
        let failcnt = read_u64(&parent_file(&sb, "memory", "memory.failcnt"));
        assert!(failcnt > 0, "the parent's limit was never hit");
    }

    // A restarted agent with the same settings keeps the limit as it is.
    sb.stop_agent();
    sb.start_agent();
    assert_eq!(read_u64(&parent_file(&sb, "memory", mem_file)), limit);
}

#[test]
fn default_app_memory_applies_to_apps_without_a_limit() {
    let mut sb = Sandbox::new();
    sb.agent_args = vec!["--default-app-memory".into(), "48Mi".into()];
    sb.start_agent();
    sb.apply(
        r#"
[[app]]
name = "plain"
image = "busybox:1"
command = ["sleep", "600"]

[[app]]
name = "own"
image = "busybox:1"
command = ["sleep", "600"]
[app.resources]
memory = "32Mi"
"#,
    );
    sb.wait_running("plain");
    sb.wait_running("own");
    let file = if v2() { "memory.max" } else { "memory.limit_in_bytes" };
    assert_eq!(read_u64(&sb.cgroup_file("memory", "plain", file)), 48 << 20);
    assert_eq!(read_u64(&sb.cgroup_file("memory", "own", file)), 32 << 20);
    assert_eq!(sb.ps()["headroom"]["default_app_memory"], 48u64 << 20);
}

#[test]
fn a_reserve_larger_than_the_board_is_a_config_error() {
    let sb = Sandbox::new();
    let big = (mem_total() + (1 << 20)).to_string();
    let out = sb.skiff(&["agent", "--reserve-memory", &big]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--reserve-memory") && err.contains("MemTotal"), "{err}");
    let out = sb.skiff(&["agent", "--reserve-pids", "99999999"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    // Nothing was created for the apps.
    assert!(!parent_file(&sb, "memory", "cgroup.procs").exists());
}
