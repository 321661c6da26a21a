//! skiffctl: the fleet side of skiff.
//!
//! `keygen` makes the controller's ed25519 key pair; `apply` validates an
//! `apps.toml`, signs it for each target device and publishes it retained;
//! `status` prints what every device reports; `events` prints what devices
//! said happened; `rollout` applies a state to a group in waves, each tested
//! and committed on its devices before the next. Everything goes through the broker (see
//! `skiff_common::protocol`); skiffctl keeps no state of its own besides the
//! key files. Errors go to stderr with a non-zero exit: 1 for failures, 2 for
//! usage errors (clap), 3 for configuration errors (a file or setting no retry
//! can fix: apps.toml, fleet file, key, broker URL, TLS files), 4 and 5 for
//! a rollout stopped by a failed device or a timeout; each cause of an error
//! is printed once.

mod apply;
mod events;
mod fleet;
mod keys;
// One implementation of bounded file reading for both binaries; the
// controller does not depend on the agent crate.
#[path = "../../agent/src/localfile.rs"]
mod localfile;
mod mqtt;
mod resolve;
mod rollout;
mod rollout_cmd;
mod show;
mod status;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "skiffctl", version, about = "Manage a fleet of skiff devices over MQTT")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make the controller's key pair: controller.key (secret, mode 0600) and
    /// controller.pub (goes on every device).
    Keygen(keys::KeygenArgs),
    /// Validate apps.toml, sign it for each device and publish it (retained, QoS 1).
    Apply(apply::ApplyArgs),
    /// Show every device: online, desired and applied generation, apps and health.
    Status(status::StatusArgs),
    /// Print device events queued since the last run; --follow keeps printing.
    Events(events::EventsArgs),
    /// Roll a state out to a group in waves: each wave must commit it (tested
    /// on the devices) before the next one gets it. Exit 4: a device failed
    /// or rolled back; 5: a wave timed out.
    Rollout(rollout_cmd::RolloutArgs),
}

/// A file or setting that no retry can fix: exit code 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn from(e: impl std::fmt::Display) -> ConfigError {
        ConfigError(e.to_string())
    }
}

const EXIT_CONFIG: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(a) => keys::keygen(&a),
        Command::Apply(a) => runtime().and_then(|rt| rt.block_on(apply::apply(a))),
        Command::Status(a) => runtime().and_then(|rt| rt.block_on(status::status(a))),
        Command::Events(a) => runtime().and_then(|rt| rt.block_on(events::events(a))),
        Command::Rollout(a) => runtime().and_then(|rt| rt.block_on(rollout_cmd::rollout(a))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("skiffctl: error: {}", report(&err));
            if let Some(s) = err.downcast_ref::<rollout_cmd::Stopped>() {
                ExitCode::from(s.code)
            } else if err.chain().any(|c| c.is::<ConfigError>() || c.is::<localfile::LocalFileError>()) {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, each cause once (a message that
/// already ends with its cause's text does not get it again).
fn report(e: &anyhow::Error) -> String {
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}
