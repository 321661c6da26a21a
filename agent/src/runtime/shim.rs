//! The shim: `skiff shim <instance-dir>`, one per container.
//!
//! A separate, single-threaded process re-executed from the skiff binary,
//! because libcontainer forks and forking a tokio process is unsafe (youki
//! #3011, #3027). It creates and starts the container, so the container's init
//! is its child; it stays alive as that parent, so the exit status is never
//! lost, even when the agent is killed or upgraded; it copies the container's
//! output into the size-capped log; and on exit it records code, signal and
//! OOM kill, deletes the container and its cgroup, and unmounts the rootfs.
//!
//! Protocol with the agent: one line on stdout, `ok <init-pid>` or
//! `err <message>`, then the files described in `instance.rs`.

use super::cgroups::Cgroups;
use super::instance::{self, Exit, ShimConfig, Started};
use super::logs::RotatingLog;
use super::spec::{self, HostDevice, SpecInputs};
use crate::image;
use anyhow::{anyhow, bail, Context};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use skiff_common::ExitInfo;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

pub fn main(dir: &Path) -> i32 {
    let cfg: ShimConfig = match instance::read(dir, instance::CONFIG) {
        Ok(Some(c)) => c,
        Ok(None) => return handshake_err(&format!("{} is missing", dir.join(instance::CONFIG).display())),
        Err(e) => return handshake_err(&e.to_string()),
    };
    let cgroups = Cgroups::detect();
    let mut created = false;
    let init_pid = match create_and_start(dir, &cfg, cgroups.as_ref(), &mut created) {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("shim: start failed: {msg}");
            cleanup(dir, &cfg, created);
            return handshake_err(&msg);
        }
    };
    println!("ok {init_pid}");
    let _ = std::io::stdout().flush();
    // The shim outlives the agent: its stdout pipe may be gone from now on.
    let exit = wait_exit(init_pid);
    // OOM-killed means the app's main process died of the OOM killer's SIGKILL;
    // a child killed for memory, with the app going on, is the app's business.
    let oom = exit.signal == Some(nix::sys::signal::Signal::SIGKILL as i32)
        && cgroups.as_ref().and_then(|c| c.oom_kills(&cfg.cgroup_path)).is_some_and(|n| n > 0);
    let exit = ExitInfo { oom_killed: oom, ..exit };
    eprintln!("shim: container exited: {exit:?}");
    cleanup(dir, &cfg, true);
    let record = Exit { exit, exited_boot_ms: instance::boot_ms() };
    if let Err(e) = instance::write(dir, instance::EXIT, &record) {
        eprintln!("shim: cannot record exit: {e}");
        return 1;
    }
    0
}

fn handshake_err(msg: &str) -> i32 {
    println!("err {}", msg.replace('\n', " "));
    1
}

fn host_device(path: &str) -> anyhow::Result<HostDevice> {
    let meta = std::fs::metadata(path).with_context(|| format!("device {path}"))?;
    let ft = meta.file_type();
    let kind = if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else {
        bail!("{path} is not a device node");
    };
    let rdev = meta.rdev();
    Ok(HostDevice {
        path: path.to_string(),
        kind,
        major: nix::sys::stat::major(rdev) as i64,
        minor: nix::sys::stat::minor(rdev) as i64,
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

fn create_and_start(
    dir: &Path,
    cfg: &ShimConfig,
    cgroups: Option<&Cgroups>,
    created: &mut bool,
) -> anyhow::Result<i32> {
    let cgroups = cgroups.ok_or_else(|| anyhow!("no cgroup file system is mounted"))?;
    let devices = cfg.spec.devices.iter().map(|d| host_device(d)).collect::<anyhow::Result<Vec<_>>>()?;
    // A device file bound in through `mounts` would bypass the device list on
    // hosts where the device cgroup cannot be enforced: refuse it everywhere.
    for m in &cfg.spec.mounts {
        let ft =
            std::fs::metadata(&m.source).with_context(|| format!("mount source {}", m.source))?.file_type();
        if ft.is_char_device() || ft.is_block_device() {
            bail!("mount source {} is a device: list it under `devices` instead", m.source);
        }
    }
    let host_files: Vec<(String, String)> = ["/etc/resolv.conf", "/etc/hosts"]
        .iter()
        .filter_map(|f| {
            std::fs::canonicalize(f).ok().map(|p| (p.to_string_lossy().into_owned(), f.to_string()))
        })
        .collect();
    if cgroups.version == spec::CgroupVersion::V2 {
        // libcgroups 0.7 creates each part of the path with a check-then-mkdir,
        // so shims starting together after a boot race on the shared parent
        // (`/skiff`) and the loser fails with EEXIST. Make the parent first;
        // create_dir_all tolerates the race. Controllers are still enabled on it.
        if let Some(parent) = Path::new(&cfg.cgroup_path).parent() {
            let dir = cgroups.root.join(parent.strip_prefix("/").unwrap_or(parent));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
    }
    let rootfs = image::mount_rootfs(&cfg.image_rootfs, &dir.join("rootfs"))
        .context("preparing the root file system")?;
    let rootfs = rootfs.to_str().ok_or_else(|| anyhow!("rootfs path is not UTF-8"))?.to_string();
    let spec = spec::build(&SpecInputs {
        app: &cfg.spec,
        image: &cfg.image_config,
        rootfs: &rootfs,
        cgroup_path: &cfg.cgroup_path,
        cgroups: cgroups.version,
        devices: &devices,
        host_files: &host_files,
    })?;
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle)?;
    std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    std::fs::create_dir_all(&cfg.container_root)?;

    let mut log = RotatingLog::open(&cfg.log_dir, cfg.spec.name.as_str(), cfg.log_cap)?;
    // One pipe for stdout and stderr: the log keeps the order the app wrote
    // in, as `2>&1` would (two pipes drained by two threads reorder them).
    let (out_r, out_w) = nix::unistd::pipe()?;
    let err_w = out_w.try_clone()?;
    let devnull = std::fs::File::open("/dev/null")?;

    crate::sys::default_sigpipe();
    *created = true;
    let built = ContainerBuilder::new(cfg.container_id.clone(), SyscallType::default())
        .with_root_path(&cfg.container_root)
        .and_then(|b| b.validate_id())
        .map(|b| {
            b.with_stdin(OwnedFd::from(devnull))
                .with_stdout(out_w)
                .with_stderr(err_w)
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
        });
    crate::sys::ignore_sigpipe();
    let mut container = match built {
        Ok(Ok(c)) => c,
        Ok(Err(e)) | Err(e) => {
            // libcontainer reports the init's own errors on the container's stderr.
            // Non-blocking: a half-started init may still hold the write end.
            let mut detail = String::new();
            let _ = nix::fcntl::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&out_r),
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            );
            let _ = std::fs::File::from(out_r).read_to_string(&mut detail);
            bail!(
                "creating the container: {e}{}",
                if detail.is_empty() { String::new() } else { format!(": {}", detail.trim()) }
            );
        }
    };
    // The write ends now live only in the container: EOF comes when it is gone.
    std::thread::Builder::new().name("output".into()).spawn(move || copy_to_log(out_r, &mut log))?;
    container.start().context("starting the container")?;
    let pid = container.pid().ok_or_else(|| anyhow!("container has no pid after start"))?.as_raw();
    let me = std::process::id() as i32;
    let started = Started {
        init_pid: pid,
        shim_pid: me,
        shim_start_ticks: instance::process_start_ticks(me).unwrap_or(0),
        started_boot_ms: instance::boot_ms(),
    };
    instance::write(dir, instance::STARTED, &started)?;
    Ok(pid)
}

fn copy_to_log(fd: OwnedFd, log: &mut RotatingLog) {
    let mut f = std::fs::File::from(fd);
    let mut buf = [0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if let Err(e) = log.write(&buf[..n]) {
                    // Keep draining so the container never blocks on a full pipe.
                    eprintln!("shim: log write failed: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn wait_exit(pid: i32) -> ExitInfo {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => {
                return ExitInfo { code: Some(code), signal: None, oom_killed: false }
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return ExitInfo { code: None, signal: Some(sig as i32), oom_killed: false }
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("shim: waitpid({pid}): {e}");
                return ExitInfo { code: None, signal: None, oom_killed: false };
            }
        }
    }
}

/// Deletes the container (and its cgroup) and unmounts the rootfs. Best effort:
/// every step runs even when one before it failed.
fn cleanup(dir: &Path, cfg: &ShimConfig, created: bool) {
    if created {
        // The last processes of a killed container may take a moment to leave
        // its cgroup; removing the cgroup fails until they have. Retry briefly.
        for attempt in 0..20 {
            let result =
                Container::load(cfg.container_root.join(&cfg.container_id)).and_then(|mut c| c.delete(true));
            match result {
                Ok(()) => break,
                Err(e) if attempt == 19 => eprintln!("shim: delete {}: {e}", cfg.container_id),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        let _ = std::fs::remove_dir_all(cfg.container_root.join(&cfg.container_id));
    }
    if let Err(e) = image::unmount_rootfs(&dir.join("rootfs")) {
        eprintln!("shim: unmount rootfs: {e}");
    }
    let _ = std::fs::remove_dir_all(dir.join("bundle"));
}
