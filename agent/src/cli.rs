//! The command line. Errors go to stderr with a non-zero exit code:
//! 1 for runtime failures, 2 for usage errors, 3 for a configuration error
//! (an invalid desired-state file, agent flags, MQTT/TLS settings, key or
//! certificate files) or a host that cannot run skiff (so systemd can stop
//! restarting on it: `RestartPreventExitStatus=3`). Errors print as one line
//! per error chain with no cause repeated; a closed stdout (`skiff logs -f |
//! head`) ends the command quietly with 0.

use crate::api::{self, Request, Response};
use crate::image::{self, ImageStore};
use crate::localfile;
use crate::paths::Paths;
use crate::reconciler::BackoffConfig;
use crate::runtime::logs;
use crate::store::{Saved, StateStore, StoreError};
use clap::{Args, Parser, Subcommand};
use skiff_common::quantity::{parse_bytes, parse_duration};
use skiff_common::{toml_file, AppStatus, Health, Phase, PullPolicy};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const EXIT_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_INVALID: i32 = 3;

#[derive(Parser)]
#[command(
    name = "skiff",
    version,
    about = "Container agent for ARM boards: runs OCI containers from a local desired state"
)]
struct Cli {
    #[command(flatten)]
    paths: PathArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct PathArgs {
    /// Persistent state: desired state, images, volumes.
    #[arg(long, global = true, env = "SKIFF_STATE_DIR", default_value = Paths::DEFAULT_STATE)]
    state_dir: PathBuf,
    /// Volatile runtime state (a tmpfs): containers, the API socket, logs.
    #[arg(long, global = true, env = "SKIFF_RUN_DIR", default_value = Paths::DEFAULT_RUN)]
    run_dir: PathBuf,
    /// Where per-app logs go [default: <run-dir>/logs]; point it at flash to keep logs across reboots.
    #[arg(long, global = true, env = "SKIFF_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// Parent cgroup of all apps (each app runs in /<cgroup-root>/<app>).
    #[arg(long, global = true, env = "SKIFF_CGROUP_ROOT", default_value = "skiff")]
    cgroup_root: String,
}

impl PathArgs {
    fn paths(&self) -> Paths {
        Paths::new(
            Some(self.state_dir.clone()),
            Some(self.run_dir.clone()),
            self.log_dir.clone(),
            Some(self.cgroup_root.clone()),
        )
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: keep the desired state running (the daemon).
    Agent(Box<AgentArgs>),
    /// Set the desired state from a file; the running agent applies it within a second.
    /// Images it needs are pulled first (per app `pull` policy); nothing is written if one cannot be had.
    Apply {
        /// The desired-state file (TOML).
        #[arg(short, long)]
        file: PathBuf,
        #[command(flatten)]
        pull: PullArgs,
    },
    /// Check a desired-state file without applying it.
    Validate {
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Show every app: state, pid, restarts, last exit, health, image.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Print an app's output (stdout and stderr).
    Logs {
        app: String,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
    },
    /// Manage the local image store.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Check that this host can run skiff, and say how to fix what is missing.
    /// With a controller link configured (SKIFF_MQTT_BROKER in the environment or the
    /// env file), also the broker (TCP and TLS) and the device certificate's dates.
    Doctor {
        #[arg(long)]
        json: bool,
        /// The agent's settings as systemd passes them (EnvironmentFile=); the
        /// environment wins over it.
        #[arg(long, value_name = "FILE", default_value = "/etc/skiff/agent.env")]
        env_file: PathBuf,
        /// How long the broker may take to accept TCP and TLS.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        broker_timeout: Duration,
    },
    #[command(hide = true)]
    Shim { dir: PathBuf },
    #[command(hide = true)]
    ProbeExec {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        id: String,
        /// The app's `seccomp.json` (see runtime/instance.rs).
        #[arg(long)]
        seccomp: Option<PathBuf>,
        #[arg(long)]
        timeout_ms: u64,
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import an OCI image layout (a directory or a tar); multi-arch picks this host's platform.
    Load {
        path: PathBuf,
        /// Name it NAME[:TAG] instead of the tag recorded in the layout.
        #[arg(long)]
        name: Option<String>,
        /// Pick this platform from a multi-arch image instead of the host's, e.g. linux/arm64
        /// or linux/arm/v7: for a store prepared on another machine (SD-card provisioning).
        #[arg(long, value_parser = image::Platform::parse)]
        platform: Option<image::Platform>,
        #[arg(long)]
        json: bool,
    },
    /// List the images in the store.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (its files go when no other tag uses them).
    Rm { reference: String },
    /// Pull an image from its registry (resumes an interrupted pull); multi-arch picks this host's platform.
    Pull {
        /// NAME[:TAG] or NAME@sha256:...; `busybox` is docker.io/library/busybox:latest.
        reference: String,
        /// Allow plain HTTP to this image's registry.
        #[arg(long)]
        insecure: bool,
        #[command(flatten)]
        pull: PullArgs,
        #[arg(long)]
        json: bool,
    },
    /// Verify the store: refs.json, every image's blobs (hashed) and rootfs.
    Check {
        #[arg(long)]
        json: bool,
    },
}

/// How images are pulled (the agent and `skiff image pull`).
#[derive(Args)]
struct PullArgs {
    /// Registry settings and credentials (TOML, root-only when it holds secrets).
    #[arg(long, env = "SKIFF_REGISTRIES", default_value = "/etc/skiff/registries.toml")]
    registries: PathBuf,
    /// Cap on the download rate of pulls, e.g. 256KiB/s [default: no cap].
    #[arg(long, env = "SKIFF_PULL_RATE", value_parser = image::parse_rate)]
    pull_rate: Option<u64>,
    /// Disk the image store may take, partial downloads included, e.g. 2Gi [default: no limit].
    #[arg(long, env = "SKIFF_IMAGE_BUDGET", value_parser = parse_bytes)]
    image_budget: Option<u64>,
    /// How long a pull retries an unreachable registry before it is reported failed
    /// (the agent then tries again later, resuming) [default: 30s for the agent, 10m for commands].
    #[arg(long, env = "SKIFF_PULL_RETRY", value_parser = parse_duration)]
    pull_retry: Option<Duration>,
}

impl PullArgs {
    fn config(&self) -> image::PullConfig {
        image::PullConfig {
            registries: self.registries.clone(),
            rate: self.pull_rate,
            budget: self.image_budget,
            insecure: Vec::new(),
            retry_budget: self.pull_retry,
        }
    }
}

#[derive(Args)]
struct AgentArgs {
    /// Log bytes kept per app, current and rotated file together.
    #[arg(long, default_value = "1Mi", value_parser = parse_bytes)]
    log_max_size: u64,
    /// Delay before the first restart of a crashed app; doubles each time.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    backoff_base: Duration,
    /// Longest restart delay.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    backoff_max: Duration,
    /// An app that ran this long restarts with the base delay again.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    backoff_reset: Duration,
    /// Memory kept for the OS and the agent: all apps together get the board's
    /// MemTotal minus this [default: 128Mi, at most half of the board].
    #[arg(long, env = "SKIFF_RESERVE_MEMORY", value_parser = parse_bytes)]
    reserve_memory: Option<u64>,
    /// Pids kept for the OS and the agent: all apps together get the smaller of
    /// pid_max and threads-max minus this [default: 512, at most half].
    #[arg(long, env = "SKIFF_RESERVE_PIDS")]
    reserve_pids: Option<u64>,
    /// Memory limit of apps that set none, e.g. 256Mi [default: none; the apps' budget still holds].
    #[arg(long, env = "SKIFF_DEFAULT_APP_MEMORY", value_parser = parse_bytes)]
    default_app_memory: Option<u64>,
    #[command(flatten)]
    mqtt: MqttArgs,
    #[command(flatten)]
    pull: PullArgs,
}

/// The link to the controller. Without `--mqtt-broker` the agent runs on its
/// local desired state alone.
#[derive(Args)]
struct MqttArgs {
    /// mqtts://host:port (or mqtt:// for a test broker).
    #[arg(long, env = "SKIFF_MQTT_BROKER")]
    mqtt_broker: Option<String>,
    /// This device's id: its topics, MQTT client id and certificate CN.
    #[arg(long, env = "SKIFF_DEVICE", requires = "mqtt_broker")]
    device: Option<String>,
    /// The controller's public key file (from `skiffctl keygen`): only states it signed are applied.
    #[arg(long, env = "SKIFF_CONTROLLER_KEY", requires = "mqtt_broker")]
    controller_key: Option<PathBuf>,
    /// CA certificate of the broker (PEM).
    #[arg(long, env = "SKIFF_MQTT_CA")]
    mqtt_ca: Option<PathBuf>,
    /// This device's client certificate (PEM).
    #[arg(long, env = "SKIFF_MQTT_CERT")]
    mqtt_cert: Option<PathBuf>,
    /// This device's client key (PEM).
    #[arg(long, env = "SKIFF_MQTT_KEY")]
    mqtt_key: Option<PathBuf>,
    /// MQTT keepalive: a silent broker is noticed within about twice this.
    #[arg(long, env = "SKIFF_MQTT_KEEPALIVE", default_value = "30s", value_parser = parse_duration)]
    mqtt_keepalive: Duration,
}

impl MqttArgs {
    fn link_config(&self) -> anyhow::Result<Option<crate::link::LinkConfig>> {
        let Some(broker) = &self.mqtt_broker else { return Ok(None) };
        let device = self.device.as_deref().ok_or_else(|| Invalid("--mqtt-broker needs --device".into()))?;
        let device = skiff_common::protocol::DeviceId::try_from(device)
            .map_err(|e| Invalid(format!("--device: {e}")))?;
        let key_path = self
            .controller_key
            .as_ref()
            .ok_or_else(|| Invalid("--mqtt-broker needs --controller-key".into()))?;
        let text = localfile::read_to_string(key_path, localfile::KEY_LIMIT)
            .map_err(|e| Invalid(format!("--controller-key {e}")))?;
        let key = skiff_common::protocol::parse_public_key(&text)
            .map_err(|e| Invalid(format!("--controller-key {}: {e}", key_path.display())))?;
        let mut cfg = crate::link::LinkConfig::new(broker.clone(), device, key.to_bytes());
        cfg.ca = self.mqtt_ca.clone();
        cfg.cert = self.mqtt_cert.clone();
        cfg.key = self.mqtt_key.clone();
        cfg.keepalive = self.mqtt_keepalive;
        Ok(Some(cfg))
    }
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    let paths = cli.paths.paths();
    // These two run before any thread exists: they fork containers.
    match cli.cmd {
        Cmd::Shim { dir } => return crate::runtime::shim::main(&dir),
        Cmd::ProbeExec { root, id, seccomp, timeout_ms, args } => {
            return crate::runtime::exec::main(
                &root,
                &id,
                seccomp.as_deref(),
                Duration::from_millis(timeout_ms),
                args,
            )
        }
        _ => {}
    }
    let result = match cli.cmd {
        Cmd::Agent(a) => agent(paths, *a),
        Cmd::Apply { file, pull } => apply(&paths, &file, &pull),
        Cmd::Validate { file } => validate(&file).map(|_| println!("{}: ok", file.display())),
        Cmd::Ps { json } => ps(&paths, json),
        Cmd::Logs { app, tail, follow } => logs_cmd(&paths, &app, tail, follow),
        Cmd::Image(c) => image_cmd(&paths, c),
        Cmd::Doctor { json, env_file, broker_timeout } => doctor(&paths, json, &env_file, broker_timeout),
        Cmd::Shim { .. } | Cmd::ProbeExec { .. } => unreachable!("handled above"),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            if broken_pipe(&e) {
                // The reader went away (`skiff logs -f | head`): nothing to say.
                return 0;
            }
            if let Some(Invalid(msg)) = e.downcast_ref::<Invalid>() {
                eprintln!("{msg}");
                return EXIT_INVALID;
            }
            eprintln!("skiff: {}", report(&e));
            if is_config_error(&e) {
                EXIT_INVALID
            } else {
                EXIT_ERROR
            }
        }
    }
}

/// The error and its causes on one line, each cause once: a message that
/// already ends with its cause's text (thiserror's `"{path}: {source}"`)
/// does not get it appended again.
pub fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Errors that no restart can fix: a bad MQTT/TLS setting, a desired state
/// that cannot be stored.
fn is_config_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::link::LinkError>().is_some()
            || c.downcast_ref::<localfile::LocalFileError>().is_some()
            || matches!(
                c.downcast_ref::<StoreError>(),
                Some(StoreError::Unstorable(_) | StoreError::GenerationsExhausted { .. })
            )
    })
}

/// An invalid input file: printed as is, exit code 3.
#[derive(Debug)]
struct Invalid(String);
impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Invalid {}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// How long one pull of the agent retries without progress before it is reported.
const AGENT_PULL_RETRY: Duration = Duration::from_secs(30);

fn agent(paths: Paths, a: AgentArgs) -> anyhow::Result<()> {
    init_agent_logging();
    let checks = crate::doctor::run(&paths);
    if let Some(msg) = crate::doctor::fatal(&checks) {
        return Err(Invalid(format!("skiff agent cannot run on this host: {msg}")).into());
    }
    let headroom = keep_headroom(&paths, &a)?;
    let socket = paths.socket();
    let cfg = crate::daemon::AgentConfig {
        paths,
        backoff: BackoffConfig { base: a.backoff_base, max: a.backoff_max, reset_after: a.backoff_reset },
        log_cap: a.log_max_size,
        link: a.mqtt.link_config()?,
        images: None,
        // Read (and removed from the environment) before any thread starts.
        notify: crate::sdnotify::Notifier::from_env(),
        headroom: Some(headroom),
    };
    let mut pull = a.pull.config();
    pull.retry_budget.get_or_insert(AGENT_PULL_RETRY);
    let client = pull.client().map_err(|e| Invalid(format!("--registries: {e}")))?;
    let store = ImageStore::open(&cfg.paths.images())?.with_budget(pull.budget);
    let cfg = crate::daemon::AgentConfig {
        images: Some(Arc::new(crate::daemon::RegistryImages { store, client: Arc::new(client) })),
        ..cfg
    };
    // Another agent answering on the socket keeps it; otherwise the socket
    // this agent binds goes when it ends, however it ends.
    let other_agent = std::os::unix::net::UnixStream::connect(&socket).is_ok();
    let result = rt()?.block_on(crate::daemon::run(cfg, shutdown_signal()));
    // The runtime is gone, so is the listener: a socket nobody answers on is ours.
    if !other_agent && std::os::unix::net::UnixStream::connect(&socket).is_err() {
        let _ = std::fs::remove_file(&socket);
    }
    result
}

/// Limits the parent cgroup of all apps to the board minus the reserve,
/// before any app is created. A reserve the board cannot give is a
/// configuration error (exit 3).
fn keep_headroom(paths: &Paths, a: &AgentArgs) -> anyhow::Result<crate::headroom::Headroom> {
    use crate::headroom;
    let board = headroom::board()?;
    let reserve = headroom::Reserve { memory: a.reserve_memory, pids: a.reserve_pids };
    let mut h = headroom::plan(&board, &reserve, a.default_app_memory, &paths.cgroup_root)
        .map_err(|e| Invalid(format!("skiff agent: {e}")))?;
    let cgroups = crate::runtime::cgroups::Cgroups::detect()
        .ok_or_else(|| anyhow::anyhow!("no cgroup file system is mounted"))?;
    let written = headroom::apply(&cgroups, &mut h)?;
    tracing::info!(
        cgroup = %h.cgroup,
        reserve_memory = h.reserve_memory,
        apps_memory = h.apps_memory,
        reserve_pids = h.reserve_pids,
        apps_pids = ?h.apps_pids,
        default_app_memory = ?h.default_app_memory,
        changed = written.len(),
        "headroom kept for the OS and the agent"
    );
    Ok(h)
}

/// Logs to journald with structured fields (`SKIFF_APP=web`,
/// `SKIFF_GENERATION=7`: `journalctl SKIFF_APP=web`) when systemd connected
/// stderr to the journal; otherwise plain text on stderr, coloured only for a
/// person at a terminal.
fn init_agent_logging() {
    use tracing_subscriber::prelude::*;
    let filter =
        || tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG").unwrap_or_else(|_| "info".into());
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    if journald_is_stderr(journal_stream.as_deref(), std::io::stderr().as_raw_fd()) {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer.with_field_prefix(Some("SKIFF".into())).with_syslog_identifier("skiff".into());
            tracing_subscriber::registry().with(filter()).with(layer).init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// systemd sets `JOURNAL_STREAM` to `DEVICE:INODE` of the stream it connected
/// to the journal; a child whose stderr was redirected inherits the variable
/// but not the stream, so both must match.
fn journald_is_stderr(journal_stream: Option<&str>, stderr: std::os::fd::RawFd) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else { return false };
    let Ok(st) = nix::sys::stat::fstat(stderr) else { return false };
    dev.parse::<libc::dev_t>().ok() == Some(st.st_dev) && ino.parse::<libc::ino_t>().ok() == Some(st.st_ino)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn validate(file: &Path) -> anyhow::Result<skiff_common::DesiredState> {
    let text =
        localfile::read_to_string(file, localfile::STATE_TOML_LIMIT).map_err(|e| Invalid(e.to_string()))?;
    toml_file::parse(&text).map_err(|errs| {
        let lines: Vec<String> = errs.iter().map(|e| format!("{}:{e}", file.display())).collect();
        Invalid(lines.join("\n")).into()
    })
}

fn apply(paths: &Paths, file: &Path, pull: &PullArgs) -> anyhow::Result<()> {
    let state = validate(file)?;
    // An app whose image is not here would be stopped and never come back:
    // pull what is missing (and what `always` asks for), or refuse the state,
    // before anything is written.
    let cfg = pull.config();
    let store = ImageStore::open(&paths.images())?.with_budget(cfg.budget);
    let mut missing = Vec::new();
    let mut to_pull: Vec<&skiff_common::ImageRef> = Vec::new();
    for a in &state.apps {
        let here = store.contains(&a.image);
        match a.pull {
            PullPolicy::Never if !here => missing.push(format!(
                "{}: app {:?}: image {} is not in the image store and its pull policy is never (load it with `skiff image load` first)",
                file.display(),
                a.name.as_str(),
                a.image
            )),
            PullPolicy::Always => to_pull.push(&a.image),
            PullPolicy::IfNotPresent if !here => to_pull.push(&a.image),
            _ => {}
        }
    }
    let mut seen = std::collections::HashSet::new();
    to_pull.retain(|i| seen.insert(i.to_string()));
    if !missing.is_empty() {
        return Err(Invalid(missing.join("\n")).into());
    }
    for image in to_pull {
        image::cli_pull(&store, &cfg, &image.to_string(), false, false)
            .map_err(|e| anyhow::anyhow!("{}: image {image}: {e:#}; nothing was applied", file.display()))?;
    }
    // A running agent may run a generation no readable file holds any more
    // (the file was damaged after it loaded it): stay above it too.
    let running = if paths.socket().exists() {
        match rt()?.block_on(api::call(&paths.socket(), &Request::Ps)) {
            Ok(Response::Ps(p)) => p.generation,
            _ => 0,
        }
    } else {
        0
    };
    let store = StateStore::new(&paths.state_dir);
    let saved = store.save_above(state, running).map_err(|e| match e {
        StoreError::Unstorable(_) | StoreError::GenerationsExhausted { .. } => {
            anyhow::Error::from(Invalid(format!("{}: {e}", file.display())))
        }
        e => e.into(),
    })?;
    let generation = match saved {
        Saved::Written(g) => {
            println!("desired state generation {g} written to {}", store.path().display());
            g
        }
        Saved::Unchanged(g) => {
            println!("desired state unchanged (generation {g})");
            g
        }
    };
    // Tell a running agent at once; without one, the state waits on disk.
    if paths.socket().exists() {
        match rt()?.block_on(api::call(&paths.socket(), &Request::Reload)) {
            Ok(Response::Reloaded { generation: g }) if g >= generation => {
                println!("agent is applying generation {g}")
            }
            Ok(Response::Reloaded { generation: g }) => {
                println!("agent runs generation {g}; it will pick up {generation} shortly")
            }
            Ok(Response::Error { message }) => eprintln!("warning: agent: {message}"),
            Ok(_) => {}
            Err(e) => eprintln!("warning: {e:#}; the agent applies the new state when it starts"),
        }
    } else {
        println!("no agent running: it applies this state when it starts");
    }
    Ok(())
}

/// The rollout in one line: a generation on test, or one newer than the last
/// good one that failed. Nothing when the newest generation is the good one.
pub fn rollout_line(r: &skiff_common::RolloutStatus) -> Option<String> {
    if let Some(t) = r.testing {
        return Some(format!("rollout: generation {t} on test (last good: {})", r.committed));
    }
    let f = r.failed.as_ref().filter(|f| f.generation > r.committed)?;
    let app = f.app.as_ref().map(|a| format!("app {a} ")).unwrap_or_default();
    let what = if f.rolled_back {
        format!("was rolled back to generation {}", r.committed)
    } else {
        "was not rolled back".to_string()
    };
    Some(format!("rollout: generation {} failed its test and {what}: {app}{}", f.generation, f.reason))
}

fn ps(paths: &Paths, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let reply = match rt()?.block_on(api::call(&paths.socket(), &Request::Ps))? {
        Response::Ps(p) => p,
        Response::Error { message } => anyhow::bail!("agent: {message}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&reply)?)?;
        return Ok(());
    }
    let link = match &reply.link {
        None => String::new(),
        Some(l) if l.connected => ", controller link up".to_string(),
        Some(l) => format!(", controller link down ({})", l.last_error.as_deref().unwrap_or("connecting")),
    };
    writeln!(out, "generation {}{link}", reply.generation)?;
    if let Some(line) = reply.rollout.as_ref().and_then(rollout_line) {
        writeln!(out, "{line}")?;
    }
    if let Some(h) = &reply.headroom {
        writeln!(out, "{}", headroom_line(h))?;
    }
    writeln!(
        out,
        "{:<20} {:<9} {:>8} {:>8} {:>9} {:>8}  {:<12} {:<8} {:<8} IMAGE",
        "APP", "STATE", "PID", "MEM", "CPU", "RESTARTS", "LAST EXIT", "LIVE", "READY"
    )?;
    for a in &reply.apps {
        let u = reply.usage.iter().find(|u| u.name == a.name.as_str());
        writeln!(
            out,
            "{:<20} {:<9} {:>8} {:>8} {:>9} {:>8}  {:<12} {:<8} {:<8} {}{}",
            a.name.as_str(),
            phase(a),
            a.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            u.and_then(|u| u.memory_bytes)
                .map(|b| format!("{:.1}M", b as f64 / (1 << 20) as f64))
                .unwrap_or_else(|| "-".into()),
            u.and_then(|u| u.cpu_seconds).map(|s| format!("{s:.2}s")).unwrap_or_else(|| "-".into()),
            a.restarts,
            a.last_exit.map(|e| exit_text(&e)).unwrap_or_else(|| "-".into()),
            health(a.live),
            health(a.ready),
            a.image,
            a.error.as_ref().map(|e| format!("  error: {e}")).unwrap_or_default(),
        )?;
    }
    for p in &reply.pulls {
        let total =
            if p.total > 0 { format!("{:.1}M", p.total as f64 / (1 << 20) as f64) } else { "?".into() };
        let state = match &p.error {
            Some(e) => format!("failed, retrying: {e}"),
            None => "pulling".into(),
        };
        println!("pull {}: {:.1}M of {total}, {state}", p.image, p.done as f64 / (1 << 20) as f64);
    }
    Ok(())
}

fn phase(a: &AppStatus) -> &'static str {
    match a.phase {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Stopping => "stopping",
        Phase::Backoff => "backoff",
        Phase::Exited => "exited",
        Phase::Failed => "failed",
    }
}

fn health(h: Health) -> &'static str {
    match h {
        Health::None => "-",
        Health::Unknown => "unknown",
        Health::Passing => "passing",
        Health::Failing => "failing",
    }
}

/// `ps`'s line about what the board keeps and what apps get.
fn headroom_line(h: &crate::headroom::Headroom) -> String {
    let mib = |b: u64| format!("{}MiB", b >> 20);
    let pids = match h.apps_pids {
        Some(p) => format!(", {} pids reserved, apps {p}", h.reserve_pids),
        None => String::new(),
    };
    let default = match h.default_app_memory {
        Some(d) => format!(", default app memory {}", mib(d)),
        None => String::new(),
    };
    format!(
        "reserve {} of {} for the OS and agent, apps {} ({}){pids}{default}",
        mib(h.reserve_memory),
        mib(h.mem_total),
        mib(h.apps_memory),
        h.cgroup
    )
}

fn exit_text(e: &skiff_common::ExitInfo) -> String {
    if e.oom_killed {
        "oom-killed".into()
    } else if let Some(s) = e.signal {
        format!("signal {s}")
    } else if let Some(c) = e.code {
        format!("code {c}")
    } else {
        "lost".into()
    }
}

fn logs_cmd(paths: &Paths, app: &str, tail: Option<usize>, follow: bool) -> anyhow::Result<()> {
    let name = skiff_common::AppName::try_from(app).map_err(|e| Invalid(e.to_string()))?;
    let dir = &paths.log_dir;
    if !logs::current(dir, name.as_str()).exists() && !logs::rotated(dir, name.as_str()).exists() {
        anyhow::bail!("no logs for app {name:?} in {}", dir.display());
    }
    let mut out = std::io::stdout().lock();
    let mut follower = follow.then(|| logs::Follower::new(dir, name.as_str()));
    out.write_all(&logs::tail(dir, name.as_str(), tail)?)?;
    out.flush()?;
    if let Some(f) = follower.as_mut() {
        loop {
            let new = f.poll()?;
            if new.is_empty() {
                if reader_gone(&out, Duration::from_millis(200)) {
                    return Ok(());
                }
            } else {
                out.write_all(&new)?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

/// Waits up to `wait` and says whether nobody reads `out` any more (the read
/// end of a pipe was closed): `skiff logs -f | head` ends with `head`, not at
/// the app's next line.
fn reader_gone(out: &impl std::os::fd::AsFd, wait: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(out.as_fd(), PollFlags::empty())];
    let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, timeout) {
        Ok(n) if n > 0 => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)),
        Ok(_) => false,
        Err(_) => {
            std::thread::sleep(wait);
            false
        }
    }
}

fn image_cmd(paths: &Paths, c: ImageCmd) -> anyhow::Result<()> {
    let store = ImageStore::open(&paths.images())?;
    match c {
        ImageCmd::Load { path, name, platform, json } => {
            let store = match platform {
                Some(p) => store.with_platform(p),
                None => store,
            };
            image::cli_load(&store, &path, name.as_deref(), json)
        }
        ImageCmd::Ls { json } => image::cli_ls(&store, json),
        ImageCmd::Pull { reference, insecure, pull, json } => {
            let cfg = pull.config();
            let store = store.with_budget(cfg.budget);
            image::cli_pull(&store, &cfg, &reference, insecure, json)
        }
        ImageCmd::Check { json } => image::cli_check(&store, json),
        ImageCmd::Rm { reference } => {
            let r =
                skiff_common::ImageRef::try_from(reference.as_str()).map_err(|e| Invalid(e.to_string()))?;
            let digest = store.resolve(&r)?.digest;
            // Removing an image a container runs from would pull its root away.
            let desired = StateStore::new(&paths.state_dir).load()?.state;
            let users: Vec<String> = desired
                .apps
                .iter()
                .filter(|a| store.resolve(&a.image).map(|i| i.digest == digest).unwrap_or(false))
                .map(|a| a.name.to_string())
                .collect();
            if !users.is_empty() {
                anyhow::bail!(
                    "{r} is used by app(s) {}: apply a desired state without them first",
                    users.join(", ")
                );
            }
            store.remove(&r)?;
            println!("removed {r}");
            Ok(())
        }
    }
}

fn doctor(paths: &Paths, json: bool, env_file: &Path, broker_timeout: Duration) -> anyhow::Result<()> {
    use crate::doctor::link;
    let mut out = std::io::stdout().lock();
    let mut checks = crate::doctor::run(paths);
    // A missing env file is no link; an unreadable one is said (the agent
    // under systemd would not start with it either).
    let file = match crate::localfile::read_to_string(env_file, crate::localfile::KEY_LIMIT) {
        Ok(text) => link::parse_env_file(&text),
        Err(e) if env_file.exists() => {
            checks.push(crate::doctor::Check {
                name: "agent.env",
                level: crate::doctor::Level::Warn,
                detail: e.to_string(),
                fix: None,
            });
            Vec::new()
        }
        Err(_) => Vec::new(),
    };
    match link::settings(&file, |k| std::env::var(k).ok()) {
        Some(s) => checks.extend(link::checks(&s, std::time::SystemTime::now(), broker_timeout)),
        None => checks.push(crate::doctor::Check {
            name: "controller link",
            level: crate::doctor::Level::Ok,
            detail: format!(
                "none configured (no SKIFF_MQTT_BROKER in the environment or {})",
                env_file.display()
            ),
            fix: None,
        }),
    }
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&checks)?)?;
    } else {
        for c in &checks {
            let mark = match c.level {
                crate::doctor::Level::Ok => "ok  ",
                crate::doctor::Level::Warn => "warn",
                crate::doctor::Level::Fail => "FAIL",
            };
            writeln!(out, "{mark}  {:<18} {}", c.name, c.detail)?;
            if let Some(f) = &c.fix {
                writeln!(out, "      fix: {f}")?;
            }
        }
    }
    if crate::doctor::fatal(&checks).is_some() {
        return Err(Invalid("skiff: this host cannot run skiff yet (see above)".into()).into());
    }
    Ok(())
}
