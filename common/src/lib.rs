//! skiff-common: the model both the agent and the controller speak.
//!
//! Owns the desired-state types, the names that become paths and cgroup names,
//! the human file format (TOML) with its validation, and the binary envelope
//! (magic, version, length, CRC, postcard) used on flash and on the wire.
//! Never does I/O: every function takes bytes or text and returns values.

pub mod codec;
pub mod desired;
pub mod name;
pub mod protocol;
pub mod quantity;
pub mod status;
pub mod toml_file;
pub mod v1;
pub mod v2;
pub mod validate;

pub use desired::{
    AppSpec, Capability, DesiredState, Mount, NetworkMode, Origin, Probe, ProbeAction, PullPolicy, Resources,
    RestartPolicy, Rollout, Seccomp, Security, User,
};
pub use name::{AppName, ImageRef, NameError};
pub use status::{AppStatus, ExitInfo, Health, Phase, PullStatus, RolloutFailure, RolloutStatus};
pub use validate::ValidationError;
