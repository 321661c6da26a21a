//! Removed apps leave nothing behind, and running out of processes or threads
//! fails starts (StartFailed, retried) without ever aborting the agent.

use skiff_agent::image::ImageStore;
use skiff_agent::paths::Paths;
use skiff_agent::runtime::{Runtime, RuntimeError};
use skiff_common::AppName;
use skiff_tests::agent::{alive, eventually, wait_for, Sandbox};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const TWO: &str = r#"
[[app]]
name = "gone"
image = "busybox:1"
command = ["sh", "-c", "echo hi; exec sleep 600"]
stop_grace = "500ms"

[[app]]
name = "kept"
image = "busybox:1"
command = ["sh", "-c", "echo here; exec sleep 600"]
"#;

const KEPT: &str = r#"
[[app]]
name = "kept"
image = "busybox:1"
command = ["sh", "-c", "echo here; exec sleep 600"]
"#;

#[test]
fn remove_app_files_leaves_nothing_of_a_removed_app() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    sb.apply(TWO);
    sb.wait_running("gone");
    sb.wait_running("kept");
    wait_for(Duration::from_secs(10), "output", || {
        (sb.logs("gone").contains("hi") && sb.logs("kept").contains("here")).then_some(())
    });
    let paths = Paths::new(
        Some(sb.state_dir()),
        Some(sb.run_dir()),
        Some(sb.log_dir()),
        Some(sb.cgroup_root.clone()),
    );
    let images = Arc::new(ImageStore::open(&paths.images()).unwrap());
    let rt = Runtime::new(paths.clone(), images, 1 << 20).unwrap();
    let gone = AppName::try_from("gone").unwrap();
    // While it runs, nothing of it is touched.
    assert!(matches!(rt.remove_app_files(&gone), Err(RuntimeError::Busy(..))));
    assert!(sb.log_dir().join("gone.log").exists());

    sb.apply(KEPT);
    wait_for(Duration::from_secs(20), "gone to be removed", || sb.app("gone").is_null().then_some(()));
    // The agent forgot its last instance: the app's run directory went with it.
    assert!(
        wait_for(Duration::from_secs(5), "apps/gone to go", || (!paths.apps().join("gone").exists())
            .then_some(true)),
        "apps/gone remains"
    );
    // A leftover of an instance an earlier agent lost track of, and an old rotated log.
    let stale = paths.apps().join("gone/7");
    std::fs::create_dir_all(stale.join("rootfs")).unwrap();
    std::fs::write(stale.join("shim.json"), "{}").unwrap();
    std::fs::write(sb.log_dir().join("gone.log.1"), "old\n").unwrap();

    rt.remove_app_files(&gone).unwrap();
    let left: Vec<PathBuf> =
        [paths.apps().join("gone"), sb.log_dir().join("gone.log"), sb.log_dir().join("gone.log.1")]
            .into_iter()
            .filter(|p| p.exists())
            .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // Nothing of the other app went.
    assert!(sb.logs("kept").contains("here"));
    assert!(paths.apps().join("kept").exists());
    assert_eq!(sb.app("kept")["phase"], "running");
    // Idempotent: nothing to remove is fine.
    rt.remove_app_files(&gone).unwrap();
}

/// `text` without ANSI colour sequences (the agent's log may carry them).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A pids cgroup for the agent alone, removed (the agent moved out) on drop.
struct PidsCage {
    dir: PathBuf,
    parent_procs: PathBuf,
    pid: u32,
}

impl PidsCage {
    fn new(name: &str, pid: u32) -> PidsCage {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let root = if v2 { PathBuf::from("/sys/fs/cgroup") } else { PathBuf::from("/sys/fs/cgroup/pids") };
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        PidsCage { dir, parent_procs: root.join("cgroup.procs"), pid }
    }

    /// No room for one more process or thread than the agent has now.
    fn close(&self) {
        let now = std::fs::read_to_string(self.dir.join("pids.current")).unwrap();
        std::fs::write(self.dir.join("pids.max"), now.trim()).unwrap();
    }

    fn open(&self) {
        std::fs::write(self.dir.join("pids.max"), "max").unwrap();
    }
}

impl Drop for PidsCage {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("pids.max"), "max");
        let _ = std::fs::write(&self.parent_procs, self.pid.to_string());
        // Shims the agent forked while caged are in it too: out with them, or
        // the directory cannot go.
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(&self.parent_procs, pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn pid_exhaustion_fails_starts_and_never_aborts_the_agent() {
    let mut sb = Sandbox::new();
    sb.agent_args = vec!["--backoff-base".into(), "200ms".into(), "--backoff-max".into(), "1s".into()];
    sb.start_agent();
    sb.apply(TWO);
    let g = sb.wait_running("gone");
    let agent = sb.agent_pid().unwrap();
    let cage = PidsCage::new(&format!("{}-agent", sb.cgroup_root), agent);
    cage.close();
    // Stopping "gone" and starting "late" while the agent can create neither
    // a thread nor a process. (No rollback: the failed start of "late" would
    // otherwise send the board back to the generation with "gone".)
    sb.apply(&format!(
        "[rollout]\nrollback = false\n{KEPT}\n[[app]]\nname = \"late\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"600\"]\n"
    ));
    let failed = eventually(Duration::from_secs(20), || {
        plain(&sb.agent_log()).lines().any(|l| l.contains("start failed app=late "))
    });
    assert!(failed, "late's start did not fail\n{}", sb.agent_log());
    wait_for(Duration::from_secs(20), "gone to be stopped", || sb.app("gone").is_null().then_some(()));
    assert!(!alive(g["pid"].as_i64().unwrap()), "gone still runs");
    assert!(alive(agent as i64), "the agent died\n{}", sb.agent_log());
    assert_eq!(sb.app("kept")["phase"], "running", "kept was disturbed");
    // Room again: the failed start is retried and succeeds.
    cage.open();
    sb.wait_running("late");
    assert!(alive(agent as i64));
    assert!(!sb.agent_log().contains("panicked"), "{}", sb.agent_log());
}

/// Threads of `pid` now (0 once it is gone).
fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn stopping_fifty_apps_at_once_takes_no_thread_per_stop() {
    const N: usize = 50;
    const GRACE: Duration = Duration::from_secs(3);
    let mut sb = Sandbox::new();
    sb.start_agent();
    // `sleep` as a container's init has no SIGTERM handler, so the kernel
    // ignores SIGTERM for it: every stop lasts its grace period, then SIGKILL.
    let toml: String = (0..N)
        .map(|i| {
            format!(
                "[[app]]\nname = \"s-{i:02}\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"600\"]\nstop_grace = \"{}s\"\n",
                GRACE.as_secs()
            )
        })
        .collect();
    sb.apply(&toml);
    wait_for(Duration::from_secs(300), "every app running", || {
        let ps = sb.ps();
        let apps = ps["apps"].as_array().unwrap();
        (apps.iter().filter(|a| a["phase"] == "running").count() == N).then_some(())
    });
    let agent = sb.agent_pid().unwrap();
    // Blocking-pool threads of the start linger for tokio's 10 s keep-alive.
    std::thread::sleep(Duration::from_secs(11));
    let idle = threads(agent);
    let t = std::time::Instant::now();
    sb.apply("");
    // Until the grace period ends only the stops run: SIGTERM to 50 inits,
    // then waiting for their exits.
    let mut in_grace = 0;
    while t.elapsed() < GRACE - Duration::from_millis(300) {
        in_grace = in_grace.max(threads(agent));
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut overall = in_grace;
    wait_for(Duration::from_secs(120), "every app removed", || {
        overall = overall.max(threads(agent));
        sb.ps()["apps"].as_array().unwrap().is_empty().then_some(())
    });
    eprintln!("agent threads: idle {idle}, peak during the grace period {in_grace}, peak until all removed {overall}");
    // A few blocking-pool threads serve the apply itself (the state file);
    // a thread per signal would be dozens (32 at the peak when it was so).
    assert!(in_grace <= idle + 8, "{N} stops took threads: {idle} idle, {in_grace} while stopping");
}
