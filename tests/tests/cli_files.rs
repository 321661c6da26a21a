//! Files named on the command line are bounded (`skiff` and `skiffctl`): no
//! device is read until memory runs out, no FIFO blocks, no file over the
//! limit is read, and `skiff apply` never stores what the agent cannot load
//! or reuses a generation. Real binaries, real files and FIFOs.

use skiff_common::codec::state_file;
use skiff_tests::agent::{skiffctl_bin, Sandbox};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd`; fails the test if it has not ended within 20 s (a read that
/// blocks on a FIFO, or one that reads /dev/zero until memory runs out).
fn bounded(mut cmd: Command) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn fifo(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
    p
}

fn refused(out: &Output, what: &str, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{what}: exit code; stderr: {err}");
    assert!(err.contains(needle), "{what}: {needle:?} not in: {err}");
}

#[test]
fn skiff_refuses_devices_fifos_and_oversized_files_and_changes_nothing() {
    let sb = Sandbox::new();
    sb.apply("[[app]]\nname = \"keep\"\nimage = \"busybox:1\"\n");
    let stored = std::fs::read(sb.state_dir().join("desired.skf")).unwrap();
    let dir = sb.dir.path();
    let fifo = fifo(dir, "apps.fifo");
    let big = dir.join("big.toml");
    // Valid TOML (a comment) over the 4 MiB limit on a desired-state file.
    std::fs::write(&big, format!("#{}\n", "x".repeat(5 << 20))).unwrap();
    for cmd in ["validate", "apply"] {
        for (file, needle) in [
            (Path::new("/dev/zero"), "/dev/zero: not a regular file (it is a character device)".to_string()),
            (fifo.as_path(), format!("{}: not a regular file (it is a FIFO)", fifo.display())),
            (dir, format!("{}: not a regular file (it is a directory)", dir.display())),
            (big.as_path(), format!("{}: 5242882 bytes, more than the 4194304 bytes allowed", big.display())),
        ] {
            let out = bounded(sb.cmd(&[cmd, "-f", file.to_str().unwrap()]));
            refused(&out, &format!("skiff {cmd} -f {}", file.display()), &needle);
        }
    }
    assert_eq!(std::fs::read(sb.state_dir().join("desired.skf")).unwrap(), stored);
}

#[test]
fn skiffctl_refuses_devices_fifos_and_oversized_files_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = Command::new(skiffctl_bin()).args(["keygen", "--out", d.to_str().unwrap()]).output().unwrap();
    assert!(keys.status.success());
    let apps = d.join("apps.toml");
    std::fs::write(&apps, "[[app]]\nname = \"web\"\nimage = \"busybox:1\"\n").unwrap();
    let key = d.join("controller.key");
    let fleet = d.join("fleet.toml");
    std::fs::write(&fleet, "[group.g]\ndevices = [\"pi-1\"]\n").unwrap();
    let fifo = fifo(d, "x.fifo");
    let big = d.join("big");
    std::fs::write(&big, vec![b'#'; (4 << 20) + 1]).unwrap();
    // Nothing listens on this port: a file check that came after the
    // connection would show up as a connection error instead.
    let broker = format!("mqtt://127.0.0.1:{}", free_port());
    let run = |file: &Path, key: &Path, fleet: Option<&Path>| {
        let mut c = Command::new(skiffctl_bin());
        c.args(["apply", "-f", file.to_str().unwrap(), "--key", key.to_str().unwrap(), "--broker", &broker]);
        c.args(["--timeout", "1"]);
        match fleet {
            Some(f) => c.args(["--group", "g", "--fleet", f.to_str().unwrap()]),
            None => c.args(["--device", "pi-1"]),
        };
        bounded(c)
    };
    for (bad, needle) in [
        (Path::new("/dev/zero"), "/dev/zero: not a regular file".to_string()),
        (fifo.as_path(), format!("{}: not a regular file (it is a FIFO)", fifo.display())),
        (big.as_path(), format!("{}: 4194305 bytes, more than the 4194304 bytes allowed", big.display())),
    ] {
        refused(&run(bad, &key, None), &format!("apply -f {}", bad.display()), &needle);
        refused(
            &run(&apps, bad, None),
            &format!("apply --key {}", bad.display()),
            &needle.replace("4194304 bytes", "65536 bytes"),
        );
        refused(&run(&apps, &key, Some(bad)), &format!("apply --fleet {}", bad.display()), &needle);
    }
    // TLS files too.
    let mut c = Command::new(skiffctl_bin());
    c.args(["status", "--broker", "mqtts://127.0.0.1:1", "--ca", fifo.to_str().unwrap(), "--timeout", "1"]);
    refused(&bounded(c), "status --ca FIFO", "not a regular file (it is a FIFO)");
    // The same files, sane, get as far as the (absent) broker: exit 1, not 3.
    let out = run(&apps, &key, Some(&fleet));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn apply_refuses_a_state_the_agent_could_not_load_and_never_reuses_a_generation() {
    let sb = Sandbox::new();
    let state = sb.state_dir().join("desired.skf");
    let prev = sb.state_dir().join("desired.prev.skf");
    sb.apply("[[app]]\nname = \"one\"\nimage = \"busybox:1\"\n");
    sb.apply("[[app]]\nname = \"two\"\nimage = \"busybox:1\"\n");
    let (cur_bytes, prev_bytes) = (std::fs::read(&state).unwrap(), std::fs::read(&prev).unwrap());
    // Under the TOML limit, over the encoded-state limit the agent reads.
    let pad = "x".repeat(state_file::LIMIT + 1000);
    let out = sb
        .try_apply(&format!("[[app]]\nname = \"big\"\nimage = \"busybox:1\"\nenv = {{ PAD = \"{pad}\" }}\n"));
    refused(&out, "apply of an oversized state", "over the limit of 1048576");
    assert_eq!(std::fs::read(&state).unwrap(), cur_bytes, "desired.skf changed");
    assert_eq!(std::fs::read(&prev).unwrap(), prev_bytes, "desired.prev.skf changed");

    // desired.skf (generation 2) is damaged: the next apply neither keeps the
    // damaged file as the previous generation nor hands out 2 again.
    let mut damaged = cur_bytes.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    std::fs::write(&state, &damaged).unwrap();
    sb.apply("[[app]]\nname = \"three\"\nimage = \"busybox:1\"\n");
    let now = state_file::decode(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(now.generation, 3, "a generation was reused");
    assert_eq!(std::fs::read(&prev).unwrap(), prev_bytes, "the damaged file became desired.prev.skf");
}
