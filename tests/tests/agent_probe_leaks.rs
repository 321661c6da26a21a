//! Exec probes never leak: a probe that hangs and forks is killed with all its
//! children at its timeout, attempt after attempt.

use skiff_tests::agent::{alive, wait_for, Sandbox};
use std::collections::HashSet;
use std::time::Duration;

/// Live processes in `cgroup.procs` whose command line is exactly `args`.
fn pids_of(procs: &std::path::Path, args: &[&str]) -> Vec<i64> {
    let want: Vec<u8> = args.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|pid| pid.trim().parse::<i64>().ok())
        .filter(|pid| alive(*pid) && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

#[test]
fn hanging_forking_exec_probe_is_killed_with_its_children() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    // A readiness probe is only reported, never acted on: the container stays
    // and every attempt runs against the same one.
    sb.apply(
        r#"
[[app]]
name = "probed"
image = "busybox:1"
command = ["sh", "-c", "while :; do sleep 1; done"]
[app.resources]
pids = 64
[app.readiness]
exec = ["sh", "-c", "sleep 1000 & sleep 1000"]
period = "1s"
timeout = "1s"
"#,
    );
    let first = sb.wait_running("probed");
    let current = sb.cgroup_file("pids", "probed", "pids.current");
    let procs = sb.cgroup_file("pids", "probed", "cgroup.procs");
    let mut max_pids = 0;
    let mut max_sleepers = 0;
    // Each attempt starts two `sleep 1000` (the shell execs the second one),
    // told apart by pid: six attempts at least, each of which would leave two
    // processes behind.
    let mut sleepers = HashSet::new();
    wait_for(Duration::from_secs(60), "six probe attempts", || {
        let n: u64 = std::fs::read_to_string(&current).unwrap().trim().parse().unwrap();
        max_pids = max_pids.max(n);
        let now = pids_of(&procs, &["sleep", "1000"]);
        max_sleepers = max_sleepers.max(now.len());
        sleepers.extend(now);
        std::thread::sleep(Duration::from_millis(100));
        (sleepers.len() >= 12).then_some(())
    });
    // The app (sh + sleep 1) and one attempt in flight (libcontainer's setup
    // process, sh, two sleeps) at most.
    assert!(max_sleepers <= 2, "{max_sleepers} `sleep 1000` alive at once: probes leak");
    assert!(max_pids <= 7, "pids.current reached {max_pids}: probes leak");
    assert!(sb.agent_log().contains("probe timed out after 1s"), "{}", sb.agent_log());
    let a = sb.app("probed");
    assert_eq!(a["pid"], first["pid"], "the container was replaced: {a}");
    assert_eq!(a["ready"], "failing", "{a}");
}
