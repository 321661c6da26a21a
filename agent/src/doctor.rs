//! Host checks: what skiff needs from the kernel and the system, each with the
//! fix a person can apply. `skiff doctor` prints them all; the agent runs them
//! at start and refuses to run, with one clear message, when one fails. What
//! only degrades the board (a wrong clock, a nearly full disk) warns: the
//! agent still runs its apps.
//!
//! The checks read the host through [`Host`] (a root directory for `/proc`,
//! `/sys` and `/boot`, and the clock), so tests run them on fake roots.

pub mod link;

use crate::paths::Paths;
use crate::runtime::cgroups::Cgroups;
use crate::runtime::spec::CgroupVersion;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What the checks read of the host.
pub struct Host {
    /// Where `/proc`, `/sys` and `/boot` are found (`/` on a real host).
    pub root: PathBuf,
    pub now: SystemTime,
}

impl Host {
    pub fn real() -> Host {
        Host { root: PathBuf::from("/"), now: SystemTime::now() }
    }

    fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    fn read(&self, abs: &str) -> Option<String> {
        std::fs::read_to_string(self.path(abs)).ok()
    }
}

/// A clock before this (2026-01-01) is wrong: a board without a real-time
/// clock that booted without network, most likely in 1970.
const CLOCK_FLOOR_SECS: u64 = 1_767_225_600;
/// Less free space than this on the state dir's file system warns.
const LOW_SPACE: u64 = 256 << 20;

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Serialize, Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    /// What to do about it, when it is not Ok.
    pub fix: Option<String>,
}

fn check(name: &'static str, level: Level, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check { name, level, detail: detail.into(), fix: fix.map(str::to_string) }
}

pub fn run(paths: &Paths) -> Vec<Check> {
    run_on(&Host::real(), paths)
}

pub fn run_on(host: &Host, paths: &Paths) -> Vec<Check> {
    let mut out = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    out.push(if root {
        check("root", Level::Ok, "running as root", None)
    } else {
        check("root", Level::Fail, "not running as root", Some("run skiff as root (containers need it)"))
    });
    let cgroups = host.read("/proc/self/mountinfo").and_then(|info| {
        Cgroups::from_mountinfo(&info, |p| std::fs::read_to_string(host.path(&p.to_string_lossy())).ok())
    });
    match cgroups {
        None => out.push(check(
            "cgroups",
            Level::Fail,
            "no cgroup file system is mounted",
            Some("mount cgroup2 at /sys/fs/cgroup (mount -t cgroup2 none /sys/fs/cgroup)"),
        )),
        Some(c) => {
            let v = match c.version {
                CgroupVersion::V1 => "v1",
                CgroupVersion::V2 => "v2",
            };
            out.push(check(
                "cgroups",
                Level::Ok,
                format!("cgroup {v}, controllers: {}", c.controllers.join(" ")),
                None,
            ));
            for ctrl in ["memory", "cpu", "pids"] {
                if c.controllers.iter().any(|x| x == ctrl) {
                    continue;
                }
                let fix = if ctrl == "memory" {
                    memory_fix(host)
                } else {
                    "enable the controller in the kernel configuration or the cgroup mount".to_string()
                };
                out.push(check(
                    if ctrl == "memory" {
                        "memory controller"
                    } else if ctrl == "cpu" {
                        "cpu controller"
                    } else {
                        "pids controller"
                    },
                    Level::Fail,
                    format!("the {ctrl} cgroup controller is not available"),
                    Some(&fix),
                ));
            }
            out.push(headroom(host, &c, &paths.cgroup_root));
        }
    }
    out.push(clock(host.now));
    let fs = host.read("/proc/filesystems").unwrap_or_default();
    let overlay = fs.lines().any(|l| l.trim_end().ends_with("overlay"));
    out.push(if overlay {
        check("overlayfs", Level::Ok, "available: containers share the image's files", None)
    } else {
        check(
            "overlayfs",
            Level::Warn,
            "not available: every container gets a full copy of its image (slower, uses more space)",
            Some("load the module: modprobe overlay"),
        )
    });
    for (name, dir) in [("state dir", &paths.state_dir), ("run dir", &paths.run_dir)] {
        // Asks the kernel rather than writing a probe file: doctor writes nothing.
        // A dir that does not exist yet is created by the agent in its parent.
        let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
        let ok = nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK).is_ok();
        out.push(if ok {
            check(name, Level::Ok, format!("{} is writable", dir.display()), None)
        } else {
            check(
                name,
                Level::Fail,
                format!("{} is not writable", dir.display()),
                Some("check the path and its file system (read-only root?)"),
            )
        });
    }
    out.push(space(&paths.state_dir));
    out
}

/// The exact fix for a missing memory controller, naming the boot file this
/// board has (Raspberry Pi OS: `/boot/firmware/cmdline.txt` since bookworm,
/// `/boot/cmdline.txt` before) and what the kernel command line says now.
fn memory_fix(host: &Host) -> String {
    let cmdline = host.read("/proc/cmdline").unwrap_or_default();
    let disabled = cmdline.split_whitespace().any(|w| w == "cgroup_disable=memory");
    let file =
        ["/boot/firmware/cmdline.txt", "/boot/cmdline.txt"].into_iter().find(|f| host.path(f).is_file());
    let why = if disabled { " (the kernel command line has cgroup_disable=memory)" } else { "" };
    match file {
        Some(f) => format!(
            "append ` cgroup_enable=memory cgroup_memory=1` to the one line of {f} and reboot{why}"
        ),
        None => format!(
            "add `cgroup_enable=memory cgroup_memory=1` to the kernel command line (/boot/firmware/cmdline.txt on Raspberry Pi OS) and reboot{why}"
        ),
    }
}

/// TLS (broker, registries) fails with a clock in the past; apps still run.
fn clock(now: SystemTime) -> Check {
    let secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let date = civil_date(secs);
    if secs >= CLOCK_FLOOR_SECS {
        check("clock", Level::Ok, format!("{date} UTC"), None)
    } else {
        check(
            "clock",
            Level::Warn,
            format!("the clock reads {date}: TLS to the broker and registries will fail until it is set"),
            Some("enable time sync (systemctl enable --now systemd-timesyncd) or fit a real-time clock; apps keep running meanwhile"),
        )
    }
}

/// `YYYY-MM-DD` of a Unix time (proleptic Gregorian, UTC).
fn civil_date(secs: u64) -> String {
    // Days to a civil date (Howard Hinnant's algorithm, shifted to March-based years).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Free space where the state and the image store live.
// The casts widen on 32-bit ARM (fsblkcnt_t and unsigned long are 32 bits there).
#[allow(clippy::unnecessary_cast)]
fn space(state_dir: &Path) -> Check {
    let existing = state_dir.ancestors().find(|p| p.exists()).unwrap_or(state_dir);
    match nix::sys::statvfs::statvfs(existing) {
        Ok(st) => {
            space_check(state_dir, (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
        }
        Err(e) => check(
            "disk space",
            Level::Warn,
            format!("cannot read free space of {}: {e}", state_dir.display()),
            None,
        ),
    }
}

fn space_check(state_dir: &Path, free: u64) -> Check {
    let mib = free >> 20;
    if free >= LOW_SPACE {
        check(
            "disk space",
            Level::Ok,
            format!("{mib} MiB free for {} (state, images)", state_dir.display()),
            None,
        )
    } else {
        check(
            "disk space",
            Level::Warn,
            format!("only {mib} MiB free for {} (state, images): pulls will fail", state_dir.display()),
            Some("free space (skiff image ls / skiff image rm, or --image-budget) or use a larger card"),
        )
    }
}

/// What the default reserve leaves for apps on this board, and the limit the
/// parent cgroup of all apps has now (the agent sets it at start, from its
/// `--reserve-memory`).
fn headroom(host: &Host, c: &Cgroups, cgroup_root: &str) -> Check {
    use crate::headroom::{self, Board, Reserve};
    let num = |p: &str| host.read(p).and_then(|s| s.trim().parse::<u64>().ok());
    let mem_total = host.read("/proc/meminfo").as_deref().and_then(headroom::mem_total);
    let (Some(mem_total), Some(pid_max), Some(threads_max)) =
        (mem_total, num("/proc/sys/kernel/pid_max"), num("/proc/sys/kernel/threads-max"))
    else {
        return check("headroom", Level::Warn, "cannot read MemTotal, pid_max or threads-max", None);
    };
    let board = Board { mem_total, pid_max, threads_max, page_size: 4096 };
    let h = match headroom::plan(&board, &Reserve::default(), None, cgroup_root) {
        Ok(h) => h,
        Err(e) => return check("headroom", Level::Warn, e.to_string(), None),
    };
    let file = match c.version {
        CgroupVersion::V2 => "memory.max",
        CgroupVersion::V1 => "memory.limit_in_bytes",
    };
    let now = c
        .dir("memory", &h.cgroup)
        .and_then(|d| host.read(&d.join(file).to_string_lossy()))
        .map(|v| match v.trim().parse::<u64>() {
            Ok(b) if b < mem_total => format!("{} MiB", b >> 20),
            _ => "no limit".to_string(),
        })
        .unwrap_or_else(|| "not created yet".to_string());
    check(
        "headroom",
        Level::Ok,
        format!(
            "default reserve {} MiB of {} MiB and {} of {} pids for the OS and the agent (--reserve-memory, --reserve-pids); {} memory limit now: {now}",
            h.reserve_memory >> 20,
            mem_total >> 20,
            h.reserve_pids,
            h.pid_capacity,
            h.cgroup
        ),
        None,
    )
}

/// The first failing check as one message naming the fix, for the agent's start.
pub fn fatal(checks: &[Check]) -> Option<String> {
    checks.iter().find(|c| c.level == Level::Fail).map(|c| match &c.fix {
        Some(f) => format!("{}: {}. Fix: {f}", c.name, c.detail),
        None => format!("{}: {}", c.name, c.detail),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A fake host: cgroup v2 with `controllers`, a kernel command line, and
    /// the boot file Raspberry Pi OS bookworm has.
    fn fake_host(controllers: &str, cmdline: &str, now_secs: u64) -> (tempfile::TempDir, Host) {
        let dir = tempfile::tempdir().unwrap();
        let w = |rel: &str, text: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        w(
            "proc/self/mountinfo",
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        w("sys/fs/cgroup/cgroup.controllers", controllers);
        w("proc/cmdline", cmdline);
        w("proc/meminfo", "MemTotal:         440320 kB\nMemFree:          200000 kB\n");
        w("proc/sys/kernel/pid_max", "32768\n");
        w("proc/sys/kernel/threads-max", "3500\n");
        w("proc/filesystems", "nodev\tsysfs\nnodev\toverlay\n");
        w("boot/firmware/cmdline.txt", "console=serial0,115200 root=PARTUUID=1234-02 rootwait\n");
        let host = Host { root: dir.path().to_path_buf(), now: UNIX_EPOCH + Duration::from_secs(now_secs) };
        (dir, host)
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
    }

    fn paths(dir: &Path) -> Paths {
        Paths::new(
            Some(dir.join("state")),
            Some(dir.join("run")),
            Some(dir.join("logs")),
            Some("skiff-doctor-test".into()),
        )
    }

    #[test]
    fn headroom_shows_the_default_reserve_and_the_limit_set() {
        let now = CLOCK_FLOOR_SECS + 86_400;
        let (dir, host) = fake_host("cpu memory pids", "console=tty1", now);
        let checks = run_on(&host, &paths(dir.path()));
        let h = find(&checks, "headroom");
        assert_eq!(h.level, Level::Ok);
        assert!(
            h.detail.starts_with("default reserve 128 MiB of 430 MiB and 512 of 3500 pids"),
            "{}",
            h.detail
        );
        assert!(h.detail.ends_with("/skiff-doctor-test memory limit now: not created yet"), "{}", h.detail);
        let limit = dir.path().join("sys/fs/cgroup/skiff-doctor-test/memory.max");
        std::fs::create_dir_all(limit.parent().unwrap()).unwrap();
        std::fs::write(&limit, format!("{}\n", 302u64 << 20)).unwrap();
        let checks = run_on(&host, &paths(dir.path()));
        assert!(find(&checks, "headroom").detail.ends_with("memory limit now: 302 MiB"));
    }

    #[test]
    fn a_pi_with_the_memory_controller_disabled_gets_the_exact_fix() {
        let now = CLOCK_FLOOR_SECS + 86_400 * 300;
        let (dir, host) =
            fake_host("cpuset cpu io pids", "coherent_pool=1M cgroup_disable=memory console=tty1", now);
        let checks = run_on(&host, &paths(dir.path()));
        let mem = find(&checks, "memory controller");
        assert_eq!(mem.level, Level::Fail);
        assert_eq!(
            mem.fix.as_deref(),
            Some("append ` cgroup_enable=memory cgroup_memory=1` to the one line of /boot/firmware/cmdline.txt and reboot (the kernel command line has cgroup_disable=memory)")
        );
        assert_eq!(find(&checks, "cgroups").level, Level::Ok);
        assert_eq!(find(&checks, "clock").level, Level::Ok);
        assert!(fatal(&checks)
            .unwrap()
            .starts_with("memory controller: the memory cgroup controller is not available"));

        // With the controller on, the same host passes.
        let (dir, host) = fake_host("cpuset cpu io memory pids", "console=tty1", now);
        let checks = run_on(&host, &paths(dir.path()));
        assert!(checks.iter().all(|c| c.name != "memory controller"), "{checks:?}");
        assert_eq!(find(&checks, "overlayfs").level, Level::Ok);
    }

    #[test]
    fn a_board_that_booted_in_1970_is_warned_not_stopped() {
        let (dir, host) = fake_host("cpu memory pids", "", 42);
        let checks = run_on(&host, &paths(dir.path()));
        let clock = find(&checks, "clock");
        assert_eq!(clock.level, Level::Warn);
        assert_eq!(
            clock.detail,
            "the clock reads 1970-01-01: TLS to the broker and registries will fail until it is set"
        );
        assert!(checks.iter().all(|c| c.name == "root" || c.level != Level::Fail), "{checks:?}");
    }

    #[test]
    fn dates_and_free_space() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(CLOCK_FLOOR_SECS), "2026-01-01");
        assert_eq!(civil_date(951_782_400), "2000-02-29");
        assert_eq!(civil_date(1_798_761_599), "2026-12-31");
        let dir = Path::new("/var/lib/skiff");
        assert_eq!(space_check(dir, LOW_SPACE).level, Level::Ok);
        let low = space_check(dir, 100 << 20);
        assert_eq!(
            (low.level, low.detail.as_str()),
            (Level::Warn, "only 100 MiB free for /var/lib/skiff (state, images): pulls will fail")
        );
    }
}
