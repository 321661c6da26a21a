//! The reconciler: every decision the agent makes, and nothing else.
//!
//! Pure and synchronous. `Reconciler::step(event, now)` takes one event and the
//! current monotonic time and returns the actions to carry out. It never reads
//! a clock, a file or a socket; the daemon feeds it and executes its actions.
//! `next_deadline()` tells the daemon when to send the next `Event::Tick`.
//!
//! Contract with the daemon:
//! - Every container is identified by `(app, instance)`. Instances of one app
//!   are numbered upward by the reconciler; events about an instance that is no
//!   longer current are ignored (a late exit of a replaced container changes nothing).
//! - `Action::Start` is answered by `Event::Started` or `Event::StartFailed`.
//! - `Action::Stop` is answered, possibly much later, by `Event::Exited`.
//! - `Action::Probe` is answered by `Event::ProbeResult` (the daemon enforces the timeout).
//! - `Action::Note` is information for logs and the controller; it asks for nothing.
//! - Start-up: feed the desired state from disk and every `Adopted` /
//!   `AdoptedExited` before the first `Tick`. Until that first `Tick` no
//!   `Start` is sent (apps wait in phase `Starting`, and `next_deadline()` is
//!   already due), so a desired app whose container is still running is adopted
//!   rather than started twice. Either order of `Desired` and `Adopted` works.
//!
//! Decisions, in short (details in `state` and `probes`):
//! - Restart policy on every exit; backoff `base * 2^n` capped at `max`, `n`
//!   consecutive restarts, reset after a run of `reset_after`. A failed start is
//!   always retried with the same backoff. A liveness or startup kill counts as a
//!   failure whatever the exit code.
//! - A changed spec stops the old container and starts the new one as soon as the
//!   old one has exited, with fresh counters; a removed app is stopped, then forgotten.
//! - Probes: one attempt per kind in flight, the next due `period` after the
//!   previous result; startup gates liveness and readiness. `Note::ProbeFailed`
//!   is sent for the first failure of a run of failures only (a run ends with a
//!   success or a spec change, not with a restart), so a constantly failing app
//!   does not flood the log or the controller.
//! - Actions come out in app-name order.

mod probes;
mod state;
#[cfg(test)]
mod tests;

pub use state::Reconciler;

use skiff_common::{AppName, AppSpec, DesiredState, ExitInfo};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new desired state (at start-up, after `skiff apply`, from the controller).
    Desired(DesiredState),
    /// At start-up: a container found running from before the agent (re)started.
    /// `spec` is the spec it was created with; `running_since` when its process started.
    Adopted {
        app: AppName,
        instance: u64,
        spec: AppSpec,
        pid: i32,
        running_since: Instant,
    },
    /// At start-up: a container of a previous agent that exited while no agent ran.
    AdoptedExited {
        app: AppName,
        instance: u64,
        spec: AppSpec,
        exit: ExitInfo,
    },
    Started {
        app: AppName,
        instance: u64,
        pid: i32,
    },
    StartFailed {
        app: AppName,
        instance: u64,
        error: String,
    },
    Exited {
        app: AppName,
        instance: u64,
        exit: ExitInfo,
    },
    ProbeResult {
        app: AppName,
        instance: u64,
        kind: ProbeKind,
        ok: bool,
        detail: String,
    },
    /// Time passed; sent at `next_deadline()` (or earlier: harmless).
    Tick,
}

// An action is built, matched once and dropped; boxing the spec would only add
// an allocation per start.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create and start a container for `spec`.
    Start { app: AppName, instance: u64, spec: AppSpec },
    /// SIGTERM, wait `grace`, then SIGKILL the whole cgroup.
    Stop { app: AppName, instance: u64, grace: Duration },
    /// Run one probe attempt within `probe.timeout`.
    Probe { app: AppName, instance: u64, kind: ProbeKind, probe: skiff_common::Probe },
    /// Something a person or the controller should hear about.
    Note(Note),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    Started {
        app: AppName,
        instance: u64,
        pid: i32,
    },
    StartFailed {
        app: AppName,
        error: String,
    },
    Exited {
        app: AppName,
        exit: ExitInfo,
    },
    /// Will be started again after `delay`.
    Restarting {
        app: AppName,
        delay: Duration,
        restarts: u32,
    },
    ProbeFailed {
        app: AppName,
        kind: ProbeKind,
        detail: String,
    },
    /// Liveness or startup failed past its threshold: the container is being killed.
    Unhealthy {
        app: AppName,
        kind: ProbeKind,
    },
    ReadyChanged {
        app: AppName,
        ready: bool,
    },
    /// Spec changed: the container is being replaced.
    Replacing {
        app: AppName,
    },
    Removed {
        app: AppName,
    },
}

/// Tunables of the restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Delay before the first restart; doubles with each further one.
    pub base: Duration,
    /// The delay never grows past this.
    pub max: Duration,
    /// An app that ran this long before exiting restarts with `base` again.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}
