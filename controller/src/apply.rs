//! `skiffctl apply`: validate, pick a generation, sign per device, publish
//! retained, confirm.
//!
//! The generation must only grow, on every device, across controller
//! machines and across a broker that lost its retained messages. By default it
//! is the largest of: one above every target's retained desired generation,
//! one above every generation a target reports applied (a local
//! `skiff apply` counts), and the current Unix time in seconds (which keeps
//! growing when the broker forgot everything). `--generation` overrides it,
//! but never below what a device already has: it would refuse the state.
//! Generations are bounded (`validate::MAX_GENERATION`) and never wrap: a
//! device at the bound (or at any generation the controller cannot follow)
//! is taken back with `--reset`, which signs, per device, the generation the
//! device reports as the one the state replaces (see the README, MQTT
//! protocol).

use crate::fleet;
use crate::keys;
use crate::localfile;
use crate::mqtt::{random_client_id, BrokerArgs, Conn};
use crate::resolve::{pin_images, ResolveArgs};
use crate::show::unix_now;
use crate::ConfigError;
use anyhow::{bail, Context, Result};
use clap::Args;
use rumqttc::QoS;
use skiff_common::protocol::{
    decode_reported, parse_topic, peek_desired, seal_desired_body, topic, Channel, DesiredBody, DeviceId,
    KeyId,
};
use skiff_common::validate::MAX_GENERATION;
use skiff_common::{toml_file, DesiredState, Origin};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ApplyArgs {
    /// The desired state to publish (an apps.toml, as `skiff validate` reads it).
    #[arg(short = 'f', long = "file", value_name = "APPS_TOML")]
    file: PathBuf,
    /// A target device; repeat for several.
    #[arg(long = "device", value_name = "ID", required_unless_present = "group")]
    devices: Vec<String>,
    /// Every device of this group in --fleet.
    #[arg(long, value_name = "NAME", requires = "fleet", conflicts_with = "devices")]
    group: Option<String>,
    /// The fleet file defining groups.
    #[arg(long, value_name = "FLEET_TOML", requires = "group")]
    fleet: Option<PathBuf>,
    /// The controller's secret key (controller.key from `skiffctl keygen`).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Publish this generation instead of the automatic one.
    #[arg(long, value_name = "N")]
    generation: Option<u64>,
    /// Take the devices back from a generation they would not leave: the
    /// state replaces the generation each device reports, even with a lower
    /// generation (the current time, or --generation).
    #[arg(long)]
    reset: bool,
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    resolve: ResolveArgs,
}

/// Reads and validates an apps.toml; every error is printed with its place.
pub fn read_state(path: &Path) -> Result<DesiredState> {
    let text = localfile::read_to_string(path, localfile::STATE_TOML_LIMIT)?;
    match toml_file::parse(&text) {
        Ok(s) => Ok(s),
        Err(errors) => {
            for e in &errors {
                eprintln!("{}:{e}", path.display());
            }
            Err(ConfigError(format!("{}: {} error(s); nothing was published", path.display(), errors.len()))
                .into())
        }
    }
}

pub async fn apply(args: ApplyArgs) -> Result<()> {
    let mut state = read_state(&args.file)?;
    let devices = targets(&args)?;
    let key = keys::read_secret(&args.key)?;
    for p in pin_images(&args.resolve, &mut state).await? {
        println!("app {}: {} pinned as {}", p.app, p.from, p.to);
    }

    let mut conn = Conn::connect(&args.broker, random_client_id(), true).await?;
    let filters: Vec<String> =
        devices.iter().flat_map(|d| [topic(d, Channel::Desired), topic(d, Channel::Reported)]).collect();
    let mut current: BTreeMap<DeviceId, u64> = devices.iter().map(|d| (d.clone(), 0)).collect();
    let mut reported: BTreeMap<DeviceId, u64> = BTreeMap::new();
    for p in conn.collect(&filters).await? {
        let Ok((device, channel)) = parse_topic(&p.topic) else {
            continue;
        };
        let generation = match channel {
            // Unverified: only used to stay above it.
            Channel::Desired => peek_desired(&p.payload).ok().map(|(_, b)| b.state.generation),
            Channel::Reported => decode_reported(&p.payload).ok().map(|r| r.generation_applied),
            _ => None,
        };
        if let (Some(g), Some(c)) = (generation, current.get_mut(&device)) {
            *c = (*c).max(g);
            if channel == Channel::Reported {
                reported.insert(device, g);
            }
        }
    }
    let (newest_device, newest) =
        current.iter().max_by_key(|(_, g)| **g).map(|(d, g)| (d.clone(), *g)).expect("targets");
    let generation = pick_generation(&args, newest, &newest_device)?;
    // With --reset, what each device's state replaces: the generation it reports.
    let mut replaces: BTreeMap<DeviceId, Option<u64>> = BTreeMap::new();
    for d in &devices {
        let r = if args.reset {
            let Some(&r) = reported.get(d) else {
                bail!("device {d} has not reported a generation; --reset needs the one it has (is it connected?)")
            };
            if r == generation {
                bail!("device {d} already has generation {generation}; nothing to reset");
            }
            Some(r)
        } else {
            None
        };
        replaces.insert(d.clone(), r);
    }
    state.generation = generation;
    state.origin = Origin::Controller;

    let mut sent = Vec::new();
    for d in &devices {
        let body = DesiredBody { device: d.clone(), state: state.clone(), replaces: replaces[d] };
        let payload = seal_desired_body(&key, &body).with_context(|| format!("cannot sign for {d}"))?;
        let t = topic(d, Channel::Desired);
        conn.client.publish(t.clone(), QoS::AtLeastOnce, true, payload.clone()).await?;
        sent.push((t, payload));
    }
    conn.confirm(sent).await?;
    conn.close().await;
    let key_id = KeyId::of(&key.verifying_key());
    for d in &devices {
        let reset = match replaces[d] {
            Some(r) => format!(", a reset of generation {r}"),
            None => String::new(),
        };
        println!(
            "{d}: generation {generation} published ({} app(s){reset}, signed by key {key_id})",
            state.apps.len()
        );
    }
    Ok(())
}

/// The generation to publish: checked, never wrapped, never above the bound.
fn pick_generation(args: &ApplyArgs, newest: u64, newest_device: &DeviceId) -> Result<u64> {
    if let Some(n) = args.generation {
        if n > MAX_GENERATION {
            bail!("--generation {n} is above the highest allowed, {MAX_GENERATION}");
        }
    }
    if args.reset {
        return Ok(args.generation.unwrap_or_else(unix_now).min(MAX_GENERATION));
    }
    match args.generation {
        Some(n) if n <= newest => bail!(
            "--generation {n} is not above {newest}, the generation device {newest_device} already has; it would refuse the state (`--reset` takes a device back)"
        ),
        Some(n) => Ok(n),
        None => match newest.checked_add(1).filter(|g| *g <= MAX_GENERATION) {
            Some(g) => Ok(g.max(unix_now()).min(MAX_GENERATION)),
            None => bail!(
                "device {newest_device} has generation {newest}, at or above the highest allowed ({MAX_GENERATION}); take it back with `skiffctl apply --reset`"
            ),
        },
    }
}

fn targets(args: &ApplyArgs) -> Result<Vec<DeviceId>> {
    if let (Some(group), Some(path)) = (&args.group, &args.fleet) {
        let text = localfile::read_to_string(path, localfile::FLEET_LIMIT)?;
        return fleet::group_devices(&text, group)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())).into());
    }
    let mut out = args
        .devices
        .iter()
        .map(|d| DeviceId::try_from(d.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ConfigError::from)?;
    out.sort();
    out.dedup();
    Ok(out)
}
