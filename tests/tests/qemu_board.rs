//! Tests on an emulated aarch64 board: qemu-system-aarch64 (`-M virt -cpu cortex-a53`,
//! 512 MiB, 2 CPUs) with Debian's arm64 kernel, a busybox initramfs and the static aarch64
//! `skiff` from cross/build.sh. They run as root and need apt (the scripts install QEMU and
//! fetch the kernel); a missing prerequisite fails the test with the script's message.
//!
//! The harness ([`board`]) boots the board once per call with a shell script as the test,
//! returns the console and how the run ended, and can cut the power (SIGKILL QEMU) a chosen
//! time after a chosen line appears. Boots are serialized: one board at a time, so timings
//! hold on a 2-core machine.

use board::{Disk, Ending, GuestRun, PowerCut};
use std::time::Duration;

mod board {
    //! The emulated board: cross/qemu/prepare.sh builds it, cross/qemu/run.sh boots it.
    //! Every QEMU process is killed (with its process group) when its run ends, times out
    //! or the test panics; every file lives in a temp dir removed on drop.

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

    pub fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
    }

    /// Runs `cmd` to completion; panics with its output if it fails.
    fn run_script(what: &str, cmd: &mut Command) -> String {
        let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Builds the static aarch64 binaries and the board, once per test process. A failure is
    /// remembered: every test fails with the same message instead of rebuilding.
    pub fn prepare() {
        static READY: OnceLock<Result<(), String>> = OnceLock::new();
        let ready = READY.get_or_init(|| {
            std::panic::catch_unwind(|| {
                assert!(
                    nix::unistd::geteuid().is_root(),
                    "the QEMU board tests run as root: cross/qemu/prepare.sh installs \
                     qemu-system-arm and fetches Debian's arm64 kernel with apt"
                );
                let root = repo();
                if std::env::var_os("SKIFF_GUEST_BIN").is_none() {
                    run_script(
                        "cross/build.sh aarch64",
                        Command::new("bash")
                            .arg(root.join("cross/build.sh"))
                            .arg("aarch64")
                            .current_dir(&root),
                    );
                }
                run_script(
                    "cross/qemu/prepare.sh",
                    Command::new("bash").arg(root.join("cross/qemu/prepare.sh")),
                );
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
                Err(format!(
                    "{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        }
    }

    /// Cut the power (SIGKILL QEMU) `delay` after the first console line containing `after_line`.
    #[derive(Clone, Debug)]
    pub struct PowerCut {
        pub after_line: String,
        pub delay: Duration,
    }

    /// One boot of the board.
    pub struct GuestRun<'a> {
        /// Run by busybox sh as /skiff/test.sh, stdin /dev/null, output on the console.
        pub script: &'a str,
        /// Attached as /dev/vda and mounted on /var/lib/skiff.
        pub disk: Option<&'a Path>,
        /// From the start of QEMU to its exit; past it QEMU is killed.
        pub timeout: Duration,
        pub cut: Option<PowerCut>,
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
            self.console.iter().find_map(|l| l.strip_prefix(prefix)).map(str::trim_end)
        }

        /// Like [`value`](Self::value), panicking with the transcript when the line is missing.
        pub fn expect_value(&self, prefix: &str) -> &str {
            self.value(prefix)
                .unwrap_or_else(|| panic!("no console line starting with {prefix:?}\n{}", self.transcript()))
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
        run_guest_with(&GuestRun { script, disk, timeout, cut: None })
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
        cmd.arg(&script).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);

        let start = Instant::now();
        let mut child = cmd.spawn().expect("start cross/qemu/run.sh");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut stderr = child.stderr.take().expect("stderr piped");
        let mut running = Running { child, reaped: None };

        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).replace('\r', "");
                        let line = line.strip_suffix('\n').unwrap_or(&line).to_string();
                        if tx.send(line).is_err() {
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
            elapsed: Duration::ZERO,
        };
        let mut powered_off = false;
        let mut killed: Option<Ending> = None;
        loop {
            let now = Instant::now();
            let wake = cut_at.map_or(deadline, |c| c.min(deadline));
            if now >= wake {
                killed =
                    Some(if cut_at.is_some_and(|c| now >= c) { Ending::PowerCut } else { Ending::TimedOut });
                running.kill();
                break;
            }
            match rx.recv_timeout(wake - now) {
                Ok(line) => {
                    println!("board| {line}");
                    if let Some(m) = line.strip_prefix(MARK) {
                        if let Some(up) = m.strip_prefix("init uptime=") {
                            out.boot_to_init.get_or_insert(start.elapsed());
                            out.init_uptime = up.trim().parse().ok();
                        } else if let Some(rc) = m.strip_prefix("exit=") {
                            out.script_exit = rc.trim().parse().ok();
                        } else if m.trim() == "poweroff" {
                            powered_off = true;
                        }
                    }
                    if let Some(cut) = &run.cut {
                        if cut_at.is_none() && line.contains(&cut.after_line) {
                            cut_at = Some(Instant::now() + cut.delay);
                        }
                    }
                    out.console.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = running.wait();
        // What QEMU had printed before the kill is still in the pipe.
        out.console.extend(rx.try_iter());
        let _ = reader.join();
        out.qemu_stderr = err_reader.join().unwrap_or_default();
        out.elapsed = start.elapsed();
        out.ending = match killed {
            Some(k) => k,
            None if powered_off && status.success() => Ending::PoweredOff,
            None => Ending::Exited(status),
        };
        out
    }
}

/// The board boots, runs the static aarch64 skiff, and has what containers need:
/// cgroup2 with the cpu, memory and pids controllers, and overlayfs.
#[test]
fn board_smoke() {
    let script = r#"
set -eu
echo "SMOKE-ARCH: $(uname -m)"
if v=$(skiff --version 2>&1); then :; else
    echo "skiff --version failed: $v"
    v=$(skiff --help 2>&1 | head -n 1)
fi
echo "SMOKE-SKIFF: $v"

ctl=" $(cat /sys/fs/cgroup/cgroup.subtree_control) "
echo "SMOKE-CGROUP: $ctl"
for c in cpu memory pids; do
    case "$ctl" in *" $c "*) ;; *) echo "cgroup controller $c not enabled"; exit 1 ;; esac
done
mkdir /sys/fs/cgroup/smoke
for f in cpu.max memory.max pids.max; do test -f "/sys/fs/cgroup/smoke/$f"; done
rmdir /sys/fs/cgroup/smoke

o=/tmp/overlay
mkdir -p $o/lower $o/upper $o/work $o/merged
echo lower > $o/lower/f
mount -t overlay overlay -o lowerdir=$o/lower,upperdir=$o/upper,workdir=$o/work $o/merged
test "$(cat $o/merged/f)" = lower
echo upper > $o/merged/g
test -f $o/upper/g
umount $o/merged
echo "SMOKE-OVERLAY: ok"

rc=0
skiff doctor || rc=$?
echo "SMOKE-DOCTOR: rc=$rc"
echo SMOKE-OK
"#;
    let out = board::run_guest(script, None, Duration::from_secs(60));
    out.assert_success();
    assert!(out.has_line("SMOKE-OK"), "{}", out.transcript());
    assert_eq!(out.expect_value("SMOKE-ARCH: "), "aarch64");
    let version = out.expect_value("SMOKE-SKIFF: ");
    assert!(version.contains("skiff"), "skiff did not run: {version:?}\n{}", out.transcript());
    assert_eq!(out.expect_value("SMOKE-OVERLAY: "), "ok");
    println!(
        "boot-to-/init: {:?} from QEMU start (guest uptime {:?} s); whole run {:?}",
        out.boot_to_init, out.init_uptime, out.elapsed
    );
}

/// The power-cut harness: the state disk survives a cut (SIGKILL QEMU at a random moment
/// while the guest writes), the journal replays on the next boot, and what was synced
/// before the cut is there.
#[test]
fn board_state_disk_survives_power_cut() {
    let disk = Disk::new(64);
    let token = format!("{:016x}", rand::random::<u64>());
    let write = format!(
        r#"
set -eu
cd /var/lib/skiff
test -d lost+found
echo "{token}" > probe.tmp
sync
mv probe.tmp probe
sync
echo PERSIST-WRITTEN
i=0
while :; do echo "unsynced $i" >> junk; i=$((i + 1)); done
"#
    );
    let delay = Duration::from_millis(rand::random::<u64>() % 1000);
    let cut = board::run_guest_with(&GuestRun {
        script: &write,
        disk: Some(disk.path()),
        timeout: Duration::from_secs(60),
        cut: Some(PowerCut { after_line: "PERSIST-WRITTEN".into(), delay }),
    });
    assert_eq!(
        cut.ending,
        Ending::PowerCut,
        "boot 1 was to be cut {delay:?} after the write\n{}",
        cut.transcript()
    );

    let read = r#"
set -eu
echo "PERSIST-READ: $(cat /var/lib/skiff/probe)"
if dmesg | grep -q 'EXT4-fs (vda): recovery complete'; then echo "PERSIST-JOURNAL: replayed"; fi
"#;
    let out = board::run_guest(read, Some(disk.path()), Duration::from_secs(60));
    out.assert_success();
    assert_eq!(out.expect_value("PERSIST-READ: "), token, "{}", out.transcript());
    assert_eq!(out.expect_value("PERSIST-JOURNAL: "), "replayed", "boot 1 did not end uncleanly?");
    disk.fsck().unwrap_or_else(|e| panic!("file system damaged after the cut and a clean boot:\n{e}"));
}

/// A guest that never finishes is killed at the timeout, not waited on forever.
#[test]
fn board_hung_guest_times_out() {
    let out = board::run_guest("echo HANG-START; sleep 600", None, Duration::from_secs(20));
    assert_eq!(out.ending, Ending::TimedOut, "{}", out.transcript());
    assert!(out.has_line("HANG-START"), "the guest never ran the script\n{}", out.transcript());
    assert!(out.elapsed < Duration::from_secs(30), "the kill took {:?}", out.elapsed);
}
