//! Host checks: what skiff needs from the kernel and the system, each with the
//! fix a person can apply. `skiff doctor` prints them all; the agent runs them
//! at start and refuses to run, with one clear message, when one fails.

use crate::paths::Paths;
use crate::runtime::cgroups::Cgroups;
use crate::runtime::spec::CgroupVersion;
use serde::Serialize;

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
    let mut out = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    out.push(if root {
        check("root", Level::Ok, "running as root", None)
    } else {
        check("root", Level::Fail, "not running as root", Some("run skiff as root (containers need it)"))
    });
    match Cgroups::detect() {
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
                    "add `cgroup_enable=memory cgroup_memory=1` to the kernel command line (/boot/firmware/cmdline.txt on Raspberry Pi OS) and reboot"
                } else {
                    "enable the controller in the kernel configuration or the cgroup mount"
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
                    Some(fix),
                ));
            }
        }
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
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
    out
}

/// The first failing check as one message naming the fix, for the agent's start.
pub fn fatal(checks: &[Check]) -> Option<String> {
    checks.iter().find(|c| c.level == Level::Fail).map(|c| match &c.fix {
        Some(f) => format!("{}: {}. Fix: {f}", c.name, c.detail),
        None => format!("{}: {}", c.name, c.detail),
    })
}
