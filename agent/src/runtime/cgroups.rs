//! What the host's cgroups look like, and the counters skiff reads from them
//! (OOM kills, CPU time, memory, pids). libcontainer creates and removes the
//! cgroups; this module only looks.

use super::spec::CgroupVersion;
use std::path::{Path, PathBuf};

/// Where each controller is mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroups {
    pub version: CgroupVersion,
    /// v2: the unified mount. v1: the directory that holds the controller mounts.
    pub root: PathBuf,
    /// v1 controller name -> mount point (co-mounted controllers share one).
    pub v1: Vec<(String, PathBuf)>,
    /// Controllers available: v2 from cgroup.controllers, v1 from the mounts.
    pub controllers: Vec<String>,
}

impl Cgroups {
    /// Reads /proc/self/mountinfo. `None` when no cgroup file system is mounted.
    pub fn detect() -> Option<Cgroups> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        Self::from_mountinfo(&info, |p| std::fs::read_to_string(p).ok())
    }

    /// Pure core of `detect`; `read` reads a file (for cgroup.controllers).
    pub fn from_mountinfo(info: &str, read: impl Fn(&Path) -> Option<String>) -> Option<Cgroups> {
        let mut v2_root = None;
        let mut v1 = Vec::new();
        for line in info.lines() {
            // mount-id parent major:minor root mount-point options... - fstype source super-options
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
            let (Some(mount_point), Some(fstype)) = (fields.get(4), fields.get(dash + 1)) else { continue };
            let super_opts = fields.get(dash + 3).copied().unwrap_or("");
            match *fstype {
                "cgroup2" if v2_root.is_none() || *mount_point == "/sys/fs/cgroup" => {
                    v2_root = Some(PathBuf::from(mount_point));
                }
                "cgroup" => {
                    for opt in super_opts.split(',') {
                        if matches!(
                            opt,
                            "cpu"
                                | "cpuacct"
                                | "memory"
                                | "pids"
                                | "devices"
                                | "freezer"
                                | "cpuset"
                                | "blkio"
                        ) {
                            v1.push((opt.to_string(), PathBuf::from(mount_point)));
                        }
                    }
                }
                _ => {}
            }
        }
        // The unified hierarchy counts only when it is the main mount (pure v2).
        // A hybrid host (v1 controllers plus an empty unified mount) is v1.
        if let Some(root) = v2_root.filter(|r| r == Path::new("/sys/fs/cgroup") || v1.is_empty()) {
            let controllers = read(&root.join("cgroup.controllers"))
                .map(|s| s.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default();
            return Some(Cgroups { version: CgroupVersion::V2, root, v1: Vec::new(), controllers });
        }
        if v1.is_empty() {
            return None;
        }
        let controllers = v1.iter().map(|(c, _)| c.clone()).collect();
        Some(Cgroups { version: CgroupVersion::V1, root: PathBuf::from("/sys/fs/cgroup"), v1, controllers })
    }

    /// The directory of `cgroup` (absolute, e.g. `/skiff/web`) for `controller`.
    pub fn dir(&self, controller: &str, cgroup: &str) -> Option<PathBuf> {
        let rel = cgroup.trim_start_matches('/');
        match self.version {
            CgroupVersion::V2 => Some(self.root.join(rel)),
            CgroupVersion::V1 => self.v1.iter().find(|(c, _)| c == controller).map(|(_, p)| p.join(rel)),
        }
    }

    fn read(&self, controller: &str, cgroup: &str, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir(controller, cgroup)?.join(file)).ok()
    }

    /// How many times the OOM killer killed a process in `cgroup`.
    pub fn oom_kills(&self, cgroup: &str) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V2 => "memory.events",
            CgroupVersion::V1 => "memory.oom_control",
        };
        keyed(&self.read("memory", cgroup, file)?, "oom_kill")
    }

    /// CPU time used by `cgroup`, in nanoseconds.
    pub fn cpu_usage_ns(&self, cgroup: &str) -> Option<u64> {
        match self.version {
            CgroupVersion::V2 => {
                keyed(&self.read("cpu", cgroup, "cpu.stat")?, "usage_usec").map(|us| us * 1000)
            }
            CgroupVersion::V1 => self.read("cpuacct", cgroup, "cpuacct.usage")?.trim().parse().ok(),
        }
    }

    /// Memory in use by `cgroup`, in bytes.
    pub fn memory_bytes(&self, cgroup: &str) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V2 => "memory.current",
            CgroupVersion::V1 => "memory.usage_in_bytes",
        };
        self.read("memory", cgroup, file)?.trim().parse().ok()
    }

    /// Processes and threads in `cgroup`.
    pub fn pids(&self, cgroup: &str) -> Option<u64> {
        self.read("pids", cgroup, "pids.current")?.trim().parse().ok()
    }
}

/// The value of `key` in a flat-keyed cgroup file (`key value` per line).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 1 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd";

    const UNIFIED: &str = "35 1 0:31 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";

    #[test]
    fn detects_hybrid_as_v1_with_comounted_controllers() {
        let c = Cgroups::from_mountinfo(HYBRID, |_| None).unwrap();
        assert_eq!(c.version, CgroupVersion::V1);
        assert_eq!(
            c.dir("cpuacct", "/skiff/web").unwrap(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/skiff/web")
        );
        assert_eq!(c.dir("memory", "/skiff/web").unwrap(), Path::new("/sys/fs/cgroup/memory/skiff/web"));
        assert!(c.dir("pids", "/x").is_none());
    }

    #[test]
    fn detects_unified() {
        let c = Cgroups::from_mountinfo(UNIFIED, |_| Some("cpu memory pids\n".into())).unwrap();
        assert_eq!(c.version, CgroupVersion::V2);
        assert_eq!(c.controllers, ["cpu", "memory", "pids"]);
        assert_eq!(c.dir("memory", "/skiff/web").unwrap(), Path::new("/sys/fs/cgroup/skiff/web"));
        assert!(Cgroups::from_mountinfo("", |_| None).is_none());
    }

    #[test]
    fn keyed_files() {
        assert_eq!(keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"), Some(2));
        assert_eq!(keyed("usage_usec 1500\n", "usage_usec"), Some(1500));
        assert_eq!(keyed("x 1\n", "oom_kill"), None);
    }
}
