//! Shims do not depend on the agent: an agent killed (SIGKILL) while a shim is
//! creating a container leaves that container running under its shim, and the
//! next agent adopts it; a full run dir and log dir never kill a shim or lose
//! its exit record.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use skiff_tests::agent::{alive, wait_for, Sandbox};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const APP: &str = r#"
[[app]]
name = "born"
image = "busybox:1"
command = ["sh", "-c", "echo hello; exec sleep 600"]
"#;

/// The first `skiff shim` child of `agent`, polled as fast as possible: its
/// pid and instance dir.
fn catch_shim(agent: u32, timeout: Duration) -> Option<(i32, PathBuf)> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let tasks = std::fs::read_dir(format!("/proc/{agent}/task")).ok()?;
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
                if args.get(1) == Some(&&b"shim"[..]) {
                    let dir = PathBuf::from(String::from_utf8_lossy(args[2]).into_owned());
                    return Some((pid, dir));
                }
            }
        }
    }
    None
}

#[test]
fn agent_killed_while_a_shim_starts_leaves_the_container_to_its_shim() {
    // The shim must be caught before it has recorded the start; a fast shim
    // can win that race, so a few tries are allowed (each one reported).
    for attempt in 1..=5 {
        let mut sb = Sandbox::new();
        sb.start_agent();
        let agent = sb.agent_pid().unwrap();
        let catcher = std::thread::spawn(move || {
            let caught = catch_shim(agent, Duration::from_secs(20));
            if let Some((pid, _)) = &caught {
                kill(Pid::from_raw(*pid), Signal::SIGSTOP).unwrap();
            }
            caught
        });
        sb.apply(APP);
        let (shim, dir) = catcher.join().unwrap().expect("the agent never spawned a shim");
        if dir.join("started.json").exists() {
            println!("attempt {attempt}: the shim had already started the container; again");
            let _ = kill(Pid::from_raw(shim), Signal::SIGCONT);
            continue;
        }
        // The agent dies mid-start; a new one comes up while the shim is still
        // busy (stopped here), then the shim goes on.
        sb.kill_agent();
        sb.start_agent();
        std::thread::sleep(Duration::from_millis(300));
        kill(Pid::from_raw(shim), Signal::SIGCONT).unwrap();
        let a = sb.wait_running("born");
        let started: serde_json::Value = wait_for(Duration::from_secs(10), "started.json", || {
            serde_json::from_slice(&std::fs::read(dir.join("started.json")).ok()?).ok()
        });
        assert_eq!(a["pid"], started["init_pid"], "not the container the first shim started: {a}");
        assert_eq!(a["restarts"], 0, "{a}");
        assert!(alive(shim as i64), "the shim died\nagent log:\n{}", sb.agent_log());
        assert!(!sb.agent_log().contains("lost its shim"), "{}", sb.agent_log());
        // The shim still does its job: it logs the output and records the exit.
        wait_for(Duration::from_secs(10), "the app's output", || {
            sb.logs("born").contains("hello").then_some(())
        });
        kill(Pid::from_raw(a["pid"].as_i64().unwrap() as i32), Signal::SIGKILL).unwrap();
        let b = sb.wait_app("born", Duration::from_secs(20), "restarted", |a| {
            a["restarts"] == 1 && a["phase"] == "running"
        });
        assert_eq!(b["last_exit"]["signal"], 9, "exit not recorded by the shim: {b}");
        return;
    }
    panic!("the shim was never caught before it started the container");
}

#[test]
fn full_run_dir_and_log_dir_never_kill_a_shim_or_lose_its_exit() {
    let mut sb = Sandbox::new();
    // The run dir (and the log dir in it) is a small tmpfs, as on a board.
    std::fs::create_dir_all(sb.run_dir()).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &sb.run_dir(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m,mode=0700"),
    )
    .unwrap();
    // The log dir shares that tmpfs (a bind mount of a directory in it).
    std::fs::create_dir_all(sb.run_dir().join("logs")).unwrap();
    std::fs::create_dir_all(sb.log_dir()).unwrap();
    nix::mount::mount(
        Some(&sb.run_dir().join("logs")),
        &sb.log_dir(),
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    sb.agent_args = vec!["--log-max-size".into(), "64Mi".into()];
    sb.start_agent();
    // The container's writable layer is in the run dir too: filling its /
    // fills the tmpfs. Output while it is full is lost; space comes back, the
    // app says so, fills it again and exits 7 while it is full. (It waits
    // before filling so that its first line is surely in the log by then.)
    sb.apply(
        r#"
[[app]]
name = "filler"
image = "busybox:1"
restart = "never"
command = ["sh", "-c", "echo begin; sleep 1; dd if=/dev/zero of=/fill bs=64k 2>/dev/null; i=0; while [ $i -lt 2000 ]; do echo lost line $i; i=$((i+1)); done; sleep 1; rm /fill; sleep 0.5; echo after; dd if=/dev/zero of=/fill bs=64k 2>/dev/null; sleep 0.5; exit 7"]
"#,
    );
    let a = sb.wait_app("filler", Duration::from_secs(60), "exited", |a| a["phase"] == "exited");
    assert_eq!(a["last_exit"]["code"], 7, "exit lost or shim killed: {a}\nagent log:\n{}", sb.agent_log());
    let logs = sb.logs("filler");
    assert!(logs.starts_with("begin\n"), "{logs}");
    assert!(logs.ends_with("]\nafter\n"), "output after space came back is missing: {logs}");
    let note =
        logs.lines().find(|l| l.starts_with("[skiff: ")).unwrap_or_else(|| panic!("no drop note: {logs}"));
    let dropped: u64 = note
        .strip_prefix("[skiff: ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    assert!(
        dropped > 0 && note.ends_with(" bytes of output dropped: the log could not be written]"),
        "{note}"
    );
    assert!(!sb.agent_log().contains("shim ended without recording an exit"), "{}", sb.agent_log());
}
