//! Exit codes as the README's table says (0 ok, 1 failure, 2 usage, 3
//! configuration error or a host that cannot run skiff), the agent's socket
//! gone when it ends, messages that say each cause once, logs without colour
//! codes off a terminal, and `skiff logs -f | head` ending quietly. Real binaries.

use skiff_tests::agent::{alive, eventually, skiffctl_bin, Sandbox};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn wait_output(mut child: std::process::Child, within: Duration, what: &str) -> Output {
    let end = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn run(mut cmd: Command, what: &str) -> Output {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_output(child, Duration::from_secs(30), what)
}

fn keypair(dir: &Path) {
    let out = Command::new(skiffctl_bin()).args(["keygen", "--out", dir.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
}

#[test]
fn agent_configuration_errors_exit_3_and_leave_no_socket() {
    let sb = Sandbox::new();
    let d = sb.dir.path();
    keypair(d);
    let public = d.join("controller.pub");
    let garbage = d.join("garbage.pub");
    std::fs::write(&garbage, "not a key\n").unwrap();
    let public = public.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--mqtt-broker", "http://127.0.0.1:1", "--device", "pi-1", "--controller-key", public],
            "http://",
        ),
        (
            vec!["--mqtt-broker", "mqtt://127.0.0.1:1", "--device", "Pi/1", "--controller-key", public],
            "--device",
        ),
        (
            vec![
                "--mqtt-broker",
                "mqtt://127.0.0.1:1",
                "--device",
                "pi-1",
                "--controller-key",
                garbage.to_str().unwrap(),
            ],
            "garbage.pub",
        ),
        (
            vec![
                "--mqtt-broker",
                "mqtt://127.0.0.1:1",
                "--device",
                "pi-1",
                "--controller-key",
                "/nonexistent.pub",
            ],
            "/nonexistent.pub",
        ),
        (
            vec![
                "--mqtt-broker",
                "mqtts://127.0.0.1:1",
                "--device",
                "pi-1",
                "--controller-key",
                public,
                "--mqtt-ca",
                "/nonexistent/ca.pem",
            ],
            "/nonexistent/ca.pem",
        ),
        (
            vec!["--mqtt-broker", "mqtts://127.0.0.1:1", "--device", "pi-1", "--controller-key", public],
            "--mqtt-ca",
        ),
        (
            vec![
                "--mqtt-broker",
                "mqtt://127.0.0.1:1",
                "--device",
                "pi-1",
                "--controller-key",
                public,
                "--mqtt-ca",
                public,
            ],
            "mqtts://",
        ),
        (
            vec![
                "--mqtt-broker",
                "mqtt://127.0.0.1:1",
                "--device",
                "pi-1",
                "--controller-key",
                public,
                "--mqtt-keepalive",
                "0s",
            ],
            "keepalive",
        ),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["agent"];
        args.extend(flags.iter().copied());
        let out = run(sb.cmd(&args), &format!("{args:?}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: exit code; stderr: {err}");
        assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
        assert!(!sb.run_dir().join("skiff.sock").exists(), "{args:?}: the socket was left behind");
    }
    // A usage error is 2.
    let out = run(sb.cmd(&["agent", "--no-such-flag"]), "unknown flag");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn doctor_and_agent_exit_3_on_a_host_that_cannot_run_skiff() {
    let sb = Sandbox::new();
    for args in [["doctor"].as_slice(), ["agent"].as_slice()] {
        // Not root: the one thing skiff cannot do without.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(sb.cmd(&[]).get_program());
        cmd.args(args).envs(sb.cmd(&[]).get_envs().filter_map(|(k, v)| Some((k, v?))));
        let out = run(cmd, &format!("{args:?} as nobody"));
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(3), "{args:?}: {text}");
        assert!(text.contains("not running as root"), "{args:?}: {text}");
    }
    // On this host (root, cgroups) doctor passes.
    let out = run(sb.cmd(&["doctor"]), "doctor");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn agent_ends_on_sigterm_with_0_removes_its_socket_and_logs_without_colour() {
    let sb = Sandbox::new();
    let sock = sb.run_dir().join("skiff.sock");
    let child = sb.cmd(&["agent"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as i32;
    assert!(
        eventually(Duration::from_secs(10), || std::os::unix::net::UnixStream::connect(&sock).is_ok()),
        "the agent's socket never answered"
    );
    // A second agent is refused and leaves the first one's socket alone.
    let out = run(sb.cmd(&["agent"]), "second agent");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another agent is already running"));
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_ok(),
        "the second agent broke the first's socket"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = wait_output(child, Duration::from_secs(15), "agent after SIGTERM");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(!sock.exists(), "the socket outlived the agent");
    assert!(log.contains("desired state loaded"), "no log lines: {log}");
    assert!(!log.contains('\x1b'), "colour codes in a log that is not a terminal: {log:?}");
    assert!(!alive(pid as i64));
}

#[test]
fn logs_into_a_closed_pipe_end_quietly_with_0() {
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.log_dir()).unwrap();
    let lines: String = (0..200_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(sb.log_dir().join("chatty.log"), &lines).unwrap();

    // `skiff logs chatty -f | head -1`: the reader goes away after a line.
    let mut child =
        sb.cmd(&["logs", "chatty", "-f"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 7];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"line 0\n");
    drop(stdout);
    let out = wait_output(child, Duration::from_secs(10), "logs -f after its reader left");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "it complained");

    // Following a quiet log: the reader leaves while nothing is written.
    std::fs::write(sb.log_dir().join("quiet.log"), "one line\n").unwrap();
    let mut child =
        sb.cmd(&["logs", "quiet", "-f"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 9];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = wait_output(child, Duration::from_secs(10), "logs -f of a quiet app after its reader left");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn errors_say_each_cause_once() {
    let sb = Sandbox::new();
    // The state dir's parent is a regular file: every write below it fails
    // with ENOTDIR, which must be said once, not "x: Not a directory: Not a directory".
    let file = sb.dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let apps = sb.dir.path().join("apps.toml");
    std::fs::write(&apps, "[[app]]\nname = \"web\"\nimage = \"busybox:1\"\n").unwrap();
    for args in [vec!["apply", "-f", apps.to_str().unwrap()], vec!["image", "ls"]] {
        let out = run(
            {
                let mut c = sb.cmd(&args);
                c.env("SKIFF_STATE_DIR", file.join("state"));
                c
            },
            &format!("{args:?}"),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.matches("Not a directory").count(), 1, "{args:?}: cause repeated: {err}");
        assert!(err.contains(file.to_str().unwrap()), "{args:?}: no path in {err}");
    }
}
