//! `reconcile_pass <steady|changed> <passes>`: sets up a reconciler running 50
//! apps (each with liveness and readiness probes), then runs `passes`
//! reconcile passes. Run under callgrind by `bench reconcile`: the instruction
//! count of N passes minus that of 0 passes, over N, is the exact cost of one.
//!
//! - steady: the same desired state again, then a tick (nothing to do);
//! - changed: a new generation where every app's spec changed (50 stops),
//!   on a fresh reconciler each time; `setup` is the same without the pass.

use skiff_agent::reconciler::{Action, Event, Reconciler};
use skiff_common::{toml_file, DesiredState};
use std::time::Duration;
use tokio::time::Instant;

pub fn apps(n: usize, tag: &str) -> DesiredState {
    let text: String = (0..n)
        .map(|i| {
            format!(
                "[[app]]\nname = \"app-{i:02}\"\nimage = \"busybox:1\"\ncommand = [\"httpd\", \"-f\", \"-p\", \"{port}\"]\n\
                 env = {{ TAG = \"{tag}\" }}\n[app.resources]\ncpus = 0.5\nmemory = \"32Mi\"\npids = 64\n\
                 [app.liveness]\nhttp = {{ port = {port}, path = \"/\" }}\n[app.readiness]\ntcp = {{ port = {port} }}\n",
                port = 8000 + i
            )
        })
        .collect();
    toml_file::parse(&text).expect("valid")
}

/// A reconciler running the 50 apps, probes answered: nothing is due at `t0 + 1ms`.
fn running(state: &DesiredState, t0: Instant) -> Reconciler {
    let mut rec = Reconciler::new(Default::default());
    rec.step(Event::Desired(state.clone()), t0);
    for a in rec.step(Event::Tick, t0) {
        if let Action::Start { app, instance, .. } = a {
            rec.step(Event::Started { app, instance, pid: 100 }, t0);
        }
    }
    for a in rec.step(Event::Tick, t0) {
        if let Action::Probe { app, instance, kind, .. } = a {
            rec.step(Event::ProbeResult { app, instance, kind, ok: true, detail: String::new() }, t0);
        }
    }
    rec
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "steady".into());
    let passes: usize = args.next().and_then(|p| p.parse().ok()).unwrap_or(1);
    let t0 = Instant::now();
    let now = t0 + Duration::from_millis(1);
    let mut state = apps(50, "a");
    state.generation = 1;
    let mut changed = apps(50, "b");
    changed.generation = 2;
    let mut actions = 0;
    match mode.as_str() {
        // One reconciler; each pass: the same desired state again, then a tick.
        "steady" => {
            let mut rec = running(&state, t0);
            for _ in 0..passes {
                actions += rec.step(Event::Desired(state.clone()), now).len();
                actions += rec.step(Event::Tick, now).len();
            }
        }
        // A fresh running reconciler per pass (`setup` runs the same without
        // the pass, to subtract); each pass: every app's spec changed.
        "changed" | "setup" => {
            for _ in 0..passes {
                let mut rec = running(&state, t0);
                if mode == "changed" {
                    actions += rec.step(Event::Desired(changed.clone()), now).len();
                    actions += rec.step(Event::Tick, now).len();
                }
            }
        }
        other => panic!("unknown mode {other}"),
    }
    println!("{mode}: {passes} passes, {actions} actions");
}
