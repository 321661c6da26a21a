//! The desired-state file: power cuts while it is written, and bad input.

use skiff_common::codec::state_file;
use skiff_common::toml_file;
use skiff_tests::agent::{skiff_bin, Sandbox};
use std::time::{Duration, Instant};

fn apps(n: usize, tag: &str) -> String {
    (0..n)
        .map(|i| format!("[[app]]\nname = \"app-{i}\"\nimage = \"busybox:1\"\ncommand = [\"echo\", \"{tag}\"]\nenv = {{ PAD = \"{}\" }}\n", "x".repeat(200)))
        .collect()
}

#[test]
fn power_cut_during_apply_leaves_old_or_new_state() {
    let sb = Sandbox::new();
    let old_text = apps(40, "old");
    let new_text = apps(40, "new");
    let old = toml_file::parse(&old_text).unwrap().apps;
    let new = toml_file::parse(&new_text).unwrap().apps;
    let dir = sb.dir.path();
    std::fs::write(dir.join("old.toml"), &old_text).unwrap();
    std::fs::write(dir.join("new.toml"), &new_text).unwrap();
    sb.apply(&old_text);
    // How long one apply takes, to spread the kills over all of it.
    let t = Instant::now();
    sb.apply(&new_text);
    sb.apply(&old_text);
    let span = (t.elapsed() / 2).max(Duration::from_millis(2));
    let state_file = sb.state_dir().join("desired.skf");
    let (mut saw_old, mut saw_new) = (0, 0);
    let mut current_is_old = true;
    for i in 0..200 {
        let target = if current_is_old { "new.toml" } else { "old.toml" };
        let mut child = sb
            .cmd(&["apply", "-f", dir.join(target).to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = span.mul_f64(rand::random::<f64>() * 1.2);
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL: no cleanup, no flush
        let _ = child.wait();
        let bytes = std::fs::read(&state_file).unwrap_or_else(|e| panic!("cut {i}: state file gone: {e}"));
        let state = state_file::decode(&bytes)
            .unwrap_or_else(|e| panic!("cut {i} after {delay:?}: state file corrupt: {e}"));
        if state.apps == old {
            saw_old += 1;
            current_is_old = true;
        } else if state.apps == new {
            saw_new += 1;
            current_is_old = false;
        } else {
            panic!("cut {i}: state is neither old nor new");
        }
        // The file's envelope must not have a temp file lying beside it forever.
        assert!(std::fs::read_dir(sb.state_dir()).unwrap().count() < 10);
    }
    println!("200 cuts: {saw_old} left the old state, {saw_new} the new one");
    assert_eq!(saw_old + saw_new, 200);
    // The tool still works afterwards.
    sb.apply(&new_text);
}

fn expect_invalid(sb: &Sandbox, toml: &str, line_col: &str, needle: &str) {
    let before = std::fs::read(sb.state_dir().join("desired.skf")).unwrap();
    for cmd in ["validate", "apply"] {
        let f = sb.dir.path().join("bad.toml");
        std::fs::write(&f, toml).unwrap();
        let out = sb.skiff(&[cmd, "-f", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{cmd}: exit code; stderr: {err}");
        assert!(
            err.contains(&format!("bad.toml:{line_col}")),
            "{cmd}: no file:line:col {line_col} in: {err}"
        );
        assert!(err.contains(needle), "{cmd}: {needle:?} not in: {err}");
    }
    let after = std::fs::read(sb.state_dir().join("desired.skf")).unwrap();
    assert_eq!(before, after, "a rejected file changed the stored state");
}

#[test]
fn bad_files_are_rejected_clearly_and_change_nothing() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    sb.apply("[[app]]\nname = \"keep\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"600\"]\n");
    let running = sb.wait_running("keep");
    let head = "[[app]]\nname = \"web\"\nimage = \"busybox:1\"\n";
    expect_invalid(&sb, &format!("{head}colour = \"red\"\n"), "4:", "unknown field `colour`");
    expect_invalid(&sb, "[[app]]\nname = \"Web_1\"\nimage = \"busybox:1\"\n", "2:8", "app[0].name");
    expect_invalid(&sb, &format!("{head}{head}"), "5:8", "duplicate app name");
    expect_invalid(&sb, &format!("{head}[app.resources]\nmemory = \"32Q\"\n"), "5:10", "resources.memory");
    expect_invalid(&sb, &format!("{head}[app.resources]\ncpus = 0.0\n"), "5:8", "resources.cpus");
    expect_invalid(&sb, &format!("{head}[app.resources]\npids = -4\n"), "5:8", "resources.pids");
    expect_invalid(&sb, &format!("{head}restart = \"sometimes\"\n"), "4:11", "restart");
    expect_invalid(
        &sb,
        &format!("{head}user = \"nobody\"\n"),
        "4:8",
        "app \"web\": user: \"nobody\" is not a numeric",
    );
    expect_invalid(
        &sb,
        &format!("{head}cap_add = [\"KILL\", \"FLY\"]\n"),
        "4:20",
        "app \"web\": cap_add: \"FLY\"",
    );
    expect_invalid(
        &sb,
        &format!("{head}cap_drop = [\"ALL\", \"KILL\"]\n"),
        "4:12",
        "app \"web\": cap_drop: ALL",
    );
    expect_invalid(&sb, &format!("{head}[app.security]\nseccomp = \"off\"\n"), "5:11", "security.seccomp");
    expect_invalid(&sb, &format!("{head}image = \"x\"\n"), "4:", "duplicate key");
    expect_invalid(&sb, "[[app]]\nname = \"web\"\nimage = \"BusyBox\"\n", "3:9", "image");
    expect_invalid(
        &sb,
        &format!("{head}[app.liveness]\nhttp = {{ port = 70000 }}\n"),
        "5:17",
        "liveness.http.port",
    );
    expect_invalid(&sb, &format!("{head}devices = [\"/etc/passwd\"]\n"), "4:12", "devices[0]");
    expect_invalid(&sb, "[[app]\n", "1:", "");
    // A valid file naming an image that is not loaded (and may not be pulled)
    // would take the app down.
    let f = sb.dir.path().join("noimage.toml");
    std::fs::write(
        &f,
        "[[app]]\nname = \"keep\"\nimage = \"busybox:2\"\npull = \"never\"\ncommand = [\"sleep\", \"600\"]\n",
    )
    .unwrap();
    let out = sb.skiff(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("image busybox:2 is not in the image store"));
    // What runs keeps running, untouched.
    std::thread::sleep(Duration::from_millis(1500));
    let now = sb.app("keep");
    assert_eq!(now["pid"], running["pid"]);
    assert_eq!(now["restarts"], 0);
    // A missing file is an error too, not a panic.
    let out = sb.skiff(&["apply", "-f", "/nonexistent/apps.toml"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/apps.toml"));
    assert!(skiff_bin().exists());
}

#[test]
fn running_agent_picks_up_apply_within_a_second() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    sb.apply("[[app]]\nname = \"quick\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"600\"]\n");
    let t = Instant::now();
    sb.wait_running("quick");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    // Written by hand (no socket poke), it is still noticed by the file watch.
    let gen = sb.ps()["generation"].as_u64().unwrap();
    let mut state = state_file::decode(&std::fs::read(sb.state_dir().join("desired.skf")).unwrap()).unwrap();
    state.generation += 1;
    state.apps.clear();
    let bytes = state_file::encode(&state).unwrap();
    let tmp = sb.state_dir().join("by-hand.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, sb.state_dir().join("desired.skf")).unwrap();
    sb.wait_app("quick", Duration::from_secs(15), "removed", |a| a.is_null());
    assert_eq!(sb.ps()["generation"].as_u64().unwrap(), gen + 1);
}
