//! Under systemd: the shipped unit verifies, and the real agent speaks the
//! notify protocol to a socket set up as systemd would (`NOTIFY_SOCKET`,
//! `WATCHDOG_USEC`): READY once its apps run, watchdog pings, STOPPING.

use skiff_tests::agent::{repo, skiff_bin, wait_for, Sandbox};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn the_shipped_unit_verifies_cleanly() {
    let unit = std::fs::read_to_string(repo().join("systemd/skiff.service")).unwrap();
    for line in ["Type=notify", "NotifyAccess=main", "KillMode=process", "RestartPreventExitStatus=3"] {
        assert!(unit.lines().any(|l| l.trim() == line), "the unit sets {line}");
    }
    assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")), "the unit sets a watchdog");
    // A root holding systemd's own units, the unit as shipped and the binary it starts.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["etc/systemd/system", "usr/local/bin", "lib/systemd"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    let st =
        Command::new("cp").arg("-r").arg("/lib/systemd/system").arg(r.join("lib/systemd")).status().unwrap();
    assert!(st.success());
    std::fs::copy(repo().join("systemd/skiff.service"), r.join("etc/systemd/system/skiff.service")).unwrap();
    std::fs::copy(skiff_bin(), r.join("usr/local/bin/skiff")).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("--man=no")
        .arg(format!("--root={}", r.display()))
        .arg("verify")
        .arg(r.join("etc/systemd/system/skiff.service"))
        .output()
        .expect("systemd-analyze (scripts/deps.sh installs systemd)");
    // verify exits 0 on some warnings (an unknown Type=, say): any word from it is a failure.
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}

#[test]
fn the_agent_tells_systemd_it_is_ready_pings_its_watchdog_and_says_when_it_stops() {
    let mut sb = Sandbox::new();
    sb.apply(
        "[[app]]\nname = \"a\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"3600\"]\nstop_grace = \"1s\"\n\
         [[app]]\nname = \"b\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"3600\"]\nstop_grace = \"1s\"\n",
    );
    let sock_path = sb.dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.recv(&mut buf) {
            g.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    sb.agent_env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    sb.start_agent();
    let ready = wait_for(Duration::from_secs(60), "READY=1", || {
        got.lock().unwrap().iter().find(|m| m.starts_with("READY=1")).cloned()
    });
    assert_eq!(ready, "READY=1\nSTATUS=generation 1: 2/2 apps running");
    for app in ["a", "b"] {
        assert_eq!(sb.app(app)["phase"], "running");
    }
    // Pings every 200 ms (half of WATCHDOG_USEC): several within a few seconds.
    let pings = || got.lock().unwrap().iter().filter(|m| *m == "WATCHDOG=1").count();
    let seen = pings();
    wait_for(Duration::from_secs(10), "watchdog pings", || (pings() >= seen + 5).then_some(()));
    // The variables are not handed down to the shims or the containers.
    let agent = sb.agent_pid().unwrap();
    let needle = sock_path.display().to_string();
    let heirs: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != agent)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| String::from_utf8_lossy(&env).contains(&needle))
        })
        .map(|pid| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .collect();
    assert!(heirs.is_empty(), "processes that inherited NOTIFY_SOCKET: {heirs:?}");
    let st = sb.stop_agent();
    assert!(st.success(), "agent exit: {st}");
    assert_eq!(got.lock().unwrap().last().map(String::as_str), Some("STOPPING=1"));
}

type Record = Vec<(String, String)>;

/// Records of journald's native protocol: `KEY=value\n`, or `KEY\n`, a
/// little-endian u64 length, the value and `\n`.
fn journal_fields(mut p: &[u8]) -> Record {
    let mut out = Vec::new();
    while !p.is_empty() {
        let Some(nl) = p.iter().position(|&b| b == b'\n') else { break };
        let line = &p[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into(),
                String::from_utf8_lossy(&line[eq + 1..]).into(),
            ));
            p = &p[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &p[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.push((key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned()));
            p = &rest[8 + len + 1..];
        }
    }
    out
}

#[test]
fn under_systemd_the_agent_logs_to_journald_with_app_fields() {
    // This machine runs no journald (the test says so and fails otherwise):
    // the test listens where journald would.
    let dir = std::path::Path::new("/run/systemd/journal");
    let path = dir.join("socket");
    assert!(
        std::os::unix::net::UnixDatagram::unbound().unwrap().connect(&path).is_err(),
        "a journald runs here: check with `journalctl SKIFF_APP=a` instead"
    );
    let _cleanup = Listening { made_dir: !dir.exists() };
    std::fs::create_dir_all(dir).unwrap();
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    let r = records.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = sock.recv(&mut buf) {
            r.lock().unwrap().push(journal_fields(&buf[..n]));
        }
    });

    let mut sb = Sandbox::new();
    sb.apply("[[app]]\nname = \"a\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"3600\"]\nstop_grace = \"1s\"\n");
    // systemd hands the agent a stderr stream and names it in JOURNAL_STREAM.
    let log = sb.dir.path().join("agent.log");
    std::fs::write(&log, "").unwrap();
    let meta = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&log).unwrap());
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&log).unwrap());
    sb.agent_env = vec![("JOURNAL_STREAM".into(), format!("{meta}:{ino}"))];
    sb.start_agent();
    sb.wait_running("a");
    let find = |key: &str, value: &str, msg: &str| {
        records.lock().unwrap().iter().any(|rec| {
            rec.iter().any(|(k, v)| k == key && v == value)
                && rec.iter().any(|(k, v)| k == "MESSAGE" && v == msg)
        })
    };
    wait_for(Duration::from_secs(10), "the app's start in the journal", || {
        find("SKIFF_APP", "a", "started").then_some(())
    });
    assert!(find("SKIFF_GENERATION", "1", "applying the desired state"), "{:?}", records.lock().unwrap());
    let all = records.lock().unwrap().clone();
    // (The layer's first datagram is empty: its probe of the socket.)
    let all: Vec<_> = all.into_iter().filter(|rec| !rec.is_empty()).collect();
    assert!(
        all.iter().all(|rec| rec.iter().any(|(k, v)| k == "SYSLOG_IDENTIFIER" && v == "skiff")),
        "{all:?}"
    );
    // ...and nothing went to the plain-text stream meanwhile.
    assert_eq!(sb.agent_log(), "", "records went to stderr too");
    sb.kill_agent();
}

/// Removes the stand-in journald socket (and its directory, if the test made it).
struct Listening {
    made_dir: bool,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = std::fs::remove_file("/run/systemd/journal/socket");
        if self.made_dir {
            let _ = std::fs::remove_dir("/run/systemd/journal");
        }
    }
}
