//! The board keeps its headroom (kubelet's system-reserved): the parent cgroup
//! of every app (`/<cgroup-root>`) is limited to the board's memory and pids
//! minus a reserve for the OS and the agent, so no app, with a limit of its
//! own or without, can starve the agent.
//!
//! `plan` is the arithmetic (pure, saturating); `apply` writes the parent's
//! limits at agent start, before any app is created, and writes a file only
//! when its value differs (idempotent across agent restarts).
//!
//! `memory.high` is left alone on purpose: on the parent it would throttle
//! every app together as soon as one runs away; an OOM kill of the runaway is
//! the outcome that keeps the others and the agent going.

use crate::runtime::cgroups::Cgroups;
use crate::runtime::spec::CgroupVersion;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Default memory reserve: sized for a 512 MiB board (about 430-480 MiB of
/// MemTotal after the GPU split). The kernel, systemd, journald, sshd and the
/// agent take some 60-80 MiB there; the rest keeps the page cache of their
/// binaries so the board stays responsive while apps press on their limit.
/// Never more than half of the board's memory.
pub const DEFAULT_RESERVE_MEMORY: u64 = 128 << 20;
/// Default pids reserve: the OS, the agent, its shims and exec probes.
/// Never more than half of the board's pid capacity.
pub const DEFAULT_RESERVE_PIDS: u64 = 512;

/// What the board has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Board {
    /// MemTotal from /proc/meminfo, in bytes.
    pub mem_total: u64,
    /// /proc/sys/kernel/pid_max.
    pub pid_max: u64,
    /// /proc/sys/kernel/threads-max.
    pub threads_max: u64,
    /// Cgroup memory limits are kept in whole pages.
    pub page_size: u64,
}

/// The reserve asked for on the command line; `None`: the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reserve {
    pub memory: Option<u64>,
    pub pids: Option<u64>,
}

/// The reserve and the parent's limits, as `skiff ps` shows them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Headroom {
    /// The parent cgroup of all apps, e.g. `/skiff`.
    pub cgroup: String,
    pub mem_total: u64,
    pub reserve_memory: u64,
    /// The parent's memory limit: what all apps together may use.
    pub apps_memory: u64,
    /// The smaller of pid_max and threads-max.
    pub pid_capacity: u64,
    pub reserve_pids: u64,
    /// The parent's pids.max; `None` when the host has no pids controller.
    pub apps_pids: Option<u64>,
    /// The memory limit of apps that set none; `None`: no limit of their own.
    pub default_app_memory: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadroomError {
    #[error(
        "--reserve-memory {reserve} bytes leaves nothing for apps: the board has {total} bytes (MemTotal)"
    )]
    MemoryReserveTooLarge { reserve: u64, total: u64 },
    #[error("--reserve-pids {reserve} leaves nothing for apps: the board has room for {capacity} pids")]
    PidsReserveTooLarge { reserve: u64, capacity: u64 },
    #[error("--default-app-memory {0} bytes is more than all apps together may use ({1} bytes)")]
    DefaultTooLarge(u64, u64),
    #[error("cannot read {0} of this board")]
    Board(&'static str),
}

/// The parent's limits: pure, saturating, never panics.
pub fn plan(
    board: &Board,
    reserve: &Reserve,
    default_app_memory: Option<u64>,
    cgroup: &str,
) -> Result<Headroom, HeadroomError> {
    let page = board.page_size.max(1);
    let total = board.mem_total;
    let reserve_memory = reserve.memory.unwrap_or(DEFAULT_RESERVE_MEMORY.min(total / 2));
    let apps_memory = total.saturating_sub(reserve_memory) / page * page;
    if apps_memory == 0 {
        return Err(HeadroomError::MemoryReserveTooLarge { reserve: reserve_memory, total });
    }
    let capacity = board.pid_max.min(board.threads_max);
    let reserve_pids = reserve.pids.unwrap_or(DEFAULT_RESERVE_PIDS.min(capacity / 2));
    let apps_pids = capacity.saturating_sub(reserve_pids);
    if apps_pids == 0 {
        return Err(HeadroomError::PidsReserveTooLarge { reserve: reserve_pids, capacity });
    }
    if let Some(d) = default_app_memory.filter(|d| *d > apps_memory) {
        return Err(HeadroomError::DefaultTooLarge(d, apps_memory));
    }
    Ok(Headroom {
        cgroup: format!("/{}", cgroup.trim_matches('/')),
        mem_total: total,
        reserve_memory,
        apps_memory,
        pid_capacity: capacity,
        reserve_pids,
        apps_pids: Some(apps_pids),
        default_app_memory,
    })
}

/// MemTotal of a /proc/meminfo text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut it = line.split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") => Some(n.saturating_mul(1024)),
        None => Some(n),
        Some(_) => None,
    }
}

/// Reads this board's memory and pid capacity.
pub fn board() -> Result<Board, HeadroomError> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num =
        |p: &'static str| read(p).and_then(|s| s.trim().parse::<u64>().ok()).ok_or(HeadroomError::Board(p));
    let mem_total =
        read("/proc/meminfo").as_deref().and_then(mem_total).ok_or(HeadroomError::Board("MemTotal"))?;
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096);
    Ok(Board {
        mem_total,
        pid_max: num("/proc/sys/kernel/pid_max")?,
        threads_max: num("/proc/sys/kernel/threads-max")?,
        page_size,
    })
}

/// Whether a cgroup limit file holding `current` must be written to hold `want`.
pub fn differs(current: Option<&str>, want: u64) -> bool {
    current.map(str::trim).and_then(|c| c.parse::<u64>().ok()) != Some(want)
}

/// The files that carry the parent's limits: (controller, file, value).
pub fn targets(version: CgroupVersion, h: &Headroom) -> Vec<(&'static str, &'static str, u64)> {
    let mem = match version {
        CgroupVersion::V2 => "memory.max",
        CgroupVersion::V1 => "memory.limit_in_bytes",
    };
    let mut out = vec![("memory", mem, h.apps_memory)];
    if let Some(p) = h.apps_pids {
        out.push(("pids", "pids.max", p));
    }
    out
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct ApplyError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Creates the parent cgroup and writes its limits where they differ.
/// Returns the files written. A host without a pids controller gets the
/// memory limit alone (`h.apps_pids` becomes `None`).
pub fn apply(cg: &Cgroups, h: &mut Headroom) -> Result<Vec<PathBuf>, ApplyError> {
    let err = |path: &PathBuf| {
        let path = path.clone();
        move |source| ApplyError { path, source }
    };
    if !cg.controllers.iter().any(|c| c == "pids") {
        h.apps_pids = None;
    }
    if cg.version == CgroupVersion::V2 {
        // The parent's limit files exist only when each ancestor hands the
        // controllers down.
        let mut dir = cg.root.clone();
        for part in h.cgroup.trim_matches('/').split('/') {
            let control = dir.join("cgroup.subtree_control");
            let have = std::fs::read_to_string(&control).unwrap_or_default();
            for c in ["memory", "pids"] {
                let listed = have.split_whitespace().any(|x| x == c);
                if !listed && cg.controllers.iter().any(|x| x == c) {
                    std::fs::write(&control, format!("+{c}")).map_err(err(&control))?;
                }
            }
            dir = dir.join(part);
            std::fs::create_dir_all(&dir).map_err(err(&dir))?;
        }
    }
    let mut written = Vec::new();
    for (controller, file, value) in targets(cg.version, h) {
        let Some(dir) = cg.dir(controller, &h.cgroup) else { continue };
        std::fs::create_dir_all(&dir).map_err(err(&dir))?;
        let path = dir.join(file);
        if differs(std::fs::read_to_string(&path).ok().as_deref(), value) {
            std::fs::write(&path, value.to_string()).map_err(err(&path))?;
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

    fn pi(mem: u64) -> Board {
        Board { mem_total: mem, pid_max: 32768, threads_max: 3500, page_size: 4096 }
    }

    #[test]
    fn default_reserve_on_a_512_mib_board() {
        let h = plan(&pi(430 * MI), &Reserve::default(), None, "skiff").unwrap();
        assert_eq!(h.cgroup, "/skiff");
        assert_eq!(h.reserve_memory, 128 * MI);
        assert_eq!(h.apps_memory, 302 * MI);
        assert_eq!(h.pid_capacity, 3500);
        assert_eq!(h.reserve_pids, 512);
        assert_eq!(h.apps_pids, Some(2988));
    }

    #[test]
    fn default_reserve_is_never_more_than_half() {
        let h = plan(&pi(200 * MI), &Reserve::default(), None, "/skiff/").unwrap();
        assert_eq!(h.cgroup, "/skiff");
        assert_eq!(h.reserve_memory, 100 * MI);
        assert_eq!(h.apps_memory, 100 * MI);
        let tiny = Board { pid_max: 600, threads_max: 100_000, ..pi(200 * MI) };
        let h = plan(&tiny, &Reserve::default(), None, "skiff").unwrap();
        assert_eq!((h.reserve_pids, h.apps_pids), (300, Some(300)));
    }

    #[test]
    fn limits_are_whole_pages() {
        let b = Board { page_size: 16384, ..pi(430 * MI + 5000) };
        let h = plan(&b, &Reserve { memory: Some(1000), pids: None }, None, "skiff").unwrap();
        assert_eq!(h.apps_memory % 16384, 0);
        assert!(h.apps_memory <= 430 * MI + 4000 && h.apps_memory > 430 * MI + 4000 - 16384);
    }

    #[test]
    fn a_reserve_larger_than_the_board_is_an_error_not_an_overflow() {
        let b = pi(430 * MI);
        let big = |m| Reserve { memory: Some(m), pids: None };
        assert_eq!(
            plan(&b, &big(u64::MAX), None, "skiff"),
            Err(HeadroomError::MemoryReserveTooLarge { reserve: u64::MAX, total: 430 * MI })
        );
        assert!(plan(&b, &big(430 * MI), None, "skiff").is_err());
        // Less than a page left is nothing left.
        assert!(plan(&b, &big(430 * MI - 100), None, "skiff").is_err());
        let h = plan(&b, &big(430 * MI - 64 * MI), None, "skiff").unwrap();
        assert_eq!(h.apps_memory, 64 * MI);
        let pids = Reserve { memory: None, pids: Some(u64::MAX) };
        assert_eq!(
            plan(&b, &pids, None, "skiff"),
            Err(HeadroomError::PidsReserveTooLarge { reserve: u64::MAX, capacity: 3500 })
        );
        let empty = Board { mem_total: 0, pid_max: 0, threads_max: 0, page_size: 0 };
        assert!(plan(&empty, &Reserve::default(), None, "skiff").is_err());
    }

    #[test]
    fn default_app_memory_must_fit_the_apps_budget() {
        let b = pi(430 * MI);
        let h = plan(&b, &Reserve::default(), Some(256 * MI), "skiff").unwrap();
        assert_eq!(h.default_app_memory, Some(256 * MI));
        assert_eq!(
            plan(&b, &Reserve::default(), Some(400 * MI), "skiff"),
            Err(HeadroomError::DefaultTooLarge(400 * MI, 302 * MI))
        );
    }

    #[test]
    fn meminfo_and_limit_files() {
        assert_eq!(mem_total("MemTotal:       24565432 kB\nMemFree: 1 kB\n"), Some(24565432 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: 18446744073709551615 kB\n"), Some(u64::MAX));
        assert!(differs(Some("max\n"), 100));
        assert!(differs(None, 100));
        assert!(differs(Some("9223372036854771712\n"), 100));
        assert!(!differs(Some("100\n"), 100));
    }

    fn fake_cgroups(version: CgroupVersion, dir: &std::path::Path) -> Cgroups {
        let controllers = vec!["memory".to_string(), "pids".to_string()];
        match version {
            CgroupVersion::V2 => Cgroups { version, root: dir.into(), v1: Vec::new(), controllers },
            CgroupVersion::V1 => Cgroups {
                version,
                root: dir.into(),
                v1: vec![("memory".into(), dir.join("memory")), ("pids".into(), dir.join("pids"))],
                controllers,
            },
        }
    }

    #[test]
    fn apply_writes_once_and_only_what_differs() {
        for version in [CgroupVersion::V1, CgroupVersion::V2] {
            let d = tempfile::tempdir().unwrap();
            let cg = fake_cgroups(version, d.path());
            let mut h = plan(&pi(430 * MI), &Reserve::default(), None, "skiff").unwrap();
            let written = apply(&cg, &mut h).unwrap();
            assert_eq!(written.len(), 2, "{version:?}");
            let mem = cg.dir("memory", "/skiff").unwrap().join(match version {
                CgroupVersion::V2 => "memory.max",
                CgroupVersion::V1 => "memory.limit_in_bytes",
            });
            assert_eq!(std::fs::read_to_string(&mem).unwrap(), (302 * MI).to_string());
            let pids = cg.dir("pids", "/skiff").unwrap().join("pids.max");
            assert_eq!(std::fs::read_to_string(&pids).unwrap(), "2988");
            // A restart with the same settings writes nothing.
            assert!(apply(&cg, &mut h).unwrap().is_empty());
            if version == CgroupVersion::V2 {
                let control = std::fs::read_to_string(d.path().join("cgroup.subtree_control")).unwrap();
                assert!(control.contains("pids"), "{control}");
            }
        }
    }

    #[test]
    fn no_pids_controller_gets_the_memory_limit_alone() {
        let d = tempfile::tempdir().unwrap();
        let mut cg = fake_cgroups(CgroupVersion::V1, d.path());
        cg.controllers.retain(|c| c == "memory");
        cg.v1.retain(|(c, _)| c == "memory");
        let mut h = plan(&pi(430 * MI), &Reserve::default(), None, "skiff").unwrap();
        assert_eq!(apply(&cg, &mut h).unwrap().len(), 1);
        assert_eq!(h.apps_pids, None);
    }
}
