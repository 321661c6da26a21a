//! Schema 2 of the state file and of the `desired` and `reported` payloads
//! (the release before rollouts: no `DesiredState.rollout`, no
//! `Reported.rollout`), frozen. See `v1` for why these are never edited.
//! `AppSpec` has not changed since schema 2 and is shared.
//! `common/tests/fixtures/v2/` holds bytes the schema-2 release wrote.

use crate::desired::{self, AppSpec, Origin};
use crate::protocol::{self, DeviceId, Rejection};
use crate::status::{AppStatus, PullStatus, RolloutStatus};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub generation: u64,
    pub origin: Origin,
    pub apps: Vec<AppSpec>,
}

/// The signed body of a schema-2 `desired` payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredBody {
    pub device: DeviceId,
    pub state: DesiredState,
    pub replaces: Option<u64>,
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
    pub pulls: Vec<PullStatus>,
}

/// What an agent before rollouts meant: every state it ran was trusted as it came.
pub fn rollout_before_schema_3(generation_applied: u64) -> RolloutStatus {
    RolloutStatus { committed: generation_applied, testing: None, failed: None }
}

impl From<DesiredState> for desired::DesiredState {
    fn from(s: DesiredState) -> Self {
        desired::DesiredState {
            generation: s.generation,
            origin: s.origin,
            apps: s.apps,
            rollout: desired::Rollout::default(),
        }
    }
}

impl From<DesiredBody> for protocol::DesiredBody {
    fn from(b: DesiredBody) -> Self {
        protocol::DesiredBody { device: b.device, state: b.state.into(), replaces: b.replaces }
    }
}

impl From<Reported> for protocol::Reported {
    fn from(r: Reported) -> Self {
        protocol::Reported {
            rollout: rollout_before_schema_3(r.generation_applied),
            device: r.device,
            generation_applied: r.generation_applied,
            origin: r.origin,
            apps: r.apps,
            agent_version: r.agent_version,
            last_rejection: r.last_rejection,
            sent_unix: r.sent_unix,
            pulls: r.pulls,
        }
    }
}
