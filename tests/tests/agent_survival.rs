//! The agent can die and the machine can reboot: workloads go on or come back.

use skiff_tests::agent::{alive, eventually, Sandbox};
use std::time::Duration;

const APPS: &str = r#"
[[app]]
name = "one"
image = "busybox:1"
command = ["sleep", "600"]

[[app]]
name = "two"
image = "busybox:1"
command = ["sh", "-c", "echo started; while [ ! -e /tmp/stop ]; do sleep 0.1; done; exit 0"]
restart = "on-failure"
"#;

#[test]
fn killed_agent_leaves_containers_running_and_new_agent_adopts_them() {
    let mut sb = Sandbox::new();
    sb.agent_args = vec!["--backoff-base".into(), "200ms".into()];
    sb.start_agent();
    sb.apply(APPS);
    let one = sb.wait_running("one");
    let two = sb.wait_running("two");
    sb.kill_agent();
    std::thread::sleep(Duration::from_millis(500));
    for a in [&one, &two] {
        let pid = a["pid"].as_i64().unwrap();
        assert!(alive(pid), "{} died with the agent", a["name"]);
    }
    sb.start_agent();
    // Adopted: same processes, nothing restarted.
    let one2 = sb.wait_running("one");
    let two2 = sb.wait_running("two");
    assert_eq!(one2["pid"], one["pid"]);
    assert_eq!(two2["pid"], two["pid"]);
    assert_eq!(one2["restarts"], 0);
    assert_eq!(sb.logs("two").matches("started").count(), 1, "two was started twice");
    // The restart policy still applies to an adopted container.
    let pid = one2["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let one3 = sb.wait_app("one", Duration::from_secs(20), "restarted", |a| {
        a["restarts"] == 1 && a["phase"] == "running"
    });
    assert_ne!(one3["pid"], one2["pid"]);
    assert_eq!(one3["last_exit"]["signal"], 9);
    // An adopted app that exits cleanly under on-failure stays down.
    let pid = two2["pid"].as_i64().unwrap();
    std::fs::write(format!("/proc/{pid}/root/tmp/stop"), "").unwrap();
    let two3 = sb.wait_app("two", Duration::from_secs(20), "exited", |a| a["phase"] == "exited");
    assert_eq!(two3["last_exit"]["code"], 0, "{two3}");
    assert_eq!(two3["restarts"], 0, "{two3}");
}

#[test]
fn reboot_with_no_network_brings_every_app_back() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    sb.apply(APPS);
    let before = [sb.wait_running("one"), sb.wait_running("two")];
    sb.simulate_reboot();
    for a in &before {
        let pid = a["pid"].as_i64().unwrap();
        assert!(!alive(pid), "reboot left {} running", a["name"]);
    }
    assert!(!sb.run_dir().exists());
    // The board comes back with no network: the agent has only the state dir.
    sb.start_agent();
    for a in &before {
        let name = a["name"].as_str().unwrap();
        let now = sb.wait_running(name);
        assert_ne!(now["pid"], a["pid"]);
        assert_eq!(now["restarts"], 0, "a fresh boot is not a restart: {now}");
    }
}

/// The agent's open pidfds.
fn pidfds(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    fds.flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:[pidfd]"))
        .count()
}

#[test]
fn adopted_apps_are_watched_through_pidfds_and_their_exit_codes_reported() {
    const IDLE: usize = 5;
    let mut sb = Sandbox::new();
    sb.start_agent();
    let mut toml: String = (0..IDLE)
        .map(|i| format!("[[app]]\nname = \"idle-{i}\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"600\"]\nstop_grace = \"0s\"\n"))
        .collect();
    toml.push_str(
        "[[app]]\nname = \"coded\"\nimage = \"busybox:1\"\nrestart = \"never\"\n\
         command = [\"sh\", \"-c\", \"while [ ! -e /tmp/stop ]; do sleep 0.1; done; exit 7\"]\n",
    );
    sb.apply(&toml);
    let names: Vec<String> = (0..IDLE).map(|i| format!("idle-{i}")).chain(["coded".to_string()]).collect();
    let before: Vec<_> = names.iter().map(|n| sb.wait_running(n)["pid"].clone()).collect();
    sb.kill_agent();
    sb.start_agent();
    let after: Vec<_> = names.iter().map(|n| sb.wait_running(n)["pid"].clone()).collect();
    assert_eq!(before, after, "adopted, not restarted");
    // Each adopted shim is watched through a pidfd: its exit wakes the agent,
    // no timer reads /proc meanwhile.
    let agent = sb.agent_pid().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || pidfds(agent) == names.len()),
        "the agent holds {} pidfds for {} adopted shims",
        pidfds(agent),
        names.len()
    );
    let pid = after[IDLE].as_i64().unwrap();
    std::fs::write(format!("/proc/{pid}/root/tmp/stop"), "").unwrap();
    let coded = sb.wait_app("coded", Duration::from_secs(20), "exited", |a| a["phase"] == "exited");
    assert_eq!(coded["last_exit"]["code"], 7, "{coded}");
    assert_eq!(coded["restarts"], 0, "{coded}");
    // The exited shim's pidfd is closed; the others stay watched.
    assert!(
        eventually(Duration::from_secs(5), || pidfds(agent) == IDLE),
        "{} pidfds left for {IDLE} adopted shims",
        pidfds(agent)
    );
    for n in &names[..IDLE] {
        assert_eq!(sb.app(n)["phase"], "running");
    }
}
