//! Schema 1 of the state file and of the MQTT payloads (the release before
//! `AppSpec.pull`, `AppSpec.security`, `Reported.pulls` and `DesiredBody.replaces`), frozen.
//!
//! postcard is not self-describing: bytes written with these structs can only
//! be read with these structs, field for field. So they are never edited; each
//! converts into today's type with the defaults the old release meant. The
//! leaf types (`Mount`, `Probe`, `AppStatus`, ...) have not changed since
//! schema 1 and are shared; one that changes must first be copied here as it
//! was. `common/tests/fixtures/v1/` holds bytes the schema-1 release wrote,
//! and `tests/schema_compat.rs` reads them with this build.

use crate::desired::{self, Mount, NetworkMode, Origin, Probe, PullPolicy, Resources, RestartPolicy};
use crate::name::{AppName, ImageRef};
use crate::protocol::{self, DeviceId, Rejection};
use crate::status::AppStatus;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub generation: u64,
    pub origin: Origin,
    pub apps: Vec<AppSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub name: AppName,
    pub image: ImageRef,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub restart: RestartPolicy,
    pub network: NetworkMode,
    pub mounts: Vec<Mount>,
    pub devices: Vec<String>,
    pub resources: Resources,
    pub liveness: Option<Probe>,
    pub readiness: Option<Probe>,
    pub startup: Option<Probe>,
    pub stop_grace: Duration,
}

/// The signed body of a schema-1 `desired` payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredBody {
    pub device: DeviceId,
    pub state: DesiredState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    pub device: DeviceId,
    pub generation_applied: u64,
    pub origin: Origin,
    pub apps: Vec<AppStatus>,
    pub agent_version: String,
    pub last_rejection: Option<Rejection>,
    pub sent_unix: u64,
}

impl From<AppSpec> for desired::AppSpec {
    fn from(a: AppSpec) -> Self {
        desired::AppSpec {
            name: a.name,
            image: a.image,
            // Schema 1 agents only ran images already in the store, which is
            // what `if-not-present` does when the image is there.
            pull: PullPolicy::IfNotPresent,
            command: a.command,
            env: a.env,
            workdir: a.workdir,
            restart: a.restart,
            network: a.network,
            mounts: a.mounts,
            devices: a.devices,
            resources: a.resources,
            liveness: a.liveness,
            readiness: a.readiness,
            startup: a.startup,
            stop_grace: a.stop_grace,
            // Schema 1 had no settings: the defaults are what it ran with
            // (no new privileges, the default capabilities), plus the
            // default syscall filter.
            security: desired::Security::default(),
        }
    }
}

impl From<DesiredState> for desired::DesiredState {
    fn from(s: DesiredState) -> Self {
        desired::DesiredState {
            generation: s.generation,
            origin: s.origin,
            apps: s.apps.into_iter().map(Into::into).collect(),
            // No rollouts before schema 3: the defaults.
            rollout: desired::Rollout::default(),
        }
    }
}

impl From<DesiredBody> for protocol::DesiredBody {
    fn from(b: DesiredBody) -> Self {
        protocol::DesiredBody { device: b.device, state: b.state.into(), replaces: None }
    }
}

impl From<Reported> for protocol::Reported {
    fn from(r: Reported) -> Self {
        protocol::Reported {
            device: r.device,
            generation_applied: r.generation_applied,
            origin: r.origin,
            apps: r.apps,
            agent_version: r.agent_version,
            last_rejection: r.last_rejection,
            sent_unix: r.sent_unix,
            pulls: Vec::new(),
            rollout: crate::v2::rollout_before_schema_3(r.generation_applied),
        }
    }
}
