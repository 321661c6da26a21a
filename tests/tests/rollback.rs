//! Rollouts on a real agent with real containers: a generation is on test
//! until it has proved itself, is rolled back by itself when an app crashes or
//! fails its liveness probe, is committed after its window, and a board that
//! keeps restarting during a test falls back to the last good generation.

use skiff_common::codec::state_file;
use skiff_tests::agent::Sandbox;
use std::time::Duration;

const GOOD: &str = r#"
[rollout]
stable = "1s"

[[app]]
name = "web"
image = "busybox:1"
command = ["sleep", "3600"]
"#;

fn rollout(sb: &Sandbox) -> serde_json::Value {
    sb.ps()["rollout"].clone()
}

fn wait_rollout(sb: &Sandbox, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = rollout(sb);
        if pred(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}; last: {r}\n{}",
            sb.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn generation_in(sb: &Sandbox, file: &str) -> u64 {
    let bytes = std::fs::read(sb.state_dir().join(file)).unwrap();
    state_file::decode(&bytes).unwrap().generation
}

fn ps_text(sb: &Sandbox) -> String {
    String::from_utf8_lossy(&sb.skiff(&["ps"]).stdout).into_owned()
}

/// The first state (trusted at once), then `bad`: rolled back to the first
/// with the reason; returns the failure as reported.
fn rolls_back(bad: &str) -> (Sandbox, serde_json::Value) {
    let mut sb = Sandbox::new();
    sb.apply(GOOD);
    sb.start_agent();
    let first = sb.wait_running("web");
    wait_rollout(&sb, "generation 1 committed", |r| r["committed"] == 1);
    sb.apply(bad);
    let r = wait_rollout(&sb, "generation 2 failed", |r| r["failed"]["generation"] == 2);
    assert_eq!(r["failed"]["rolled_back"], true, "{r}");
    assert_eq!(r["committed"], 1, "{r}");
    assert!(r["testing"].is_null(), "{r}");
    // The previous app runs again: the first generation's command, a new container.
    let back = sb.wait_app("web", Duration::from_secs(30), "back on generation 1", |a| {
        a["phase"] == "running" && a["pid"].is_i64() && a["pid"] != first["pid"]
    });
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", back["pid"])).unwrap();
    assert_eq!(String::from_utf8_lossy(&cmdline).replace('\0', " ").trim(), "sleep 3600");
    assert_eq!(sb.ps()["generation"], 1, "ps shows the generation that runs");
    (sb, r["failed"].clone())
}

#[test]
fn a_generation_whose_app_exits_1_at_once_is_rolled_back_and_ps_says_why() {
    let (sb, failed) = rolls_back(
        r#"
[rollout]
stable = "30s"

[[app]]
name = "web"
image = "busybox:1"
command = ["sh", "-c", "exit 1"]
"#,
    );
    assert_eq!(failed["app"], "web");
    assert_eq!(failed["reason"], "exited with code 1");
    let text = ps_text(&sb);
    assert!(
        text.contains("rollout: generation 2 failed its test and was rolled back to generation 1: app web exited with code 1"),
        "{text}"
    );
    // The failed generation stays the stored desired state (no ping-pong:
    // it is never run again), the last good one is generation 1.
    assert_eq!(generation_in(&sb, "desired.skf"), 2);
    assert_eq!(generation_in(&sb, "good.skf"), 1);
    assert!(sb.agent_log().contains("generation failed its test: rolling back"));
}

#[test]
fn a_generation_whose_liveness_probe_fails_is_rolled_back() {
    let (_sb, failed) = rolls_back(
        r#"
[rollout]
stable = "30s"

[[app]]
name = "web"
image = "busybox:1"
command = ["sleep", "3600"]
[app.liveness]
exec = ["cat", "/no/such/file"]
period = "500ms"
failure_threshold = 2
"#,
    );
    assert_eq!(failed["app"], "web");
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.starts_with("killed by its liveness probe"), "{reason}");
}

#[test]
fn a_healthy_generation_is_committed_after_its_window_and_kept_as_the_last_good_one() {
    let mut sb = Sandbox::new();
    sb.apply(GOOD);
    sb.start_agent();
    sb.wait_running("web");
    wait_rollout(&sb, "generation 1 committed", |r| r["committed"] == 1);
    sb.apply(&GOOD.replace("stable = \"1s\"", "stable = \"3s\"").replace("3600", "3601"));
    let r = wait_rollout(&sb, "generation 2 on test", |r| r["testing"] == 2);
    assert_eq!(r["committed"], 1);
    assert!(ps_text(&sb).contains("rollout: generation 2 on test (last good: 1)"));
    let r = wait_rollout(&sb, "generation 2 committed", |r| r["committed"] == 2);
    assert!(r["testing"].is_null() && r["failed"].is_null(), "{r}");
    // On flash: the last good state is generation 2, and (a hard link) no second copy.
    assert_eq!(generation_in(&sb, "good.skf"), 2);
    use std::os::unix::fs::MetadataExt;
    let ino = |f: &str| std::fs::metadata(sb.state_dir().join(f)).unwrap().ino();
    assert_eq!(ino("good.skf"), ino("desired.skf"));
    assert!(sb.agent_log().contains("generation passed its test: committed as the last good one"));
}

#[test]
fn a_power_cut_during_the_test_resumes_it_and_three_starts_fall_back() {
    let mut sb = Sandbox::new();
    sb.apply(GOOD);
    sb.start_agent();
    sb.wait_running("web");
    wait_rollout(&sb, "generation 1 committed", |r| r["committed"] == 1);
    // A generation whose window outlasts each boot.
    sb.apply(
        r#"
[rollout]
stable = "10m"
deadline = "20m"

[[app]]
name = "web"
image = "busybox:1"
command = ["sleep", "3602"]
"#,
    );
    wait_rollout(&sb, "generation 2 on test", |r| r["testing"] == 2);
    sb.wait_app("web", Duration::from_secs(30), "on generation 2", |a| a["phase"] == "running");
    for boot in 1..=2 {
        sb.simulate_reboot();
        sb.start_agent();
        let r = wait_rollout(&sb, "the test resumed", |r| r["testing"] == 2);
        assert_eq!(r["committed"], 1, "boot {boot}: {r}");
        let web = sb.wait_running("web");
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", web["pid"])).unwrap();
        assert_eq!(String::from_utf8_lossy(&cmdline).replace('\0', " ").trim(), "sleep 3602", "boot {boot}");
    }
    // The third boot that never finished the test: back to generation 1.
    sb.simulate_reboot();
    sb.start_agent();
    let r = wait_rollout(&sb, "generation 2 failed", |r| r["failed"]["generation"] == 2);
    assert_eq!(r["committed"], 1);
    assert_eq!(r["failed"]["rolled_back"], true);
    assert_eq!(r["failed"]["reason"], "the agent started 3 times while this generation was on test");
    assert_eq!(sb.command_of("web"), "sleep 3600");
    // A fourth boot keeps it so.
    sb.simulate_reboot();
    sb.start_agent();
    assert_eq!(sb.command_of("web"), "sleep 3600");
    assert!(rollout(&sb)["testing"].is_null());
}

#[test]
fn the_same_content_applied_again_after_a_rollback_is_a_new_try() {
    let (sb, _) = rolls_back(
        r#"
[rollout]
stable = "30s"

[[app]]
name = "web"
image = "busybox:1"
command = ["sh", "-c", "exit 1"]
"#,
    );
    let out = sb.try_apply(
        r#"
[rollout]
stable = "30s"

[[app]]
name = "web"
image = "busybox:1"
command = ["sh", "-c", "exit 1"]
"#,
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("generation 3 written"), "{out:?}");
    let r = wait_rollout(&sb, "generation 3 failed too", |r| r["failed"]["generation"] == 3);
    assert_eq!(r["committed"], 1);
}
