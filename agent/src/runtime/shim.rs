//! The shim: `skiff shim <instance-dir>`, one per container.
//!
//! A separate, single-threaded process re-executed from the skiff binary,
//! because libcontainer forks and forking a tokio process is unsafe (youki
//! #3011, #3027). It creates and starts the container, so the container's init
//! is its child; it stays alive as that parent, so the exit status is never
//! lost, even when the agent is killed or upgraded; it copies the container's
//! output into the size-capped log; and on exit it records code, signal and
//! OOM kill, deletes the container and its cgroup, and unmounts the rootfs.
//! On cgroup v2 it also enforces the app's device rules: it attaches the
//! device program (`devices.rs`) once the container is created and before it
//! starts; a failure there is a start failure, never an unconfined app.
//!
//! Protocol with the agent: one line on stdout, `ok <init-pid>` or
//! `err <message>`, then the files described in `instance.rs`.
//!
//! Independent of the agent: it runs in its own session, ignores a closed
//! stdout (the agent killed mid-start), never writes to the agent's pipe after
//! the handshake, and nothing it writes can kill it. A full log dir drops (and
//! counts) output; a full run dir cannot lose the started or exit record,
//! whose space is reserved before the container starts; its own messages are
//! rate-limited and capped.

use super::cgroups::Cgroups;
use super::devices;
use super::executor::SandboxExecutor;
use super::instance::{self, Exit, ShimConfig, Started};
use super::logs::RotatingLog;
use super::spec::{self, HostDevice, SpecInputs};
use crate::image;
use crate::seccomp::profile::Cap;
use crate::seccomp::{Arch, CapSet, Filter};
use anyhow::{anyhow, bail, Context};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::oci_spec::runtime::{LinuxDeviceType, Spec};
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use skiff_common::{ExitInfo, NetworkMode};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

pub fn main(dir: &Path) -> i32 {
    // Its own session: no terminal hang-up or signal meant for the agent's
    // process group reaches it. (Fails only if already a group leader.)
    let _ = nix::unistd::setsid();
    let me = std::process::id() as i32;
    let pid = instance::ShimPid { pid: me, start_ticks: instance::process_start_ticks(me).unwrap_or(0) };
    if let Err(e) = instance::write(dir, instance::SHIM_PID, &pid) {
        note(&format!("cannot record the shim's pid: {e}"));
    }
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
            note(&format!("start failed: {msg}"));
            cleanup(dir, &cfg, cgroups.as_ref(), created);
            return handshake_err(&msg);
        }
    };
    handshake(&format!("ok {init_pid}"));
    let exit = wait_exit(init_pid);
    // OOM-killed means the app's main process died of the OOM killer's SIGKILL;
    // a child killed for memory, with the app going on, is the app's business.
    let oom = exit.signal == Some(nix::sys::signal::Signal::SIGKILL as i32)
        && cgroups.as_ref().and_then(|c| c.oom_kills(&cfg.cgroup_path)).is_some_and(|n| n > 0);
    let exit = ExitInfo { oom_killed: oom, ..exit };
    note(&format!("container exited: {exit:?}"));
    cleanup(dir, &cfg, cgroups.as_ref(), true);
    let record = Exit { exit, exited_boot_ms: instance::boot_ms() };
    // Into the space reserved before the start: a full run dir cannot lose it.
    if let Err(e) = instance::write_reserved(dir, instance::EXIT, &record) {
        note(&format!("cannot record exit: {e}"));
        return 1;
    }
    0
}

/// Answers the agent, then lets go of its pipe. The agent may be gone (killed
/// while this shim was starting the container): a failed write is ignored,
/// never a reason to die, and nothing is written to that pipe again.
fn handshake(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.replace('\n', " "));
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1);
    }
}

fn handshake_err(msg: &str) -> i32 {
    handshake(&format!("err {msg}"));
    1
}

/// The shim's own messages, to stderr (shim.log). Never panics (unlike
/// `eprintln!`, which does when the file system is full); at most
/// `NOTE_BURST` messages per `NOTE_WINDOW` and `NOTE_CAP` bytes in all, so a
/// failing log or a crash loop cannot fill the run dir with them.
fn note(msg: &str) {
    static STATE: std::sync::Mutex<Option<NoteState>> = std::sync::Mutex::new(None);
    let mut guard = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let state = guard.get_or_insert_with(NoteState::new);
    if let Some(line) = state.admit(msg, std_now()) {
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

// The shim has no tokio runtime (it must stay single-threaded to fork): std's
// monotonic clock is the only one it has.
#[allow(clippy::disallowed_types)]
fn std_now() -> std::time::Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

const NOTE_BURST: u32 = 10;
const NOTE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
const NOTE_CAP: u64 = 64 * 1024;

/// Rate limit and cap of the shim's messages (pure: time comes in).
struct NoteState {
    window_start: std::time::Duration,
    in_window: u32,
    suppressed: u64,
    written: u64,
    capped: bool,
}

impl NoteState {
    fn new() -> NoteState {
        NoteState {
            window_start: std::time::Duration::ZERO,
            in_window: 0,
            suppressed: 0,
            written: 0,
            capped: false,
        }
    }

    /// The text to write for `msg` at `now`, if any.
    fn admit(&mut self, msg: &str, now: std::time::Duration) -> Option<String> {
        if self.capped {
            return None;
        }
        if now.saturating_sub(self.window_start) >= NOTE_WINDOW {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window >= NOTE_BURST {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.in_window += 1;
        let mut line = String::new();
        if self.suppressed > 0 {
            line.push_str(&format!("shim: {} messages suppressed\n", self.suppressed));
            self.suppressed = 0;
        }
        line.push_str(&format!("shim: {}\n", msg.replace('\n', " ")));
        let len = line.len() as u64;
        if self.written.saturating_add(len) > NOTE_CAP {
            self.capped = true;
            return Some("shim: message cap reached; no more messages\n".into());
        }
        self.written += len;
        Some(line)
    }
}

fn host_device(path: &str) -> anyhow::Result<HostDevice> {
    let meta = std::fs::metadata(path).with_context(|| format!("device {path}"))?;
    let ft = meta.file_type();
    let kind = if ft.is_char_device() {
        LinuxDeviceType::C
    } else if ft.is_block_device() {
        LinuxDeviceType::B
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
    let host_devices = cfg.spec.devices.iter().map(|d| host_device(d)).collect::<anyhow::Result<Vec<_>>>()?;
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
    let cpus: Vec<String> = std::fs::read_dir("/sys/devices/system/cpu")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().join("thermal_throttle").is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    let host_masked = spec::thermal_paths(cpus.iter().map(String::as_str));
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
    let app = spec::with_default_memory(&cfg.spec, cfg.default_memory);
    let spec = spec::build(&SpecInputs {
        app: &app,
        image: &cfg.image_config,
        rootfs: &rootfs,
        cgroup_path: &cfg.cgroup_path,
        cgroups: cgroups.version,
        devices: &host_devices,
        host_files: &host_files,
        host_masked: &host_masked,
    })?;
    let seccomp = seccomp_filter(cfg, &spec)?;
    // On cgroup v2 the device rules are a program this shim attaches (see
    // `devices`); built before anything is created, so a bad list fails early.
    let device_program = match cgroups.version {
        spec::CgroupVersion::V2 => {
            // Read from the spec as written to config.json, the one list the
            // rules come from on either version.
            Some(devices::Program::build(&devices::rules_of_spec(&serde_json::to_value(&spec)?)?))
        }
        spec::CgroupVersion::V1 => None,
    };
    // Exec probes load the same filter (or none): `skiff probe-exec --seccomp`.
    instance::write(dir, instance::SECCOMP, &seccomp)?;
    let seccomp = seccomp.map(|f| f.insns()).transpose().context("the seccomp filter")?;
    let bundle = dir.join("bundle");
    crate::fsutil::private_dir(&bundle)?;
    // The spec holds the app's environment: 0600.
    crate::fsutil::create_private(&bundle.join("config.json"), true)?
        .write_all(&serde_json::to_vec_pretty(&spec)?)?;
    crate::fsutil::private_dir(&cfg.container_root)?;

    // The records this shim must be able to write whatever happens to the run
    // dir later: their space is taken now, while a failure is still a plain
    // start failure.
    instance::reserve(dir, instance::STARTED).context("reserving space for started.json")?;
    instance::reserve(dir, instance::EXIT).context("reserving space for exit.json")?;
    let mut log = RotatingLog::open(&cfg.log_dir, cfg.spec.name.as_str(), cfg.log_cap);
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
                .with_executor(SandboxExecutor::new(seccomp))
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
    if let Some(program) = &device_program {
        // The cgroup exists and the init waits for start: nothing of the app
        // has run yet. No start without the rules.
        devices::attach(&v2_cgroup_dir(cgroups, &cfg.cgroup_path), program)
            .context("enforcing the app's device rules")?;
    }
    // The write ends now live only in the container: EOF comes when it is gone.
    std::thread::Builder::new().name("output".into()).spawn(move || copy_to_log(out_r, &mut log))?;
    if cfg.spec.network == NetworkMode::None {
        // The init waits for start: the namespace exists, the app has not run.
        let init = container.pid().ok_or_else(|| anyhow!("container has no pid after create"))?.as_raw();
        super::loopback::up_in(init).context("bringing up loopback in the app's network namespace")?;
    }
    container.start().context("starting the container")?;
    let pid = container.pid().ok_or_else(|| anyhow!("container has no pid after start"))?.as_raw();
    let me = std::process::id() as i32;
    let started = Started {
        init_pid: pid,
        shim_pid: me,
        shim_start_ticks: instance::process_start_ticks(me).unwrap_or(0),
        started_boot_ms: instance::boot_ms(),
    };
    instance::write_reserved(dir, instance::STARTED, &started)?;
    Ok(pid)
}

/// The seccomp filter the container's init loads before exec: the agent's,
/// unless the spec's capabilities are not those it was compiled for (then
/// compiled here, so an app never runs under another app's profile).
fn seccomp_filter(cfg: &ShimConfig, spec: &Spec) -> anyhow::Result<Option<Filter>> {
    if !spec::seccomp_confined(&cfg.spec) {
        return Ok(None);
    }
    if Arch::host().is_empty() {
        bail!("skiff has no seccomp profile for this architecture: set security.seccomp = \"unconfined\"");
    }
    let caps = CapSet::from_names(&spec::bounding_caps(spec));
    // The filter is loaded after libcontainer has dropped the capabilities;
    // from then on the kernel takes it only from a process with
    // no_new_privileges (libcontainer 0.7 has no earlier hook for it).
    let no_new_privileges = spec.process().as_ref().and_then(|p| p.no_new_privileges()) == Some(true);
    if !no_new_privileges && !caps.has(Cap::SysAdmin) {
        bail!(
            "the default seccomp profile needs no_new_privileges (or CAP_SYS_ADMIN): \
             set security.seccomp = \"unconfined\" to turn no_new_privileges off"
        );
    }
    Ok(Some(match &cfg.seccomp {
        Some(f) if f.caps == caps => f.clone(),
        given => {
            if given.is_some() {
                note("the agent's seccomp filter was compiled for other capabilities: compiling it here");
            }
            Filter::compile(Arch::host(), caps)
        }
    }))
}

fn copy_to_log(fd: OwnedFd, log: &mut RotatingLog) {
    let mut f = std::fs::File::from(fd);
    let mut buf = [0u8; 8192];
    let mut failing = false;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Keep draining whatever happens, so the container never blocks
                // on a full pipe; what cannot be written is dropped and counted.
                match log.write(&buf[..n]) {
                    Err(e) if !failing => {
                        failing = true;
                        note(&format!("log write failed ({e}): dropping output until it can be written"));
                    }
                    Ok(()) if failing => {
                        failing = false;
                        note("log writable again");
                    }
                    _ => {}
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if log.dropped() > 0 {
        // One last try to say how much was lost (a write of nothing adds only the note).
        let _ = log.write(b"");
        if log.dropped() > 0 {
            note(&format!("{} bytes of output dropped and never reported in the log", log.dropped()));
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
                note(&format!("waitpid({pid}): {e}"));
                return ExitInfo { code: None, signal: None, oom_killed: false };
            }
        }
    }
}

fn v2_cgroup_dir(cgroups: &Cgroups, cgroup_path: &str) -> std::path::PathBuf {
    cgroups.root.join(cgroup_path.trim_start_matches('/'))
}

/// Detaches the device program (v2), deletes the container (and its cgroup)
/// and unmounts the rootfs. Best effort: every step runs even when one before
/// it failed.
fn cleanup(dir: &Path, cfg: &ShimConfig, cgroups: Option<&Cgroups>, created: bool) {
    if created {
        // Once no process is left in the cgroup, nothing needs the device
        // program: detach it, so nothing stays behind if the cgroup outlives
        // the delete. While one is (a straggler being killed) it stays; the
        // cgroup's removal frees it then.
        if let Some(cg) = cgroups.filter(|c| c.version == spec::CgroupVersion::V2) {
            let cg_dir = v2_cgroup_dir(cg, &cfg.cgroup_path);
            let empty =
                std::fs::read_to_string(cg_dir.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
            if empty {
                if let Err(e) = devices::detach_all(&cg_dir) {
                    note(&e.to_string());
                }
            }
        }
        // The last processes of a killed container may take a moment to leave
        // its cgroup; removing the cgroup fails until they have. Retry briefly.
        for attempt in 0..20 {
            let result =
                Container::load(cfg.container_root.join(&cfg.container_id)).and_then(|mut c| c.delete(true));
            match result {
                Ok(()) => break,
                Err(e) if attempt == 19 => note(&format!("delete {}: {e}", cfg.container_id)),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        let _ = std::fs::remove_dir_all(cfg.container_root.join(&cfg.container_id));
    }
    if let Err(e) = image::unmount_rootfs(&dir.join("rootfs")) {
        note(&format!("unmount rootfs: {e}"));
    }
    let _ = std::fs::remove_dir_all(dir.join("bundle"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use libcontainer::oci_spec::runtime::{
        Capabilities, Capability as OciCap, LinuxCapabilitiesBuilder, ProcessBuilder, SpecBuilder,
    };
    use std::time::Duration;

    #[test]
    fn notes_are_rate_limited_and_capped() {
        let mut n = NoteState::new();
        let t0 = Duration::from_secs(1);
        let got: Vec<_> = (0..15).filter_map(|i| n.admit(&format!("m{i}"), t0)).collect();
        assert_eq!(got.len(), NOTE_BURST as usize);
        let next = n.admit("later", t0 + NOTE_WINDOW).unwrap();
        assert_eq!(next, "shim: 5 messages suppressed\nshim: later\n");
        // The cap holds over any number of windows.
        let big = "x".repeat(1000);
        let mut total = 0;
        for w in 2..2000u64 {
            if let Some(l) = n.admit(&big, NOTE_WINDOW * w as u32) {
                total += l.len();
            }
        }
        assert!(total as u64 <= NOTE_CAP + 100, "{total}");
        assert!(n.admit("after cap", NOTE_WINDOW * 5000).is_none());
    }

    fn shim_config(extra: &str, seccomp: Option<Filter>) -> ShimConfig {
        let text = format!("[[app]]\nname = \"web\"\nimage = \"busybox:1\"\n{extra}");
        ShimConfig {
            spec: skiff_common::toml_file::parse(&text).unwrap().apps.remove(0),
            instance: 1,
            container_id: "web-1".into(),
            container_root: "/run/skiff/containers".into(),
            cgroup_path: "/skiff/web".into(),
            image_digest: String::new(),
            image_rootfs: "/rootfs".into(),
            image_config: image::ImageConfig {
                env: vec![],
                entrypoint: vec![],
                cmd: vec!["sh".into()],
                workdir: None,
                user: None,
            },
            log_dir: "/logs".into(),
            log_cap: 1 << 20,
            seccomp,
            default_memory: None,
        }
    }

    /// A spec whose process has `caps` as its bounding set.
    fn spec_with(caps: &[OciCap], nnp: bool) -> Spec {
        let caps =
            LinuxCapabilitiesBuilder::default().bounding(caps.iter().copied().collect::<Capabilities>());
        let process = ProcessBuilder::default()
            .capabilities(caps.build().unwrap())
            .no_new_privileges(nnp)
            .build()
            .unwrap();
        SpecBuilder::default().process(process).build().unwrap()
    }

    #[test]
    fn the_seccomp_filter_follows_the_specs_capabilities() {
        let chroot = CapSet::from_names(&["CAP_SYS_CHROOT"]);
        let agents = Filter::compile(Arch::host(), chroot);
        // The agent's filter, when compiled for the capabilities the spec gives.
        let cfg = shim_config("", Some(agents.clone()));
        let got = seccomp_filter(&cfg, &spec_with(&[OciCap::Chown, OciCap::SysChroot], true)).unwrap();
        assert_eq!(got, Some(agents.clone()));
        // Compiled here when they differ, and when the agent sent none.
        let got = seccomp_filter(&cfg, &spec_with(&[OciCap::Chown], true)).unwrap().unwrap();
        assert_eq!(got.caps, CapSet::default());
        let got = seccomp_filter(&shim_config("", None), &spec_with(&[OciCap::SysChroot], true)).unwrap();
        assert_eq!(got, Some(agents.clone()));
        // Unconfined: none, whatever the agent sent.
        let free = shim_config("[app.security]\nseccomp = \"unconfined\"\n", Some(agents));
        assert_eq!(seccomp_filter(&free, &spec_with(&[], false)).unwrap(), None);
        // Without no_new_privileges the kernel would refuse the filter after the
        // capability drop: the start fails, naming the way out.
        let err = seccomp_filter(&cfg, &spec_with(&[OciCap::SysChroot], false)).unwrap_err();
        assert!(format!("{err}").contains("unconfined"), "{err}");
        let admin = seccomp_filter(&cfg, &spec_with(&[OciCap::SysAdmin], false)).unwrap().unwrap();
        assert!(admin.caps.has(Cap::SysAdmin));
    }
}
