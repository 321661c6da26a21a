//! The emulated aarch64 board, for tests and benchmarks: qemu-system-aarch64 (`-M virt -cpu
//! cortex-a53`, 512 MiB, 2 CPUs, no network) with Debian's arm64 kernel, a busybox initramfs
//! and the static aarch64 `skiff` from cross/build.sh. cross/qemu/prepare.sh builds the board,
//! cross/qemu/run.sh boots it, cross/qemu/init.sh is its /init.
//!
//! One call boots the board once with a shell script as the test and returns the console and
//! how the run ended; it can cut the power (SIGKILL QEMU) a chosen time after a chosen line
//! appears. Boots are serialized (one board at a time per process), so timings hold on a
//! 2-core machine. Every QEMU process is killed (with its process group) when its run ends,
//! times out or the caller panics; every file lives in a temp dir removed on drop.
//!
//! Needs root: the scripts install QEMU with apt and fetch the kernel; a missing
//! prerequisite fails with the script's message.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Prefix of the lines cross/qemu/init.sh prints for the harness.
const MARK: &str = "@@SKIFF-GUEST ";

/// Shell functions for guest scripts (busybox sh). Put it at the top of a script.
///
/// - `up`: the guest's uptime in seconds (`/proc/uptime`, 10 ms steps).
/// - `start_agent [ARGS]`: `skiff agent` in the background with short restart delays
///   (300ms, at most 1s) and ARGS, its log in /tmp/agent.log.
/// - `wait_running N SECS`: waits until `skiff ps` shows N apps running; returns 1 after SECS.
/// - `until_ps AWK-CONDITION SECS`: waits until a line of `skiff ps` matches the awk condition
///   (`$1` app, `$2` state, `$3` pid, `$6` restarts, `$7` last exit: `code`, `signal` or
///   `oom-killed`); returns 1 after SECS.
/// - `ps_line PREFIX`: prints PREFIX and `skiff ps --json` on one line (see
///   [`GuestOutput::json`]).
/// - `agent_log`: prints the agent's log, indented.
pub const GUEST_LIB: &str = r#"
up() { read -r _u _ </proc/uptime; echo "$_u"; }
start_agent() {
    NO_COLOR=1 skiff agent --backoff-base 300ms --backoff-max 1s "$@" 2>/tmp/agent.log &
    AGENT_PID=$!
}
wait_running() {
    _end=$(( $(cut -d. -f1 /proc/uptime) + $2 ))
    while :; do
        _n=$(skiff ps --json 2>/dev/null | grep -c '"phase": "running"')
        [ "${_n:-0}" -ge "$1" ] && return 0
        [ "$(cut -d. -f1 /proc/uptime)" -ge "$_end" ] && return 1
        sleep 0.05
    done
}
until_ps() {
    _end=$(( $(cut -d. -f1 /proc/uptime) + $2 ))
    until skiff ps 2>/dev/null | awk "NR > 2 && ($1) { f = 1 } END { exit !f }"; do
        [ "$(cut -d. -f1 /proc/uptime)" -ge "$_end" ] && return 1
        sleep 0.1
    done
}
ps_line() { echo "$1$(skiff ps --json 2>&1 | tr -d '\n')"; }
agent_log() { sed 's/^/    agent| /' /tmp/agent.log; }
"#;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Runs `cmd` to completion; panics with its output if it fails.
fn run_script(what: &str, cmd: &mut Command) -> String {
    let start = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    println!("board: {what} took {:?}", start.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Builds what the board needs, once per process: the static aarch64 binaries
/// (cross/build.sh, unless `SKIFF_GUEST_BIN` names one), the busybox test image (images/build.sh,
/// when images/out has none) and the board itself (cross/qemu/prepare.sh). Each step is a
/// no-op when its output is up to date. A failure is remembered: every caller fails with the
/// same message instead of rebuilding.
pub fn prepare() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        std::panic::catch_unwind(|| {
            assert!(
                nix::unistd::geteuid().is_root(),
                "the QEMU board runs as root: cross/qemu/prepare.sh installs \
                 qemu-system-arm and fetches Debian's arm64 kernel with apt"
            );
            let root = repo();
            if std::env::var_os("SKIFF_GUEST_BIN").is_none() {
                run_script(
                    "cross/build.sh aarch64",
                    Command::new("bash").arg(root.join("cross/build.sh")).arg("aarch64").current_dir(&root),
                );
            }
            if std::env::var_os("SKIFF_GUEST_IMAGES").is_none()
                && !root.join("images/out/busybox/index.json").exists()
            {
                run_script("images/build.sh", Command::new("bash").arg(root.join("images/build.sh")));
            }
            run_script("cross/qemu/prepare.sh", Command::new("bash").arg(root.join("cross/qemu/prepare.sh")));
        })
        .map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "preparing the board panicked".into())
        })
    });
    if let Err(e) = ready {
        panic!("{e}");
    }
}

/// A raw ext4 image for the board's /var/lib/skiff, in its own temp dir.
pub struct Disk {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Disk {
    pub fn new(size_mib: u32) -> Disk {
        prepare(); // installs e2fsprogs
        let dir = tempfile::Builder::new().prefix("skiff-board-disk-").tempdir().expect("tempdir");
        let path = dir.path().join("sd.img");
        run_script(
            "cross/qemu/mkdisk.sh",
            Command::new("bash")
                .arg(repo().join("cross/qemu/mkdisk.sh"))
                .arg(&path)
                .arg(size_mib.to_string()),
        );
        Disk { _dir: dir, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `e2fsck -fn`: Ok when the file system is consistent, else its report.
    pub fn fsck(&self) -> Result<(), String> {
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(&self.path)
            .env("PATH", format!("{}:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default()))
            .output()
            .expect("e2fsck");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    }
}

/// Cut the power (SIGKILL QEMU) `delay` after the first console line containing `after_line`.
#[derive(Clone, Debug)]
pub struct PowerCut {
    pub after_line: String,
    pub delay: Duration,
}

/// One boot of the board. Build it with [`GuestRun::new`] and set the fields that differ.
pub struct GuestRun<'a> {
    /// Run by busybox sh as /skiff/test.sh, stdin /dev/null, output on the console.
    pub script: &'a str,
    /// Attached as /dev/vda and mounted on /var/lib/skiff.
    pub disk: Option<&'a Path>,
    /// From the start of QEMU to its exit; past it QEMU is killed.
    pub timeout: Duration,
    pub cut: Option<PowerCut>,
    /// Extra kernel command line arguments, e.g. `skiff.cgroup=v1` (see cross/qemu/init.sh).
    pub kernel_args: &'a str,
    /// Do not echo the console to stdout as it comes (benchmarks; tests leave it on, the
    /// test harness captures it).
    pub quiet: bool,
}

impl<'a> GuestRun<'a> {
    pub fn new(script: &'a str, timeout: Duration) -> GuestRun<'a> {
        GuestRun { script, disk: None, timeout, cut: None, kernel_args: "", quiet: false }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// init ran the script and powered off cleanly (disk unmounted).
    PoweredOff,
    /// The harness cut the power as asked.
    PowerCut,
    /// Still running at the timeout: killed.
    TimedOut,
    /// QEMU exited without a clean power-off: a guest panic (panic=-1 and -no-reboot make
    /// QEMU exit), or run.sh/QEMU failing to start (see `qemu_stderr`).
    Exited(ExitStatus),
}

#[derive(Debug)]
pub struct GuestOutput {
    /// Console lines, '\r' removed.
    pub console: Vec<String>,
    pub qemu_stderr: String,
    pub ending: Ending,
    /// The test script's exit code, if it finished.
    pub script_exit: Option<i32>,
    /// Host time from starting QEMU to /init's first line.
    pub boot_to_init: Option<Duration>,
    /// The guest's uptime at /init's first line (kernel boot, as the guest measured it).
    pub init_uptime: Option<f64>,
    /// Host time from starting QEMU to the first console line containing the cut's
    /// `after_line`, when a cut was asked for and the line came.
    pub cut_line_at: Option<Duration>,
    /// Host time from starting QEMU to each console line (same order as `console`).
    pub line_times: Vec<Duration>,
    pub elapsed: Duration,
}

impl GuestOutput {
    pub fn transcript(&self) -> String {
        format!(
            "ending: {:?}, script exit: {:?}, elapsed {:?}\n--- console\n{}\n--- qemu stderr\n{}",
            self.ending,
            self.script_exit,
            self.elapsed,
            self.console.join("\n"),
            self.qemu_stderr
        )
    }

    /// Panics, with the whole transcript, unless the script exited 0 and the board powered off.
    pub fn assert_success(&self) {
        assert!(
            self.ending == Ending::PoweredOff && self.script_exit == Some(0),
            "guest run failed\n{}",
            self.transcript()
        );
    }

    pub fn has_line(&self, line: &str) -> bool {
        self.console.iter().any(|l| l.trim_end() == line)
    }

    /// The rest of the first console line that starts with `prefix`.
    pub fn value(&self, prefix: &str) -> Option<&str> {
        self.values(prefix).next()
    }

    /// The rest of every console line that starts with `prefix`, in order.
    pub fn values<'s>(&'s self, prefix: &str) -> impl Iterator<Item = &'s str> + 's {
        let prefix = prefix.to_string();
        self.console.iter().filter_map(move |l| l.strip_prefix(prefix.as_str())).map(str::trim_end)
    }

    /// Like [`value`](Self::value), panicking with the transcript when the line is missing.
    pub fn expect_value(&self, prefix: &str) -> &str {
        self.value(prefix)
            .unwrap_or_else(|| panic!("no console line starting with {prefix:?}\n{}", self.transcript()))
    }

    /// [`expect_value`](Self::expect_value) parsed as a number.
    pub fn expect_f64(&self, prefix: &str) -> f64 {
        let v = self.expect_value(prefix);
        v.parse().unwrap_or_else(|_| {
            panic!("{prefix:?} is followed by {v:?}, not a number\n{}", self.transcript())
        })
    }

    /// The last console line starting with `prefix`, parsed as JSON (e.g. what the guest
    /// library's `ps_line` prints).
    pub fn json(&self, prefix: &str) -> serde_json::Value {
        let v = self
            .values(prefix)
            .last()
            .unwrap_or_else(|| panic!("no console line starting with {prefix:?}\n{}", self.transcript()));
        serde_json::from_str(v)
            .unwrap_or_else(|e| panic!("{prefix:?} is followed by no JSON ({e}): {v}\n{}", self.transcript()))
    }

    /// Host time from starting QEMU to the first console line that starts with `prefix`.
    pub fn line_time(&self, prefix: &str) -> Option<Duration> {
        self.console.iter().position(|l| l.starts_with(prefix)).map(|i| self.line_times[i])
    }
}

/// Kills QEMU and everything run.sh started (its own process group) unless already reaped.
struct Running {
    child: Child,
    reaped: Option<ExitStatus>,
}

impl Running {
    fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.reaped {
            return s;
        }
        let pgid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        // ESRCH: already gone; the wait below reaps it either way.
        let _ = killpg(pgid, Signal::SIGKILL);
        let s = self.child.wait().expect("wait for QEMU");
        self.reaped = Some(s);
        s
    }

    fn wait(&mut self) -> ExitStatus {
        if let Some(s) = self.reaped {
            return s;
        }
        // run.sh execs QEMU after its own helpers (cp, cpio) have finished, so once QEMU
        // is reaped nothing of the group is left, and its id may be reused: no killpg here.
        let s = self.child.wait().expect("wait for QEMU");
        self.reaped = Some(s);
        s
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn run_guest(script: &str, disk: Option<&Path>, timeout: Duration) -> GuestOutput {
    run_guest_with(&GuestRun { disk, ..GuestRun::new(script, timeout) })
}

pub fn run_guest_with(run: &GuestRun) -> GuestOutput {
    static ONE_BOARD: Mutex<()> = Mutex::new(());
    prepare();
    let _one = ONE_BOARD.lock().unwrap_or_else(|e| e.into_inner());

    let dir = tempfile::Builder::new().prefix("skiff-board-run-").tempdir().expect("tempdir");
    let script = dir.path().join("test.sh");
    std::fs::write(&script, run.script).expect("write the guest script");
    let work = dir.path().join("work");

    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("cross/qemu/run.sh")).arg("--workdir").arg(&work);
    if let Some(disk) = run.disk {
        cmd.arg("--disk").arg(disk);
    }
    if !run.kernel_args.is_empty() {
        cmd.arg("--append").arg(run.kernel_args);
    }
    cmd.arg(&script).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);

    let start = Instant::now();
    let mut child = cmd.spawn().expect("start cross/qemu/run.sh");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut stderr = child.stderr.take().expect("stderr piped");
    let mut running = Running { child, reaped: None };

    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = Instant::now();
                    let line = String::from_utf8_lossy(&buf).replace('\r', "");
                    let line = line.strip_suffix('\n').unwrap_or(&line).to_string();
                    if tx.send((at, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let deadline = start + run.timeout;
    let mut cut_at: Option<Instant> = None;
    let mut out = GuestOutput {
        console: Vec::new(),
        qemu_stderr: String::new(),
        ending: Ending::TimedOut,
        script_exit: None,
        boot_to_init: None,
        init_uptime: None,
        cut_line_at: None,
        line_times: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let mut powered_off = false;
    let mut killed: Option<Ending> = None;
    loop {
        let now = Instant::now();
        let wake = cut_at.map_or(deadline, |c| c.min(deadline));
        if now >= wake {
            killed = Some(if cut_at.is_some_and(|c| now >= c) { Ending::PowerCut } else { Ending::TimedOut });
            running.kill();
            break;
        }
        match rx.recv_timeout(wake - now) {
            Ok((at, line)) => {
                if !run.quiet {
                    println!("board| {line}");
                }
                if let Some(m) = line.strip_prefix(MARK) {
                    if let Some(up) = m.strip_prefix("init uptime=") {
                        out.boot_to_init.get_or_insert(at - start);
                        out.init_uptime = up.trim().parse().ok();
                    } else if let Some(rc) = m.strip_prefix("exit=") {
                        out.script_exit = rc.trim().parse().ok();
                    } else if m.trim() == "poweroff" {
                        powered_off = true;
                    }
                }
                if let Some(cut) = &run.cut {
                    if cut_at.is_none() && line.contains(&cut.after_line) {
                        // From when the reader saw the line, not when this loop got to it.
                        cut_at = Some(at + cut.delay);
                        out.cut_line_at = Some(at - start);
                    }
                }
                out.console.push(line);
                out.line_times.push(at - start);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = running.wait();
    // What QEMU had printed before the kill is still in the pipe: the reader gets to its end
    // now that QEMU is gone.
    let _ = reader.join();
    for (at, line) in rx.try_iter() {
        out.console.push(line);
        out.line_times.push(at - start);
    }
    out.qemu_stderr = err_reader.join().unwrap_or_default();
    out.elapsed = start.elapsed();
    out.ending = match killed {
        Some(k) => k,
        None if powered_off && status.success() => Ending::PoweredOff,
        None => Ending::Exited(status),
    };
    out
}
