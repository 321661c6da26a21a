//! The whole chain: skiffctl -> a real mosquitto with mTLS and ACLs -> the
//! agent -> real containers, and back up as reported state and events.

use serde_json::Value;
use skiff_tests::agent::{skiffctl_bin, wait_for};
use skiff_tests::fleet::Fleet;
use std::process::Command;
use std::time::Duration;

const DEV: &str = "pi-1";

fn app_of<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["apps"].as_array()?.iter().find(|a| a["name"] == name)
}

const APPS: &str = r#"
[[app]]
name = "web"
image = "busybox:1"
command = ["sleep", "3600"]
stop_grace = "1s"

[[app]]
name = "crashy"
image = "busybox:1"
command = ["sh", "-c", "sleep 0.2; exit 1"]
"#;

#[test]
fn apply_runs_on_the_device_and_outages_lose_nothing() {
    let mut fleet = Fleet::new(DEV);
    let mut sb = fleet.agent();
    // An operator's persistent events session, opened before anything happens.
    assert!(fleet.events("ops").is_empty());
    sb.start_agent();
    let out = fleet.apply(sb.dir.path(), APPS, &[]);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    let web = sb.wait_running("web");
    // The controller sees it: online, the generation applied, the app running.
    let st = wait_for(Duration::from_secs(20), "status to show web running", || {
        let s = fleet.status();
        let running = app_of(&s, "web").is_some_and(|a| a["phase"] == "running");
        (running && s["online"] == true && s["applied_generation"] == s["desired_generation"]).then_some(s)
    });
    assert_eq!(st["origin"], "Controller", "{st}");

    // The broker goes away: apps keep running, the crashing one keeps restarting.
    fleet.broker.stop();
    let r0 = sb.app("crashy")["restarts"].as_u64().unwrap();
    sb.wait_app("crashy", Duration::from_secs(30), "restarted offline", |a| {
        a["restarts"].as_u64() >= Some(r0 + 3)
    });
    assert_eq!(sb.app("web")["pid"], web["pid"], "web was disturbed by the outage");
    let ps = sb.ps();
    assert_eq!(ps["link"]["connected"], false, "{ps}");
    // A local edit while offline is applied at once ...
    sb.apply(&format!(
        "{APPS}\n[[app]]\nname = \"local\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"3600\"]\n"
    ));
    sb.wait_running("local");
    let local_gen = sb.ps()["generation"].as_u64().unwrap();

    // ... and reported when the broker is back, with the events queued meanwhile, in order.
    fleet.broker.restart().expect("restart mosquitto");
    let st = wait_for(Duration::from_secs(30), "the local edit to be reported", || {
        let s = fleet.status();
        (s["applied_generation"] == local_gen && app_of(&s, "local").is_some()).then_some(s)
    });
    assert_eq!(st["origin"], "Local", "{st}");
    let events = wait_for(Duration::from_secs(20), "the queued events", || {
        let e = fleet.events("ops");
        e.iter().any(|e| e["app"] == "local" && e["kind"] == "started").then_some(e)
    });
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "events out of order or missing: {seqs:?}");
    let offline_restarts =
        events.iter().filter(|e| e["app"] == "crashy" && e["kind"] == "restarting").count();
    assert!(offline_restarts >= 3, "restarts while offline not reported: {events:?}");
}

#[test]
fn state_published_while_offline_is_applied_on_reconnect_and_forgeries_are_refused() {
    let fleet = Fleet::new(DEV);
    let mut sb = fleet.agent();
    sb.start_agent();
    assert!(fleet.apply(sb.dir.path(), APPS, &[]).status.success());
    let web = sb.wait_running("web");

    // Forged: signed by another key. Refused; nothing running changes.
    let other = tempfile::tempdir().unwrap();
    assert!(Command::new(skiffctl_bin())
        .arg("keygen")
        .arg("--out")
        .arg(other.path())
        .status()
        .unwrap()
        .success());
    let forged = "[[app]]\nname = \"evil\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"3600\"]\n";
    let other_key = other.path().join("controller.key");
    let _ = fleet.apply_with_key(sb.dir.path(), forged, &other_key);
    let st = wait_for(Duration::from_secs(20), "the rejection to be reported", || {
        let s = fleet.status();
        s["last_rejection"].is_object().then_some(s)
    });
    assert!(app_of(&st, "evil").is_none());
    assert!(sb.app("evil").is_null());
    assert_eq!(sb.app("web")["pid"], web["pid"]);

    // The device is off (agent down) while the controller publishes a new state.
    sb.kill_agent();
    let v2 = "[[app]]\nname = \"web2\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"3600\"]\n";
    assert!(fleet.apply(sb.dir.path(), v2, &[]).status.success());
    sb.start_agent();
    sb.wait_running("web2");
    wait_for(Duration::from_secs(20), "web to be removed", || sb.app("web").is_null().then_some(()));
    let st = wait_for(Duration::from_secs(20), "the new generation to be reported", || {
        let s = fleet.status();
        (s["applied_generation"] == s["desired_generation"] && app_of(&s, "web2").is_some()).then_some(s)
    });
    assert_eq!(st["origin"], "Controller");
}

#[test]
fn controller_state_waits_for_its_images_and_stops_nothing_meanwhile() {
    let fleet = Fleet::new(DEV);
    let mut sb = fleet.agent();
    // The operator's events session, opened before anything happens.
    assert!(fleet.events("ops").is_empty());
    sb.start_agent();
    assert!(fleet.apply(sb.dir.path(), APPS, &[]).status.success());
    let web = sb.wait_running("web");
    // Sideloaded only: a pull would go to Docker Hub.
    let v2 = APPS.replacen("image = \"busybox:1\"", "image = \"busybox:2\"\npull = \"never\"", 1);
    assert!(fleet.apply(sb.dir.path(), &v2, &[]).status.success());
    // The device says why it waits, and the old container keeps running.
    let events = wait_for(Duration::from_secs(20), "the device to say it waits", || {
        let e = fleet.events("ops");
        e.iter()
            .any(|e| {
                e["detail"].as_str().is_some_and(|d| d.contains("image busybox:2 is not on this device"))
            })
            .then_some(e)
    });
    assert!(!events.is_empty());
    assert_eq!(sb.app("web")["pid"], web["pid"], "web was stopped for an image it cannot run");
    // The image arrives: the waiting state is applied.
    let image = skiff_tests::agent::busybox_image().to_str().unwrap().to_string();
    let out = sb.skiff(&["image", "load", "--name", "busybox:2", &image]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let web2 = sb.wait_app("web", Duration::from_secs(90), "replaced", |a| {
        a["image"] == "busybox:2" && a["phase"] == "running"
    });
    assert_ne!(web2["pid"], web["pid"]);
}
