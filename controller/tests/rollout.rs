//! `skiffctl rollout` end to end: a real mosquitto with the shipped mTLS
//! config and ACL, the real skiffctl binary, and six simulated devices
//! (`skiff_tests::sim_device`) that verify every signed state with the
//! controller's public key and report testing, then committed or rolled back.
//! The group is pi-1..pi-6; `--waves 1,50%,100%` makes the waves pi-1 |
//! pi-2, pi-3 | pi-4, pi-5, pi-6.

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use skiff_common::protocol::parse_public_key;
use skiff_common::DesiredState;
use skiff_tests::mqtt::{Broker, CONTROLLER};
use skiff_tests::sim_device::{always_commit, Judge, SimDevice, Verdict};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const NAMES: [&str; 6] = ["pi-1", "pi-2", "pi-3", "pi-4", "pi-5", "pi-6"];

const OLD: &str = "[[app]]\nname = \"web\"\nimage = \"busybox:1\"\ncommand = [\"httpd\", \"-f\", \"-p\", \"8080\"]\n\n[rollout]\nstable = \"100ms\"\n";
const NEW: &str = "[[app]]\nname = \"web\"\nimage = \"busybox:1\"\ncommand = [\"httpd\", \"-f\", \"-p\", \"9090\"]\n\n[rollout]\nstable = \"5s\"\n";

fn is_new(s: &DesiredState) -> bool {
    s.apps[0].command.as_ref().is_some_and(|c| c.contains(&"9090".to_string()))
}

struct World {
    broker: Broker,
    dir: tempfile::TempDir,
    devices: Vec<SimDevice>,
    /// The generation of OLD, committed everywhere before each test.
    old: u64,
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl World {
    /// The broker, keys, fleet file, six devices judged by `judge(name)`,
    /// and OLD applied to all of them and committed.
    async fn new(judge: impl Fn(&str) -> Judge) -> Result<World> {
        World::with(judge, &[]).await
    }

    /// `new`, with the devices in `legacy` playing agents before rollouts.
    async fn with(judge: impl Fn(&str) -> Judge, legacy: &[&str]) -> Result<World> {
        let broker = Broker::start(&NAMES)?;
        let dir = tempfile::tempdir()?;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_skiffctl"))
            .args(["keygen", "--out"])
            .arg(dir.path())
            .output()?;
        ensure!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
        let key = parse_public_key(&std::fs::read_to_string(dir.path().join("controller.pub"))?)?;
        let list: Vec<String> = NAMES.iter().rev().map(|n| format!("{n:?}")).collect();
        std::fs::write(
            dir.path().join("fleet.toml"),
            format!("[group.line-3]\ndevices = [{}]\n", list.join(", ")),
        )?;
        std::fs::write(dir.path().join("old.toml"), OLD)?;
        std::fs::write(dir.path().join("new.toml"), NEW)?;
        let mut devices = Vec::new();
        for n in NAMES {
            devices.push(if legacy.contains(&n) {
                SimDevice::start_legacy(&broker, n, key).await?
            } else {
                SimDevice::start(&broker, n, key, judge(n)).await?
            });
        }
        let mut w = World { broker, dir, devices, old: 0 };
        let out = w.skiffctl(&["apply", "-f", &w.path("old.toml"), "--group", "line-3"]).await?;
        ensure!(out.code == Some(0), "apply: {}", out.stderr);
        for d in &w.devices {
            let log = d.committed(1, T).await?;
            w.old = log.rollout.committed;
        }
        Ok(w)
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn dev(&self, name: &str) -> &SimDevice {
        &self.devices[NAMES.iter().position(|n| *n == name).expect("device")]
    }

    fn cmd(&self, args: &[&str]) -> tokio::process::Command {
        let b = &self.broker;
        let p = |p: PathBuf| p.display().to_string();
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_skiffctl"));
        c.args(args);
        if matches!(args[0], "apply" | "rollout") {
            c.args([
                "--fleet",
                &self.path("fleet.toml"),
                "--key",
                &self.path("controller.key"),
                "--no-resolve",
            ]);
        }
        c.args(["--broker", &b.controller_url(), "--ca", &p(b.ca()), "--cert", &p(b.cert(CONTROLLER))]);
        c.args(["--tls-key", &p(b.key(CONTROLLER))]);
        c.kill_on_drop(true);
        c
    }

    async fn skiffctl(&self, args: &[&str]) -> Result<Out> {
        let out = tokio::time::timeout(Duration::from_secs(120), self.cmd(args).output())
            .await
            .context("skiffctl did not finish within 120 s")??;
        Ok(Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        })
    }

    /// `skiffctl status --json`, by device.
    async fn status(&self) -> Result<Vec<Value>> {
        let out = self.skiffctl(&["status", "--json"]).await?;
        ensure!(out.code == Some(0), "status: {}", out.stderr);
        Ok(serde_json::from_str::<Value>(&out.stdout)?.as_array().context("array")?.clone())
    }

    /// The new states each device took.
    fn new_states(&self, name: &str) -> Vec<DesiredState> {
        self.dev(name).log().received.into_iter().filter(is_new).collect()
    }
}

/// The stdout lines of `--json`, parsed.
fn json_lines(out: &Out) -> Vec<Value> {
    out.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
}

fn rollout_args<'a>(w: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a =
        vec!["rollout", "-f", w, "--group", "line-3", "--waves", "1,50%,100%", "--wave-timeout", "60s"];
    a.extend_from_slice(extra);
    a
}

/// pi-3 fails the new state (its app exits at once); everything else passes.
fn pi3_fails(name: &str) -> Judge {
    if name != "pi-3" {
        return always_commit();
    }
    Arc::new(|s: &DesiredState| {
        if is_new(s) {
            Verdict::Fail { app: Some("web".into()), reason: "exited with code 1 three times".into() }
        } else {
            Verdict::Commit
        }
    })
}

#[tokio::test]
async fn three_waves_commit_one_after_the_other() -> Result<()> {
    let w = World::new(|_| always_commit()).await?;
    let new = w.path("new.toml");
    // --stable overrides the file's 5s: the devices test for 300 ms.
    let out = w.skiffctl(&rollout_args(&new, &["--stable", "300ms"])).await?;
    ensure!(out.code == Some(0), "rollout: {}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("wave 1/3: pi-1 (1 device(s))"), "{}", out.stdout);
    assert!(out.stdout.contains("wave 2/3: pi-2, pi-3 (2 device(s))"), "{}", out.stdout);
    assert!(out.stdout.contains("pi-6: committed generation"), "{}", out.stdout);
    assert!(out.stdout.contains("rollout committed: 6 device(s) in 3 wave(s)"), "{}", out.stdout);

    let mut generation = None;
    for n in NAMES {
        let got = w.new_states(n);
        assert_eq!(got.len(), 1, "{n} got the new state once: {got:?}");
        assert_eq!(got[0].rollout.stable, Duration::from_millis(300), "{n}: --stable was applied");
        assert!(got[0].generation > w.old);
        assert_eq!(*generation.get_or_insert(got[0].generation), got[0].generation, "one generation for all");
        assert_eq!(w.dev(n).log().rollout.committed, got[0].generation, "{n} committed it");
    }
    // Each wave began only once the one before had committed.
    let waves: [&[&str]; 3] = [&["pi-1"], &["pi-2", "pi-3"], &["pi-4", "pi-5", "pi-6"]];
    for pair in waves.windows(2) {
        let done = pair[0].iter().map(|n| w.dev(n).log().committed_at.expect("committed")).max().unwrap();
        for n in pair[1] {
            let log = w.dev(n).log();
            let got = log.received_at[log.received.iter().position(is_new).unwrap()];
            assert!(got > done, "{n} got the state before the wave {pair:?} committed");
        }
    }

    // The same command again: everything is committed, nothing is sent.
    let out = w.skiffctl(&rollout_args(&new, &["--stable", "300ms", "--json"])).await?;
    ensure!(out.code == Some(0), "rerun: {}\n{}", out.stdout, out.stderr);
    let lines = json_lines(&out);
    assert!(lines.iter().all(|l| l["event"] != "sent"), "{}", out.stdout);
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "done");
    assert_eq!(last["result"], "committed");
    assert_eq!(last["devices"].as_array().unwrap().len(), 6);
    for n in NAMES {
        assert_eq!(w.new_states(n).len(), 1, "{n} was not sent it again");
    }
    Ok(())
}

#[tokio::test]
async fn a_rollback_in_wave_two_stops_before_wave_three() -> Result<()> {
    let w = World::new(pi3_fails).await?;
    let out = w.skiffctl(&rollout_args(&w.path("new.toml"), &["--stable", "300ms"])).await?;
    println!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, Some(4), "rollout: {}\n{}", out.stdout, out.stderr);
    let g = w.new_states("pi-3")[0].generation;
    let why = format!("pi-3 generation {g} rolled back (app web): exited with code 1 three times");
    assert!(out.stderr.contains(&format!("rollout stopped in wave 2/3: {why}")), "{}", out.stderr);
    let row = out.stdout.lines().find(|l| l.starts_with("pi-3 ")).unwrap_or_default();
    assert!(
        row.contains(&format!("{g}")) && row.contains("rolled-back") && row.contains("exited with code 1"),
        "{}",
        out.stdout
    );

    let status = w.status().await?;
    for n in ["pi-4", "pi-5", "pi-6"] {
        assert!(w.new_states(n).is_empty(), "{n} is in wave 3 and got the new state");
        let s = status.iter().find(|d| d["device"] == n).unwrap();
        assert_eq!(s["desired_generation"], w.old, "{n}: its retained desired state is unchanged");
    }
    let pi3 = status.iter().find(|d| d["device"] == "pi-3").unwrap();
    assert_eq!(pi3["committed_generation"], w.old);
    assert_eq!(pi3["failed"]["generation"], g);
    assert_eq!(pi3["failed"]["rolled_back"], true);
    assert_eq!(pi3["failed"]["app"], "web");

    // The table: the rollout columns and the reason.
    let table = w.skiffctl(&["status"]).await?;
    let header = table.stdout.lines().next().unwrap_or_default();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["DEVICE", "ONLINE", "DESIRED", "APPLIED", "COMMITTED", "TESTING", "FAILED", "SEEN", "APPS"]
    );
    let row = table.stdout.lines().find(|l| l.starts_with("pi-3 ")).unwrap_or_default();
    assert!(
        row.contains(&format!("{}  ", w.old)) && row.contains(&format!("{g} (rolled back)")),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.contains(&format!(
            "pi-3: generation {g} failed (app web): exited with code 1 three times; rolled back to generation {}",
            w.old
        )),
        "{}",
        table.stdout
    );

    // Run again: the rolled-back generation is not sent again and the rollout stops at once.
    let again = w.skiffctl(&rollout_args(&w.path("new.toml"), &["--stable", "300ms"])).await?;
    assert_eq!(again.code, Some(4), "{}", again.stdout);
    assert!(!again.stdout.contains(" sent"), "{}", again.stdout);
    assert!(w.new_states("pi-4").is_empty());
    Ok(())
}

#[tokio::test]
async fn abort_on_failure_sends_the_wave_its_previous_state() -> Result<()> {
    let w = World::new(pi3_fails).await?;
    let out = w
        .skiffctl(&rollout_args(&w.path("new.toml"), &["--stable", "300ms", "--abort-on-failure", "--json"]))
        .await?;
    assert_eq!(out.code, Some(4), "rollout: {}\n{}", out.stdout, out.stderr);
    let g = w.new_states("pi-3")[0].generation;
    let done = json_lines(&out).pop().unwrap();
    assert_eq!(done["result"], "failed");
    assert_eq!(done["abort"]["resent"], serde_json::json!(["pi-2", "pi-3"]));
    let back = done["abort"]["generation"].as_u64().unwrap();
    assert!(back > g, "the rollback generation {back} is above the failed one {g}");
    for n in ["pi-2", "pi-3"] {
        let log = w.dev(n).committed(back, T).await?;
        let last = log.received.last().unwrap();
        assert_eq!(last.generation, back);
        assert!(!is_new(last), "{n} got its previous apps back");
        assert_eq!(last.apps, log.received[0].apps, "{n}: the very state it had");
    }
    let pi1 = w.dev("pi-1").log();
    assert!(is_new(pi1.received.last().unwrap()), "wave 1 keeps what it committed");
    for n in ["pi-4", "pi-5", "pi-6"] {
        assert_eq!(w.dev(n).log().received.len(), 1, "{n} got nothing");
    }
    Ok(())
}

#[tokio::test]
async fn a_killed_controller_continues_without_sending_twice() -> Result<()> {
    // Wave 2 stays in testing until released.
    let w = World::new(|n| {
        if matches!(n, "pi-2" | "pi-3") {
            Arc::new(|s: &DesiredState| if is_new(s) { Verdict::Hold } else { Verdict::Commit })
        } else {
            always_commit()
        }
    })
    .await?;
    let new = w.path("new.toml");
    let args = rollout_args(&new, &["--stable", "300ms"]);
    let mut first =
        w.cmd(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn()?;
    for n in ["pi-2", "pi-3"] {
        w.dev(n)
            .wait("testing the new state", T, |l| {
                l.received.iter().any(is_new) && l.rollout.testing.is_some()
            })
            .await?;
    }
    let g = w.new_states("pi-2")[0].generation;

    // Status while wave 2 tests.
    let status = w.status().await?;
    let pi2 = status.iter().find(|d| d["device"] == "pi-2").unwrap();
    assert_eq!(
        (pi2["testing_generation"].as_u64(), pi2["committed_generation"].as_u64()),
        (Some(g), Some(w.old))
    );
    let table = w.skiffctl(&["status"]).await?;
    let row = table.stdout.lines().find(|l| l.starts_with("pi-2 ")).unwrap_or_default();
    assert!(row.contains(&format!("{}  ", w.old)) && row.contains(&format!("{g}  ")), "{}", table.stdout);

    first.start_kill()?; // SIGKILL
    let status = first.wait().await?;
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    for n in ["pi-2", "pi-3"] {
        w.dev(n).release();
        w.dev(n).committed(g, T).await?;
    }

    let mut resumed = args.clone();
    resumed.push("--resume");
    let out = w.skiffctl(&resumed).await?;
    ensure!(out.code == Some(0), "resumed: {}\n{}", out.stdout, out.stderr);
    for n in ["pi-1", "pi-2", "pi-3"] {
        assert!(!out.stdout.contains(&format!("{n}: generation")), "{n} sent again: {}", out.stdout);
        assert_eq!(w.new_states(n).len(), 1, "{n} got the new state once");
    }
    for n in ["pi-4", "pi-5", "pi-6"] {
        assert!(out.stdout.contains(&format!("{n}: generation")), "{}", out.stdout);
        let got = w.new_states(n);
        assert_eq!(got.len(), 1, "{n}");
        w.dev(n).committed(got[0].generation, T).await?;
    }

    // --resume without a file takes the state the first device has.
    let out = w.skiffctl(&["rollout", "--resume", "--group", "line-3", "--waves", "1,50%,100%"]).await?;
    ensure!(out.code == Some(0), "resume without -f: {}\n{}", out.stdout, out.stderr);
    assert!(!out.stdout.contains(" sent"), "{}", out.stdout);
    Ok(())
}

#[tokio::test]
async fn a_wave_that_does_not_commit_in_time_stops_the_rollout() -> Result<()> {
    let w = World::new(|n| {
        if n == "pi-1" {
            Arc::new(|s: &DesiredState| if is_new(s) { Verdict::Hold } else { Verdict::Commit })
        } else {
            always_commit()
        }
    })
    .await?;
    let new = w.path("new.toml");
    let mut args = rollout_args(&new, &["--stable", "300ms"]);
    let at = args.iter().position(|a| *a == "60s").unwrap();
    args[at] = "2s";
    let out = w.skiffctl(&args).await?;
    assert_eq!(out.code, Some(5), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("rollout timed out in wave 1/3: pi-1 testing"), "{}", out.stderr);
    assert_eq!(w.new_states("pi-1").len(), 1);
    for n in &NAMES[1..] {
        assert!(w.new_states(n).is_empty(), "{n} is not in wave 1");
    }
    Ok(())
}

#[tokio::test]
async fn an_agent_before_rollouts_counts_as_committed_once_applied() -> Result<()> {
    let w = World::with(|_| always_commit(), &["pi-2"]).await?;
    let out = w.skiffctl(&rollout_args(&w.path("new.toml"), &["--stable", "300ms"])).await?;
    ensure!(out.code == Some(0), "rollout: {}\n{}", out.stdout, out.stderr);
    let g = w.new_states("pi-2")[0].generation;
    assert!(
        out.stdout.contains(&format!(
            "pi-2: applied generation {g} (an agent before rollouts: committed at once, not tested)"
        )),
        "{}",
        out.stdout
    );
    let table = w.skiffctl(&["status"]).await?;
    let row = table.stdout.lines().find(|l| l.starts_with("pi-2 ")).unwrap_or_default();
    assert!(row.contains(&format!("{g} (untested)")), "{}", table.stdout);
    assert!(table.stdout.contains("pi-2: agent before rollouts (report schema 2)"), "{}", table.stdout);
    let status = w.status().await?;
    let pi2 = status.iter().find(|d| d["device"] == "pi-2").unwrap();
    assert_eq!((pi2["reported_schema"].as_u64(), pi2["committed_generation"].as_u64()), (Some(2), Some(g)));
    Ok(())
}

#[tokio::test]
async fn bad_waves_and_resume_of_nothing_are_refused() -> Result<()> {
    let w = World::new(|_| always_commit()).await?;
    let new = w.path("new.toml");
    for (waves, message) in [
        ("0", "--waves part 1 (\"0\"): a wave has at least one device"),
        ("1,150%", "--waves part 2 (\"150%\"): a percentage of the group is 1% to 100%"),
        ("3,2", "--waves part 2 (\"2\") does not reach more devices than part 1 (\"3\")"),
        ("", "--waves is empty"),
    ] {
        let out = w.skiffctl(&["rollout", "-f", &new, "--group", "line-3", "--waves", waves]).await?;
        assert_eq!(out.code, Some(3), "{waves}: {}", out.stderr);
        assert!(out.stderr.contains(message), "{waves}: {}", out.stderr);
    }
    let out = w.skiffctl(&rollout_args(&new, &["--resume"])).await?;
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(out.stderr.contains("no device of group line-3 has this state yet"), "{}", out.stderr);
    for n in NAMES {
        assert!(w.new_states(n).is_empty(), "{n}");
    }
    Ok(())
}
