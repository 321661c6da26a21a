//! A staged rollout over six real agents (separate state and run dirs on one
//! machine, real containers, a real mosquitto with mTLS, the real skiffctl):
//! the new generation's app crashes on one device of the second wave, that
//! agent rolls back by itself, and the rollout stops before the third wave.

use serde_json::Value;
use skiff_tests::agent::{skiffctl_bin, wait_for, Sandbox};
use skiff_tests::mqtt::{Broker, CONTROLLER};
use skiff_tests::registry::busybox_variant;
use std::process::{Command, Output};
use std::time::Duration;

const NAMES: [&str; 6] = ["pi-1", "pi-2", "pi-3", "pi-4", "pi-5", "pi-6"];
/// The one whose image makes the new generation crash (second wave: pi-2, pi-3).
const BAD: &str = "pi-3";

const OLD: &str = r#"
[rollout]
stable = "1s"

[[app]]
name = "web"
image = "busybox:1"
command = ["sleep", "3600"]
"#;

/// busybox:2 is loaded on every device; on pi-3 it is a build that fails.
const NEW: &str = r#"
[rollout]
stable = "3s"

[[app]]
name = "web"
image = "busybox:2"
pull = "never"
command = ["sh", "-c", "grep -q bad /version && exit 1; exec sleep 3601"]
"#;

struct World {
    broker: Broker,
    dir: tempfile::TempDir,
    agents: Vec<Sandbox>,
}

impl World {
    fn skiffctl(&self, args: &[&str]) -> Output {
        let b = &self.broker;
        let p = |p: std::path::PathBuf| p.display().to_string();
        let d = |f: &str| self.dir.path().join(f).display().to_string();
        let mut c = Command::new(skiffctl_bin());
        c.args(args);
        if matches!(args[0], "apply" | "rollout") {
            c.args(["--fleet", &d("fleet.toml"), "--key", &d("controller.key"), "--no-resolve"]);
        }
        c.args(["--broker", &b.controller_url(), "--ca", &p(b.ca()), "--cert", &p(b.cert(CONTROLLER))]);
        c.args(["--tls-key", &p(b.key(CONTROLLER))]);
        c.output().expect("skiffctl")
    }

    fn status(&self) -> Vec<Value> {
        let out = self.skiffctl(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
    }

    fn device(&self, name: &str) -> Value {
        self.status().into_iter().find(|d| d["device"] == name).unwrap_or(Value::Null)
    }

    fn agent(&self, name: &str) -> &Sandbox {
        &self.agents[NAMES.iter().position(|n| *n == name).unwrap()]
    }
}

#[test]
fn a_three_wave_rollout_stops_after_the_wave_where_a_real_agent_rolled_back() {
    let broker = Broker::start(&NAMES).expect("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(skiffctl_bin()).args(["keygen", "--out"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success());
    let list: Vec<String> = NAMES.iter().map(|n| format!("{n:?}")).collect();
    std::fs::write(
        dir.path().join("fleet.toml"),
        format!("[group.line-3]\ndevices = [{}]\n", list.join(", ")),
    )
    .unwrap();
    busybox_variant(&dir.path().join("good"), "2", "good", 16, 1);
    busybox_variant(&dir.path().join("bad"), "2", "bad", 16, 2);
    let mut agents = Vec::new();
    for name in NAMES {
        let mut sb = Sandbox::new();
        let variant = dir.path().join(if name == BAD { "bad" } else { "good" });
        let out = sb.skiff(&["image", "load", variant.to_str().unwrap(), "--name", "busybox:2"]);
        assert!(out.status.success(), "load: {}", String::from_utf8_lossy(&out.stderr));
        let p = |p: std::path::PathBuf| p.display().to_string();
        sb.agent_args = vec![
            "--backoff-base".into(),
            "300ms".into(),
            "--mqtt-broker".into(),
            broker.device_url(),
            "--device".into(),
            name.into(),
            "--controller-key".into(),
            p(dir.path().join("controller.pub")),
            "--mqtt-ca".into(),
            p(broker.ca()),
            "--mqtt-cert".into(),
            p(broker.cert(name)),
            "--mqtt-key".into(),
            p(broker.key(name)),
            "--mqtt-keepalive".into(),
            "2s".into(),
        ];
        sb.start_agent();
        agents.push(sb);
    }
    let w = World { broker, dir, agents };
    std::fs::write(w.dir.path().join("old.toml"), OLD).unwrap();
    std::fs::write(w.dir.path().join("new.toml"), NEW).unwrap();

    // Every device runs the old generation, committed (the first state of a board is).
    let out = w.skiffctl(&[
        "apply",
        "-f",
        &w.dir.path().join("old.toml").display().to_string(),
        "--group",
        "line-3",
    ]);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    let old = wait_for(Duration::from_secs(60), "the old generation committed everywhere", || {
        let st = w.status();
        let gens: Vec<u64> = st.iter().filter_map(|d| d["committed_generation"].as_u64()).collect();
        (gens.len() == NAMES.len() && gens.iter().all(|g| *g == gens[0] && *g > 0)).then(|| gens[0])
    });
    for sb in &w.agents {
        assert_eq!(sb.command_of("web"), "sleep 3600");
    }

    let new = w.dir.path().join("new.toml").display().to_string();
    let out = w.skiffctl(&["rollout", "-f", &new, "--group", "line-3", "--waves", "1,50%,100%"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "rollout: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(BAD) && stdout.contains("exited with code 1"), "{stdout}");

    // Wave 1 (pi-1) committed the new generation; pi-2 (the rollout stopped
    // while it was still on test) commits it by itself.
    for name in ["pi-1", "pi-2"] {
        wait_for(Duration::from_secs(30), "the new generation committed", || {
            (w.device(name)["committed_generation"].as_u64() > Some(old)).then_some(())
        });
        assert_eq!(w.agent(name).command_of("web"), "sleep 3601", "{name}");
    }
    // pi-3 rolled back by itself: the old app runs again, and it says why.
    let d = w.device(BAD);
    assert_eq!(d["committed_generation"], old, "{d}");
    assert_eq!(d["failed"]["app"], "web", "{d}");
    assert_eq!(d["failed"]["reason"], "exited with code 1", "{d}");
    assert_eq!(d["failed"]["rolled_back"], true, "{d}");
    assert_eq!(w.agent(BAD).command_of("web"), "sleep 3600");
    let ps = String::from_utf8_lossy(&w.agent(BAD).skiff(&["ps"]).stdout).into_owned();
    assert!(ps.contains("failed its test and was rolled back"), "{ps}");
    // Wave 3 never got it.
    for name in ["pi-4", "pi-5", "pi-6"] {
        let d = w.device(name);
        assert_eq!(d["desired_generation"], old, "{name}: {d}");
        assert_eq!(d["committed_generation"], old, "{name}: {d}");
        assert_eq!(w.agent(name).command_of("web"), "sleep 3600", "{name}");
    }
}
