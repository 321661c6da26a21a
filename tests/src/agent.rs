//! A sandboxed skiff installation: its own state, run and log dirs in a temp
//! dir, its own cgroup root, the busybox test image loaded. Dropping it kills
//! the agent, every shim and container it started, unmounts their root file
//! systems and removes their cgroups.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Builds `bin` of `package` (debug) unless `env_var` points at a prebuilt one.
fn built(env_var: &str, package: &str, bin: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_var) {
        return PathBuf::from(p);
    }
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", package, "--bin", bin])
        .current_dir(repo())
        .status()
        .expect("cargo build");
    assert!(status.success(), "building {bin} failed");
    // Where cargo put it: the caller's CARGO_TARGET_DIR, else the repo's target/.
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
    let target = if target.is_absolute() { target } else { repo().join(target) };
    target.join("debug").join(bin)
}

/// The `skiff` binary, built once per test process; `SKIFF_BIN` points at a prebuilt one.
pub fn skiff_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built("SKIFF_BIN", "skiff-agent", "skiff"))
}

/// The `skiffctl` binary, built once per test process; `SKIFFCTL_BIN` points at a prebuilt one.
pub fn skiffctl_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built("SKIFFCTL_BIN", "skiff-controller", "skiffctl"))
}

/// The busybox OCI layout from images/build.sh (built on first use).
pub fn busybox_image() -> &'static Path {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let dir = repo().join("images/out/busybox");
        if !dir.join("index.json").exists() {
            let status =
                Command::new("bash").arg(repo().join("images/build.sh")).status().expect("images/build.sh");
            assert!(status.success(), "images/build.sh failed");
        }
        dir
    })
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat.rsplit(") ").next().and_then(|r| r.chars().next()), Some('Z') | Some('X')),
        Err(_) => false,
    }
}

/// Polls `f` every 50 ms until it holds; false if it still does not after `timeout`.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while !f() {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub cgroup_root: String,
    agent: Option<Child>,
    /// Extra flags for `skiff agent`.
    pub agent_args: Vec<String>,
    /// Extra environment for `skiff agent` (`SKIFF_LOG`, say).
    pub agent_env: Vec<(String, String)>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// A fresh sandbox with the busybox image loaded as busybox:1.
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new().prefix("skiff-test-").tempdir().expect("tempdir");
        let cgroup_root = format!("skiff-test-{:08x}", rand::random::<u32>());
        let sb = Sandbox { dir, cgroup_root, agent: None, agent_args: Vec::new(), agent_env: Vec::new() };
        let out = sb.skiff(&["image", "load", busybox_image().to_str().unwrap()]);
        assert!(out.status.success(), "image load: {}", String::from_utf8_lossy(&out.stderr));
        sb
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// A `skiff` command with this sandbox's paths.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(skiff_bin());
        c.args(args)
            .env("SKIFF_STATE_DIR", self.state_dir())
            .env("SKIFF_RUN_DIR", self.run_dir())
            .env("SKIFF_LOG_DIR", self.log_dir())
            .env("SKIFF_CGROUP_ROOT", &self.cgroup_root);
        c
    }

    pub fn skiff(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run skiff")
    }

    /// Writes `toml` to a file and runs `skiff apply -f` on it; panics on failure.
    pub fn apply(&self, toml: &str) {
        let out = self.try_apply(toml);
        assert!(out.status.success(), "apply failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn try_apply(&self, toml: &str) -> Output {
        let f = self.dir.path().join("apps.toml");
        std::fs::write(&f, toml).unwrap();
        self.skiff(&["apply", "-f", f.to_str().unwrap()])
    }

    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let mut args = vec!["agent".to_string()];
        args.extend(self.agent_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = self.cmd(&args);
        cmd.envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("spawn agent");
        self.agent = Some(child);
        let sock = self.run_dir().join("skiff.sock");
        // A dead agent leaves its socket file: wait for one that answers.
        wait_for(Duration::from_secs(10), "the agent's socket", || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        });
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    /// SIGKILLs the agent (containers stay).
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to the agent; waits for it to exit (containers stay).
    pub fn stop_agent(&mut self) -> std::process::ExitStatus {
        let mut c = self.agent.take().expect("an agent");
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        c.wait().unwrap()
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// `skiff ps --json`.
    pub fn ps(&self) -> Value {
        let out = self.skiff(&["ps", "--json"]);
        assert!(
            out.status.success(),
            "ps failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agent_log()
        );
        serde_json::from_slice(&out.stdout).expect("ps --json output")
    }

    /// The `ps --json` entry of `app`.
    pub fn app(&self, app: &str) -> Value {
        let ps = self.ps();
        ps["apps"].as_array().unwrap().iter().find(|a| a["name"] == app).cloned().unwrap_or(Value::Null)
    }

    /// Waits until `app` satisfies `pred`, and returns its entry.
    pub fn wait_app(&self, app: &str, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + timeout;
        loop {
            let a = self.app(app);
            if pred(&a) {
                return a;
            }
            if Instant::now() > end {
                panic!(
                    "timed out waiting for {app} to be {what}; last: {a}\nagent log:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The command line of `app`'s running process, once it runs.
    pub fn command_of(&self, app: &str) -> String {
        let a = self.wait_running(app);
        let c = std::fs::read(format!("/proc/{}/cmdline", a["pid"])).unwrap();
        String::from_utf8_lossy(&c).replace('\0', " ").trim().to_string()
    }

    pub fn wait_running(&self, app: &str) -> Value {
        self.wait_app(app, Duration::from_secs(30), "running", |a| {
            a["phase"] == "running" && a["pid"].is_i64()
        })
    }

    pub fn logs(&self, app: &str) -> String {
        String::from_utf8_lossy(&self.skiff(&["logs", app]).stdout).into_owned()
    }

    /// A cgroup file of `app` for `controller` (v1 layout of this host, or v2).
    pub fn cgroup_file(&self, controller: &str, app: &str, file: &str) -> PathBuf {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        if v2 {
            Path::new("/sys/fs/cgroup").join(&self.cgroup_root).join(app).join(file)
        } else {
            Path::new("/sys/fs/cgroup").join(controller).join(&self.cgroup_root).join(app).join(file)
        }
    }

    /// Every cgroup directory of `app` that still exists, in any controller.
    pub fn app_cgroups(&self, app: &str) -> Vec<PathBuf> {
        cgroup_dirs(&self.cgroup_root).into_iter().map(|d| d.join(app)).filter(|d| d.exists()).collect()
    }

    /// What a reboot leaves: no agent, no shims, no containers, an empty run dir.
    /// Flash (the state dir) is kept.
    pub fn simulate_reboot(&mut self) {
        self.kill_agent();
        kill_everything(self.dir.path(), &self.cgroup_root);
        let _ = std::fs::remove_dir_all(self.run_dir());
        let _ = std::fs::remove_dir_all(self.log_dir());
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_agent();
        kill_everything(self.dir.path(), &self.cgroup_root);
    }
}

/// Kills every process in the sandbox's cgroups and every shim of the
/// sandbox, unmounts whatever is mounted below `dir`, removes the cgroups.
pub fn kill_everything(dir: &Path, cgroup_root: &str) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    // Shims first (they would otherwise record exits and clean up in parallel).
    let needle = dir.to_string_lossy().to_string();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) && pid != std::process::id() as i32 {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    let cg_dirs = cgroup_dirs(cgroup_root);
    for _ in 0..50 {
        let mut any = false;
        for d in &cg_dirs {
            for procs in walk(d).iter().map(|x| x.join("cgroup.procs")) {
                for pid in std::fs::read_to_string(&procs).unwrap_or_default().lines() {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        any = true;
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
        }
        if !any {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Unmount the deepest mounts first.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&needle))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    for d in &cg_dirs {
        let mut all = walk(d);
        all.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in all {
            let _ = std::fs::remove_dir(&p);
        }
    }
}

fn cgroup_dirs(root: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.join(root)];
    }
    std::fs::read_dir(base)
        .map(|rd| rd.flatten().map(|e| e.path().join(root)).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

/// `dir` and every directory below it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return out;
    }
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}
