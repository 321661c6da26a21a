//! Reconciler tests: plain `Instant`s built from one `t0`, no runtime, no sleeping.
//! Each scenario asserts the exact actions of every step that matters.

use super::*;
use skiff_common::{
    AppStatus, Health, ImageRef, NetworkMode, Origin, Phase, Probe, ProbeAction, PullPolicy, Resources,
    RestartPolicy,
};
use std::collections::BTreeMap;

const CFG: BackoffConfig = BackoffConfig {
    base: Duration::from_secs(1),
    max: Duration::from_secs(8),
    reset_after: Duration::from_secs(60),
};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn name(s: &str) -> AppName {
    AppName::try_from(s).unwrap()
}

fn spec(app: &str) -> AppSpec {
    AppSpec {
        name: name(app),
        image: ImageRef::try_from("busybox:1.36").unwrap(),
        pull: PullPolicy::IfNotPresent,
        command: Some(vec!["sleep".into(), "1000".into()]),
        env: BTreeMap::new(),
        workdir: None,
        restart: RestartPolicy::Always,
        network: NetworkMode::Host,
        mounts: Vec::new(),
        devices: Vec::new(),
        resources: Resources::default(),
        liveness: None,
        readiness: None,
        startup: None,
        stop_grace: secs(10),
        security: Default::default(),
    }
}

fn with_restart(mut s: AppSpec, restart: RestartPolicy) -> AppSpec {
    s.restart = restart;
    s
}

/// The same app with another command: a changed spec.
fn changed(mut s: AppSpec) -> AppSpec {
    s.command = Some(vec!["sleep".into(), "2000".into()]);
    s.stop_grace = secs(3);
    s
}

fn probe(initial_delay: u64, period: u64, failure_threshold: u32, success_threshold: u32) -> Probe {
    Probe {
        action: ProbeAction::Tcp { port: 8080 },
        initial_delay: secs(initial_delay),
        period: secs(period),
        timeout: secs(1),
        failure_threshold,
        success_threshold,
    }
}

fn desired(generation: u64, apps: Vec<AppSpec>) -> Event {
    Event::Desired(DesiredState { generation, origin: Origin::Local, apps, rollout: Default::default() })
}

fn code(c: i32) -> ExitInfo {
    ExitInfo { code: Some(c), signal: None, oom_killed: false }
}

fn signal(s: i32) -> ExitInfo {
    ExitInfo { code: None, signal: Some(s), oom_killed: false }
}

fn oom() -> ExitInfo {
    ExitInfo { code: None, signal: Some(9), oom_killed: true }
}

fn start(app: &str, instance: u64, spec: &AppSpec) -> Action {
    Action::Start { app: name(app), instance, spec: spec.clone() }
}

fn stop(app: &str, instance: u64, grace: Duration) -> Action {
    Action::Stop { app: name(app), instance, grace }
}

fn probe_action(app: &str, instance: u64, kind: ProbeKind, probe: &Probe) -> Action {
    Action::Probe { app: name(app), instance, kind, probe: probe.clone() }
}

fn note(n: Note) -> Action {
    Action::Note(n)
}

fn n_started(app: &str, instance: u64, pid: i32) -> Action {
    note(Note::Started { app: name(app), instance, pid })
}

fn n_exited(app: &str, exit: ExitInfo) -> Action {
    note(Note::Exited { app: name(app), exit })
}

fn n_restarting(app: &str, delay: u64, restarts: u32) -> Action {
    note(Note::Restarting { app: name(app), delay: secs(delay), restarts })
}

fn n_probe_failed(app: &str, kind: ProbeKind, detail: &str) -> Action {
    note(Note::ProbeFailed { app: name(app), kind, detail: detail.into() })
}

fn n_ready(app: &str, ready: bool) -> Action {
    note(Note::ReadyChanged { app: name(app), ready })
}

fn started(app: &str, instance: u64, pid: i32) -> Event {
    Event::Started { app: name(app), instance, pid }
}

fn exited(app: &str, instance: u64, exit: ExitInfo) -> Event {
    Event::Exited { app: name(app), instance, exit }
}

fn result(app: &str, instance: u64, kind: ProbeKind, ok: bool) -> Event {
    let detail = if ok { "ok" } else { "connection refused" };
    Event::ProbeResult { app: name(app), instance, kind, ok, detail: detail.into() }
}

fn status_of(r: &Reconciler, app: &str) -> AppStatus {
    r.status().into_iter().find(|s| s.name.as_str() == app).expect("app in status")
}

/// A reconciler past start-up with `s` running as instance 1, pid 100, since `t0`.
fn running(s: &AppSpec) -> (Reconciler, Instant) {
    let t0 = Instant::now();
    let mut r = Reconciler::new(CFG);
    assert_eq!(r.step(Event::Tick, t0), vec![]);
    let app = s.name.as_str();
    assert_eq!(r.step(desired(1, vec![s.clone()]), t0), vec![start(app, 1, s)]);
    assert_eq!(r.step(started(app, 1, 100), t0), vec![n_started(app, 1, 100)]);
    (r, t0)
}

/// Lets instance `instance` exit at `at` and checks the restart after `delay`
/// seconds, which becomes instance `instance + 1` with pid 100 + that.
fn crash_and_restart(
    r: &mut Reconciler,
    s: &AppSpec,
    instance: u64,
    exit: ExitInfo,
    at: Instant,
    delay: u64,
    restarts: u32,
) -> Instant {
    let app = s.name.as_str();
    assert_eq!(
        r.step(exited(app, instance, exit), at),
        vec![n_exited(app, exit), n_restarting(app, delay, restarts)]
    );
    assert_eq!(status_of(r, app).phase, Phase::Backoff);
    let until = at + secs(delay);
    assert_eq!(r.next_deadline(), Some(until));
    assert_eq!(r.step(Event::Tick, until - Duration::from_millis(1)), vec![]);
    let next = instance + 1;
    assert_eq!(r.step(Event::Tick, until), vec![start(app, next, s)]);
    let pid = 100 + next as i32;
    assert_eq!(r.step(started(app, next, pid), until), vec![n_started(app, next, pid)]);
    assert_eq!(status_of(r, app).restarts, restarts);
    until
}

// ---- start-up, desired state ----

#[test]
fn first_start_waits_for_the_first_tick() {
    let t0 = Instant::now();
    let web = spec("web");
    let mut r = Reconciler::new(CFG);
    assert_eq!(r.next_deadline(), None);
    assert_eq!(r.generation(), 0);
    // Start-up window: adopted containers may still be reported.
    assert_eq!(r.step(desired(4, vec![web.clone()]), t0), vec![]);
    assert_eq!(r.generation(), 4);
    assert_eq!(status_of(&r, "web").phase, Phase::Starting);
    assert_eq!(r.next_deadline(), Some(t0));
    assert_eq!(r.step(Event::Tick, t0), vec![start("web", 1, &web)]);
    assert_eq!(r.next_deadline(), None);
    assert_eq!(r.step(Event::Tick, t0 + secs(5)), vec![]);
    assert_eq!(r.step(started("web", 1, 42), t0 + secs(1)), vec![n_started("web", 1, 42)]);
    let st = status_of(&r, "web");
    assert_eq!((st.phase, st.pid, st.restarts), (Phase::Running, Some(42), 0));
}

#[test]
fn after_start_up_a_new_app_starts_at_once() {
    let (mut r, t0) = running(&spec("web"));
    let db = spec("db");
    assert_eq!(r.step(desired(2, vec![db.clone(), spec("web")]), t0), vec![start("db", 1, &db)]);
    assert_eq!(r.generation(), 2);
}

#[test]
fn unchanged_desired_state_is_a_no_op() {
    let web = spec("web");
    let (mut r, t0) = running(&web);
    assert_eq!(r.step(desired(2, vec![web.clone()]), t0 + secs(1)), vec![]);
    assert_eq!(r.step(desired(3, vec![web]), t0 + secs(2)), vec![]);
    assert_eq!(r.generation(), 3);
    assert_eq!(status_of(&r, "web").phase, Phase::Running);
}

#[test]
fn changed_spec_stops_then_starts_after_the_exit() {
    let web = spec("web");
    let (mut r, t0) = running(&web);
    // One crash first, so the reset of the counters shows.
    let t1 = crash_and_restart(&mut r, &web, 1, code(1), t0 + secs(5), 1, 1);
    let web2 = changed(web.clone());
    assert_eq!(
        r.step(desired(2, vec![web2.clone()]), t1),
        vec![note(Note::Replacing { app: name("web") }), stop("web", 2, secs(10))]
    );
    assert_eq!(status_of(&r, "web").phase, Phase::Stopping);
    assert_eq!(status_of(&r, "web").pid, Some(102));
    // The stop is sent once, not at every tick.
    assert_eq!(r.next_deadline(), None);
    assert_eq!(r.step(Event::Tick, t1 + secs(30)), vec![]);
    assert_eq!(
        r.step(exited("web", 2, signal(15)), t1 + secs(31)),
        vec![n_exited("web", signal(15)), start("web", 3, &web2)]
    );
    assert_eq!(status_of(&r, "web").restarts, 0);
    assert_eq!(r.step(started("web", 3, 103), t1 + secs(31)), vec![n_started("web", 3, 103)]);
    // The backoff series starts over for the new spec.
    crash_and_restart(&mut r, &web2, 3, code(1), t1 + secs(32), 1, 1);
}

#[test]
fn changed_spec_while_starting_replaces_once_started() {
    let t0 = Instant::now();
    let web = spec("web");
    let web2 = changed(web.clone());
    let mut r = Reconciler::new(CFG);
    r.step(Event::Tick, t0);
    assert_eq!(r.step(desired(1, vec![web.clone()]), t0), vec![start("web", 1, &web)]);
    assert_eq!(r.step(desired(2, vec![web2.clone()]), t0), vec![]);
    assert_eq!(
        r.step(started("web", 1, 100), t0),
        vec![n_started("web", 1, 100), note(Note::Replacing { app: name("web") }), stop("web", 1, secs(10)),]
    );
    assert_eq!(
        r.step(exited("web", 1, signal(15)), t0 + secs(1)),
        vec![n_exited("web", signal(15)), start("web", 2, &web2)]
    );
}

#[test]
fn changed_spec_of_an_app_without_container_starts_at_once() {
    let web = with_restart(spec("web"), RestartPolicy::Never);
    let (mut r, t0) = running(&web);
    assert_eq!(r.step(exited("web", 1, code(0)), t0 + secs(1)), vec![n_exited("web", code(0))]);
    assert_eq!(status_of(&r, "web").phase, Phase::Exited);
    let web2 = changed(web);
    // No container: no Replacing, no Stop.
    assert_eq!(r.step(desired(2, vec![web2.clone()]), t0 + secs(2)), vec![start("web", 2, &web2)]);
}

#[test]
fn removed_app_is_stopped_then_forgotten() {
    let web = spec("web");
    let (mut r, t0) = running(&web);
    assert_eq!(r.step(desired(2, vec![]), t0 + secs(1)), vec![stop("web", 1, secs(10))]);
    assert_eq!(status_of(&r, "web").phase, Phase::Stopping);
    assert_eq!(r.step(Event::Tick, t0 + secs(20)), vec![]);
    assert_eq!(
        r.step(exited("web", 1, signal(15)), t0 + secs(2)),
        vec![n_exited("web", signal(15)), note(Note::Removed { app: name("web") })]
    );
    assert_eq!(r.status(), vec![]);
    assert_eq!(r.next_deadline(), None);
    // Added again: instance numbers keep growing.
    assert_eq!(r.step(desired(3, vec![web.clone()]), t0 + secs(3)), vec![start("web", 2, &web)]);
}

#[test]
fn removed_app_in_backoff_needs_no_stop() {
    let web = spec("web");
    let (mut r, t0) = running(&web);
    r.step(exited("web", 1, code(1)), t0 + secs(1));
    assert_eq!(r.step(desired(2, vec![]), t0 + secs(1)), vec![note(Note::Removed { app: name("web") })]);
    assert_eq!(r.status(), vec![]);
    assert_eq!(r.next_deadline(), None);
    assert_eq!(r.step(Event::Tick, t0 + secs(10)), vec![]);
}

#[test]
fn removed_while_starting_is_stopped_when_started_or_forgotten_when_failed() {
    let t0 = Instant::now();
    let (a, b) = (spec("a"), spec("b"));
    let mut r = Reconciler::new(CFG);
    r.step(Event::Tick, t0);
    assert_eq!(
        r.step(desired(1, vec![a.clone(), b.clone()]), t0),
        vec![start("a", 1, &a), start("b", 1, &b)]
    );
    assert_eq!(r.step(desired(2, vec![]), t0), vec![]);
    assert_eq!(r.step(started("a", 1, 7), t0), vec![n_started("a", 1, 7), stop("a", 1, secs(10))]);
    assert_eq!(
        r.step(Event::StartFailed { app: name("b"), instance: 1, error: "no image".into() }, t0),
        vec![
            note(Note::StartFailed { app: name("b"), error: "no image".into() }),
            note(Note::Removed { app: name("b") }),
        ]
    );
    assert_eq!(r.status().len(), 1);
}

// ---- restart policy and backoff ----

#[test]
fn crash_loop_backs_off_1_2_4_8_then_caps() {
    let web = spec("web");
    let (mut r, t0) = running(&web);
    let mut t = t0;
    for (i, delay) in [1, 2, 4, 8, 8, 8].into_iter().enumerate() {
        let instance = i as u64 + 1;
        t = crash_and_restart(&mut r, &web, instance, code(1), t + secs(1), delay, i as u32 + 1);
    }
    assert_eq!(status_of(&r, "web").restarts, 6);
}

#[test]
fn long_healthy_run_resets_the_backoff() {
    let web = spec("web");
    let (mut r, t0) = running(&web);
    let t = crash_and_restart(&mut r, &web, 1, code(1), t0 + secs(1), 1, 1);
    let t = crash_and_restart(&mut r, &web, 2, code(1), t + secs(1), 2, 2);
    let t = crash_and_restart(&mut r, &web, 3, code(1), t + secs(59), 4, 3);
    // Ran exactly reset_after: back to the base delay; the restart count goes on.
    let t = crash_and_restart(&mut r, &web, 4, code(1), t + secs(60), 1, 4);
    crash_and_restart(&mut r, &web, 5, code(1), t + secs(1), 2, 5);
}

#[test]
fn never_stays_down_after_any_exit() {
    for exit in [code(0), code(1), signal(9), oom()] {
        let web = with_restart(spec("web"), RestartPolicy::Never);
        let (mut r, t0) = running(&web);
        assert_eq!(r.step(exited("web", 1, exit), t0 + secs(1)), vec![n_exited("web", exit)]);
        let st = status_of(&r, "web");
        assert_eq!((st.phase, st.pid, st.last_exit), (Phase::Exited, None, Some(exit)));
        assert_eq!(r.next_deadline(), None);
        assert_eq!(r.step(Event::Tick, t0 + secs(1000)), vec![]);
    }
}

#[test]
fn on_failure_stays_down_after_success_only() {
    let web = with_restart(spec("web"), RestartPolicy::OnFailure);
    let (mut r, t0) = running(&web);
    assert_eq!(r.step(exited("web", 1, code(0)), t0 + secs(1)), vec![n_exited("web", code(0))]);
    assert_eq!(status_of(&r, "web").phase, Phase::Exited);
    assert_eq!(r.step(Event::Tick, t0 + secs(100)), vec![]);

    for exit in [code(1), signal(9), oom(), ExitInfo { code: Some(0), signal: None, oom_killed: true }] {
        let (mut r, t0) = running(&web);
        crash_and_restart(&mut r, &web, 1, exit, t0 + secs(1), 1, 1);
    }
}

#[test]
fn always_restarts_after_success_too() {
    let web = spec("web");
    let (mut r, t0) = running(&web);
    crash_and_restart(&mut r, &web, 1, code(0), t0 + secs(1), 1, 1);
}

#[test]
fn start_failure_is_retried_with_backoff() {
    let t0 = Instant::now();
    // Even with `never`: the container never ran.
    let web = with_restart(spec("web"), RestartPolicy::Never);
    let mut r = Reconciler::new(CFG);
    r.step(Event::Tick, t0);
    assert_eq!(r.step(desired(1, vec![web.clone()]), t0), vec![start("web", 1, &web)]);
    let failed = |i| Event::StartFailed { app: name("web"), instance: i, error: "image missing".into() };
    let n_failed = note(Note::StartFailed { app: name("web"), error: "image missing".into() });
    assert_eq!(r.step(failed(1), t0), vec![n_failed.clone(), n_restarting("web", 1, 1)]);
    let st = status_of(&r, "web");
    assert_eq!((st.phase, st.error.as_deref()), (Phase::Failed, Some("image missing")));
    assert_eq!(r.next_deadline(), Some(t0 + secs(1)));
    assert_eq!(r.step(Event::Tick, t0 + secs(1)), vec![start("web", 2, &web)]);
    assert_eq!(status_of(&r, "web").restarts, 1);
    assert_eq!(r.step(failed(2), t0 + secs(1)), vec![n_failed, n_restarting("web", 2, 2)]);
    assert_eq!(r.step(Event::Tick, t0 + secs(2)), vec![]);
    assert_eq!(r.step(Event::Tick, t0 + secs(3)), vec![start("web", 3, &web)]);
    assert_eq!(r.step(started("web", 3, 9), t0 + secs(3)), vec![n_started("web", 3, 9)]);
    let st = status_of(&r, "web");
    assert_eq!((st.phase, st.restarts, st.error), (Phase::Running, 2, None));
}

// ---- probes ----

#[test]
fn liveness_failures_past_the_threshold_kill_and_restart() {
    let live = probe(5, 10, 3, 1);
    let mut web = spec("web");
    web.liveness = Some(live.clone());
    let (mut r, t0) = running(&web);
    assert_eq!(status_of(&r, "web").live, Health::Unknown);
    assert_eq!(r.next_deadline(), Some(t0 + secs(5)));
    assert_eq!(r.step(Event::Tick, t0 + secs(4)), vec![]);
    let p = probe_action("web", 1, ProbeKind::Liveness, &live);
    assert_eq!(r.step(Event::Tick, t0 + secs(5)), vec![p.clone()]);
    // In flight: nothing is due, no second attempt.
    assert_eq!(r.next_deadline(), None);
    assert_eq!(r.step(Event::Tick, t0 + secs(60)), vec![]);
    assert_eq!(r.step(result("web", 1, ProbeKind::Liveness, true), t0 + secs(6)), vec![]);
    assert_eq!(status_of(&r, "web").live, Health::Passing);
    // The period counts from the result.
    assert_eq!(r.next_deadline(), Some(t0 + secs(16)));
    assert_eq!(r.step(Event::Tick, t0 + secs(16)), vec![p.clone()]);
    let fail = || result("web", 1, ProbeKind::Liveness, false);
    assert_eq!(
        r.step(fail(), t0 + secs(17)),
        vec![n_probe_failed("web", ProbeKind::Liveness, "connection refused")]
    );
    // Below the threshold it stays as it was.
    assert_eq!(status_of(&r, "web").live, Health::Passing);
    assert_eq!(r.step(Event::Tick, t0 + secs(27)), vec![p.clone()]);
    assert_eq!(r.step(fail(), t0 + secs(27)), vec![]);
    assert_eq!(r.step(Event::Tick, t0 + secs(37)), vec![p]);
    assert_eq!(
        r.step(fail(), t0 + secs(37)),
        vec![note(Note::Unhealthy { app: name("web"), kind: ProbeKind::Liveness }), stop("web", 1, secs(10)),]
    );
    let st = status_of(&r, "web");
    assert_eq!((st.phase, st.live), (Phase::Stopping, Health::Failing));
    assert_eq!(r.next_deadline(), None);
    // Exit 0 after the kill is still a failure: always restarts with backoff.
    crash_and_restart(&mut r, &web, 1, signal(15), t0 + secs(38), 1, 1);
    // The new container is probed afresh, from its own start.
    assert_eq!(status_of(&r, "web").live, Health::Unknown);
    assert_eq!(r.next_deadline(), Some(t0 + secs(39 + 5)));
}

#[test]
fn liveness_kill_counts_as_failure_even_with_exit_code_0() {
    let live = probe(0, 10, 1, 1);
    for (policy, restarts) in [(RestartPolicy::OnFailure, true), (RestartPolicy::Never, false)] {
        let mut web = with_restart(spec("web"), policy);
        web.liveness = Some(live.clone());
        let (mut r, t0) = running(&web);
        assert_eq!(r.step(Event::Tick, t0), vec![probe_action("web", 1, ProbeKind::Liveness, &live)]);
        assert_eq!(
            r.step(result("web", 1, ProbeKind::Liveness, false), t0 + secs(1)),
            vec![
                n_probe_failed("web", ProbeKind::Liveness, "connection refused"),
                note(Note::Unhealthy { app: name("web"), kind: ProbeKind::Liveness }),
                stop("web", 1, secs(10)),
            ]
        );
        if restarts {
            crash_and_restart(&mut r, &web, 1, code(0), t0 + secs(2), 1, 1);
        } else {
            assert_eq!(r.step(exited("web", 1, code(0)), t0 + secs(2)), vec![n_exited("web", code(0))]);
            assert_eq!(status_of(&r, "web").phase, Phase::Exited);
            assert_eq!(r.next_deadline(), None);
        }
    }
}

#[test]
fn a_constantly_failing_probe_notes_one_failure_per_run() {
    let live = probe(0, 10, 2, 1);
    let mut web = spec("web");
    web.liveness = Some(live.clone());
    let (mut r, t0) = running(&web);
    let mut t = t0;
    for instance in 1..=3u64 {
        let p = probe_action("web", instance, ProbeKind::Liveness, &live);
        assert_eq!(r.step(Event::Tick, t), vec![p.clone()]);
        let fail = result("web", instance, ProbeKind::Liveness, false);
        let first = r.step(fail.clone(), t);
        // Only the very first failure of the whole run of failures is noted.
        if instance == 1 {
            assert_eq!(first, vec![n_probe_failed("web", ProbeKind::Liveness, "connection refused")]);
        } else {
            assert_eq!(first, vec![]);
        }
        assert_eq!(r.step(Event::Tick, t + secs(10)), vec![p]);
        assert_eq!(
            r.step(fail, t + secs(10)),
            vec![
                note(Note::Unhealthy { app: name("web"), kind: ProbeKind::Liveness }),
                stop("web", instance, secs(10)),
            ]
        );
        let delay = 1 << (instance - 1);
        t = crash_and_restart(&mut r, &web, instance, signal(15), t + secs(11), delay, instance as u32);
    }
    // A success ends the run: the next failure is noted again.
    let p = probe_action("web", 4, ProbeKind::Liveness, &live);
    assert_eq!(r.step(Event::Tick, t), vec![p.clone()]);
    assert_eq!(r.step(result("web", 4, ProbeKind::Liveness, true), t), vec![]);
    assert_eq!(r.step(Event::Tick, t + secs(10)), vec![p]);
    assert_eq!(
        r.step(result("web", 4, ProbeKind::Liveness, false), t + secs(10)),
        vec![n_probe_failed("web", ProbeKind::Liveness, "connection refused")]
    );
}

#[test]
fn readiness_flips_with_notes_and_never_stops_anything() {
    let ready = probe(2, 5, 2, 2);
    let mut web = spec("web");
    web.readiness = Some(ready.clone());
    let (mut r, t0) = running(&web);
    assert_eq!(status_of(&r, "web").ready, Health::Unknown);
    assert_eq!(status_of(&r, "web").live, Health::None);
    let p = probe_action("web", 1, ProbeKind::Readiness, &ready);
    let mut t = t0 + secs(2);
    let mut check = |r: &mut Reconciler, ok: bool, expect: Vec<Action>, health: Health| {
        assert_eq!(r.next_deadline(), Some(t));
        assert_eq!(r.step(Event::Tick, t), vec![p.clone()]);
        assert_eq!(r.step(result("web", 1, ProbeKind::Readiness, ok), t), expect);
        assert_eq!(status_of(r, "web").ready, health);
        assert_eq!(status_of(r, "web").phase, Phase::Running);
        t += secs(5);
    };
    let failed = || n_probe_failed("web", ProbeKind::Readiness, "connection refused");
    check(&mut r, true, vec![], Health::Unknown);
    check(&mut r, true, vec![n_ready("web", true)], Health::Passing);
    check(&mut r, true, vec![], Health::Passing);
    check(&mut r, false, vec![failed()], Health::Passing);
    check(&mut r, false, vec![n_ready("web", false)], Health::Failing);
    for _ in 0..5 {
        check(&mut r, false, vec![], Health::Failing);
    }
    check(&mut r, true, vec![], Health::Failing);
    check(&mut r, false, vec![failed()], Health::Failing);
    check(&mut r, true, vec![], Health::Failing);
    check(&mut r, true, vec![n_ready("web", true)], Health::Passing);
    // A ready container that exits is not ready any more.
    assert_eq!(
        r.step(exited("web", 1, code(1)), t),
        vec![n_exited("web", code(1)), n_ready("web", false), n_restarting("web", 1, 1)]
    );
    assert_eq!(status_of(&r, "web").ready, Health::Unknown);
}

#[test]
fn readiness_never_failing_from_unknown_is_not_a_change() {
    let ready = probe(0, 5, 1, 1);
    let mut web = spec("web");
    web.readiness = Some(ready.clone());
    let (mut r, t0) = running(&web);
    assert_eq!(r.step(Event::Tick, t0), vec![probe_action("web", 1, ProbeKind::Readiness, &ready)]);
    assert_eq!(
        r.step(result("web", 1, ProbeKind::Readiness, false), t0),
        vec![n_probe_failed("web", ProbeKind::Readiness, "connection refused")]
    );
    assert_eq!(status_of(&r, "web").ready, Health::Failing);
}

#[test]
fn startup_probe_gates_liveness_and_readiness() {
    let (startup, live, ready) = (probe(1, 2, 3, 1), probe(5, 10, 3, 1), probe(0, 10, 3, 1));
    let mut web = spec("web");
    web.startup = Some(startup.clone());
    web.liveness = Some(live.clone());
    web.readiness = Some(ready.clone());
    let (mut r, t0) = running(&web);
    let st = status_of(&r, "web");
    assert_eq!((st.live, st.ready), (Health::Unknown, Health::Unknown));
    // Only the startup probe is scheduled, even though readiness has no delay.
    assert_eq!(r.next_deadline(), Some(t0 + secs(1)));
    let ps = probe_action("web", 1, ProbeKind::Startup, &startup);
    assert_eq!(r.step(Event::Tick, t0 + secs(1)), vec![ps.clone()]);
    assert_eq!(
        r.step(result("web", 1, ProbeKind::Startup, false), t0 + secs(2)),
        vec![n_probe_failed("web", ProbeKind::Startup, "connection refused")]
    );
    assert_eq!(r.step(Event::Tick, t0 + secs(4)), vec![ps]);
    // Results of gated probes were never asked for: ignored.
    assert_eq!(r.step(result("web", 1, ProbeKind::Liveness, false), t0 + secs(4)), vec![]);
    assert_eq!(r.step(result("web", 1, ProbeKind::Startup, true), t0 + secs(4)), vec![]);
    // Readiness at once (its delay is over), liveness at start + 5.
    assert_eq!(r.next_deadline(), Some(t0 + secs(4)));
    assert_eq!(r.step(Event::Tick, t0 + secs(4)), vec![probe_action("web", 1, ProbeKind::Readiness, &ready)]);
    assert_eq!(r.next_deadline(), Some(t0 + secs(5)));
    assert_eq!(r.step(Event::Tick, t0 + secs(5)), vec![probe_action("web", 1, ProbeKind::Liveness, &live)]);
    // The startup probe never runs again.
    assert_eq!(r.next_deadline(), None);
}

#[test]
fn startup_probe_failing_past_threshold_kills() {
    let startup = probe(0, 2, 2, 1);
    let mut web = spec("web");
    web.startup = Some(startup.clone());
    web.liveness = Some(probe(0, 10, 3, 1));
    let (mut r, t0) = running(&web);
    let ps = probe_action("web", 1, ProbeKind::Startup, &startup);
    assert_eq!(r.step(Event::Tick, t0), vec![ps.clone()]);
    r.step(result("web", 1, ProbeKind::Startup, false), t0);
    assert_eq!(r.step(Event::Tick, t0 + secs(2)), vec![ps]);
    assert_eq!(
        r.step(result("web", 1, ProbeKind::Startup, false), t0 + secs(2)),
        vec![note(Note::Unhealthy { app: name("web"), kind: ProbeKind::Startup }), stop("web", 1, secs(10)),]
    );
    assert_eq!(status_of(&r, "web").live, Health::Failing);
    crash_and_restart(&mut r, &web, 1, code(0), t0 + secs(3), 1, 1);
}

#[test]
fn stopping_a_ready_container_makes_it_not_ready() {
    let ready = probe(0, 5, 1, 1);
    let mut web = spec("web");
    web.readiness = Some(ready.clone());
    let (mut r, t0) = running(&web);
    r.step(Event::Tick, t0);
    assert_eq!(r.step(result("web", 1, ProbeKind::Readiness, true), t0), vec![n_ready("web", true)]);
    assert_eq!(r.step(desired(2, vec![]), t0), vec![n_ready("web", false), stop("web", 1, secs(10))]);
    // A late result of a stopping container changes nothing.
    assert_eq!(r.step(result("web", 1, ProbeKind::Readiness, true), t0), vec![]);
    assert_eq!(status_of(&r, "web").ready, Health::Unknown);
}

// ---- stale events ----

#[test]
fn events_about_old_instances_or_unknown_apps_are_ignored() {
    let live = probe(0, 10, 1, 1);
    let mut web = spec("web");
    web.liveness = Some(live.clone());
    let (mut r, t0) = running(&web);
    r.step(Event::Tick, t0); // liveness of instance 1 in flight
    let web2 = changed(web.clone());
    r.step(desired(2, vec![web2.clone()]), t0);
    // The old container is stopping: its probe result means nothing now.
    assert_eq!(r.step(result("web", 1, ProbeKind::Liveness, false), t0), vec![]);
    assert_eq!(
        r.step(exited("web", 1, code(0)), t0 + secs(1)),
        vec![n_exited("web", code(0)), start("web", 2, &web2)]
    );
    let t = t0 + secs(1);
    // Late or duplicate events of instance 1.
    assert_eq!(r.step(exited("web", 1, code(1)), t), vec![]);
    assert_eq!(r.step(started("web", 1, 5), t), vec![]);
    assert_eq!(r.step(result("web", 1, ProbeKind::Liveness, false), t), vec![]);
    assert_eq!(r.step(started("web", 2, 6), t), vec![n_started("web", 2, 6)]);
    assert_eq!(r.step(started("web", 2, 6), t), vec![]);
    let startfail = Event::StartFailed { app: name("web"), instance: 1, error: "x".into() };
    assert_eq!(r.step(startfail, t), vec![]);
    // A result nobody asked for (nothing in flight).
    assert_eq!(r.step(result("web", 2, ProbeKind::Liveness, false), t), vec![]);
    // Unknown app.
    assert_eq!(r.step(exited("nope", 1, code(1)), t), vec![]);
    assert_eq!(r.step(started("nope", 1, 1), t), vec![]);
    assert_eq!(r.step(result("nope", 1, ProbeKind::Liveness, false), t), vec![]);
    let st = status_of(&r, "web");
    assert_eq!((st.phase, st.pid), (Phase::Running, Some(6)));
}

// ---- adoption ----

#[test]
fn adoption_with_equal_spec_neither_starts_nor_stops() {
    let live = probe(5, 10, 3, 1);
    let mut web = spec("web");
    web.liveness = Some(live.clone());
    let db = spec("db");
    let t0 = Instant::now();
    let since = t0 - secs(3600);
    // The daemon's order: desired state from disk, then what it found running.
    let mut r = Reconciler::new(CFG);
    assert_eq!(r.step(desired(7, vec![db.clone(), web.clone()]), t0), vec![]);
    let adopted =
        Event::Adopted { app: name("web"), instance: 7, spec: web.clone(), pid: 4242, running_since: since };
    assert_eq!(r.step(adopted, t0), vec![]);
    let st = status_of(&r, "web");
    assert_eq!((st.phase, st.pid, st.restarts), (Phase::Running, Some(4242), 0));
    // Only the app that was not running starts; the adopted one is probed at
    // once (its initial delay, counted from `running_since`, ran out long ago).
    assert_eq!(r.next_deadline(), Some(since + secs(5)));
    assert_eq!(
        r.step(Event::Tick, t0),
        vec![start("db", 1, &db), probe_action("web", 7, ProbeKind::Liveness, &live)]
    );
    // The adopted container is like any other: its crash restarts it, numbered above.
    assert_eq!(r.step(result("web", 7, ProbeKind::Liveness, true), t0), vec![]);
    crash_and_restart(&mut r, &web, 7, code(1), t0 + secs(1), 1, 1);
}

#[test]
fn adoption_before_the_desired_state_works_too() {
    let web = spec("web");
    let t0 = Instant::now();
    let mut r = Reconciler::new(CFG);
    let adopted = |spec: &AppSpec| Event::Adopted {
        app: name("web"),
        instance: 3,
        spec: spec.clone(),
        pid: 77,
        running_since: t0 - secs(10),
    };
    // Unchanged spec: keeps running.
    assert_eq!(r.step(adopted(&web), t0), vec![]);
    assert_eq!(status_of(&r, "web").phase, Phase::Running);
    assert_eq!(r.step(desired(1, vec![web.clone()]), t0), vec![]);
    assert_eq!(r.step(Event::Tick, t0), vec![]);
    assert_eq!(status_of(&r, "web").pid, Some(77));

    // Changed spec: replaced.
    let mut r = Reconciler::new(CFG);
    let web2 = changed(web.clone());
    assert_eq!(r.step(adopted(&web), t0), vec![]);
    assert_eq!(
        r.step(desired(1, vec![web2.clone()]), t0),
        vec![note(Note::Replacing { app: name("web") }), stop("web", 3, secs(10))]
    );
    r.step(Event::Tick, t0);
    assert_eq!(
        r.step(exited("web", 3, signal(15)), t0 + secs(1)),
        vec![n_exited("web", signal(15)), start("web", 4, &web2)]
    );

    // Not desired: stopped, then forgotten.
    let mut r = Reconciler::new(CFG);
    assert_eq!(r.step(adopted(&web), t0), vec![]);
    assert_eq!(r.step(desired(1, vec![]), t0), vec![stop("web", 3, secs(10))]);
    assert_eq!(
        r.step(exited("web", 3, signal(15)), t0 + secs(1)),
        vec![n_exited("web", signal(15)), note(Note::Removed { app: name("web") })]
    );
    assert_eq!(r.status(), vec![]);
}

#[test]
fn adoption_with_changed_spec_stops_then_starts() {
    let web = spec("web");
    let web2 = changed(web.clone());
    let t0 = Instant::now();
    let mut r = Reconciler::new(CFG);
    assert_eq!(r.step(desired(2, vec![web2.clone()]), t0), vec![]);
    let adopted = Event::Adopted {
        app: name("web"),
        instance: 5,
        spec: web.clone(),
        pid: 50,
        running_since: t0 - secs(60),
    };
    // Stopped with the grace of the spec it runs.
    assert_eq!(
        r.step(adopted, t0),
        vec![note(Note::Replacing { app: name("web") }), stop("web", 5, secs(10))]
    );
    assert_eq!(r.next_deadline(), None);
    assert_eq!(r.step(Event::Tick, t0), vec![]);
    assert_eq!(
        r.step(exited("web", 5, signal(15)), t0 + secs(2)),
        vec![n_exited("web", signal(15)), start("web", 6, &web2)]
    );
    assert_eq!(status_of(&r, "web").restarts, 0);
}

#[test]
fn adopted_container_no_longer_desired_is_stopped() {
    let t0 = Instant::now();
    let mut r = Reconciler::new(CFG);
    assert_eq!(r.step(desired(1, vec![]), t0), vec![]);
    let adopted =
        Event::Adopted { app: name("old"), instance: 2, spec: spec("old"), pid: 9, running_since: t0 };
    assert_eq!(r.step(adopted, t0), vec![stop("old", 2, secs(10))]);
    assert_eq!(status_of(&r, "old").phase, Phase::Stopping);
    assert_eq!(
        r.step(exited("old", 2, signal(15)), t0),
        vec![n_exited("old", signal(15)), note(Note::Removed { app: name("old") })]
    );
    assert_eq!(r.status(), vec![]);
}

#[test]
fn a_second_container_of_one_app_is_stopped() {
    let web = spec("web");
    let (mut r, t0) = running(&web);
    let stray =
        Event::Adopted { app: name("web"), instance: 9, spec: web.clone(), pid: 99, running_since: t0 };
    assert_eq!(r.step(stray, t0), vec![stop("web", 9, secs(10))]);
    // Its exit is not the tracked container's.
    assert_eq!(r.step(exited("web", 9, signal(15)), t0), vec![]);
    assert_eq!(status_of(&r, "web").pid, Some(100));
    // Later instances are numbered above the stray.
    assert_eq!(
        r.step(exited("web", 1, code(1)), t0 + secs(1)),
        vec![n_exited("web", code(1)), n_restarting("web", 1, 1)]
    );
    assert_eq!(r.step(Event::Tick, t0 + secs(2)), vec![start("web", 10, &web)]);
}

#[test]
fn adopted_exit_follows_the_restart_policy() {
    let t0 = Instant::now();
    let web = spec("web");
    let job = with_restart(spec("job"), RestartPolicy::Never);
    let mut r = Reconciler::new(CFG);
    assert_eq!(r.step(desired(1, vec![job.clone(), web.clone()]), t0), vec![]);
    let gone = |app: &str, spec: &AppSpec, exit| Event::AdoptedExited {
        app: name(app),
        instance: 4,
        spec: spec.clone(),
        exit,
    };
    assert_eq!(
        r.step(gone("web", &web, code(1)), t0),
        vec![n_exited("web", code(1)), n_restarting("web", 1, 1)]
    );
    assert_eq!(r.step(gone("job", &job, code(1)), t0), vec![n_exited("job", code(1))]);
    assert_eq!(status_of(&r, "job").phase, Phase::Exited);
    assert_eq!(status_of(&r, "job").last_exit, Some(code(1)));
    assert_eq!(status_of(&r, "web").phase, Phase::Backoff);
    assert_eq!(r.next_deadline(), Some(t0 + secs(1)));
    assert_eq!(r.step(Event::Tick, t0), vec![]);
    assert_eq!(r.step(Event::Tick, t0 + secs(1)), vec![start("web", 5, &web)]);
    assert_eq!(status_of(&r, "web").restarts, 1);
    assert_eq!(r.step(Event::Tick, t0 + secs(100)), vec![]);
}

#[test]
fn adopted_exit_of_an_old_spec_starts_the_desired_one() {
    let t0 = Instant::now();
    let web = spec("web");
    let web2 = changed(web.clone());
    let mut r = Reconciler::new(CFG);
    r.step(desired(1, vec![web2.clone()]), t0);
    let gone = Event::AdoptedExited { app: name("web"), instance: 4, spec: web, exit: code(0) };
    assert_eq!(r.step(gone, t0), vec![n_exited("web", code(0))]);
    assert_eq!(r.step(Event::Tick, t0), vec![start("web", 5, &web2)]);
    assert_eq!(status_of(&r, "web").restarts, 0);

    // And of an app that is not desired: nothing to do but say so.
    let gone = Event::AdoptedExited { app: name("old"), instance: 1, spec: spec("old"), exit: code(0) };
    assert_eq!(r.step(gone, t0), vec![n_exited("old", code(0)), note(Note::Removed { app: name("old") })]);
}

#[test]
fn adopted_exit_before_the_desired_state() {
    let t0 = Instant::now();
    let web = spec("web");
    let mut r = Reconciler::new(CFG);
    let gone = Event::AdoptedExited { app: name("web"), instance: 2, spec: web.clone(), exit: oom() };
    assert_eq!(r.step(gone, t0), vec![n_exited("web", oom()), n_restarting("web", 1, 1)]);
    assert_eq!(r.step(desired(1, vec![web.clone()]), t0), vec![]);
    assert_eq!(r.step(Event::Tick, t0 + secs(1)), vec![start("web", 3, &web)]);
}

// ---- deadlines, status, order ----

#[test]
fn next_deadline_is_the_earliest_backoff_or_probe() {
    let mut a = spec("a");
    a.liveness = Some(probe(30, 10, 3, 1));
    let b = spec("b");
    let t0 = Instant::now();
    let mut r = Reconciler::new(CFG);
    assert_eq!(r.next_deadline(), None);
    r.step(Event::Tick, t0);
    r.step(desired(1, vec![a.clone(), b.clone()]), t0);
    assert_eq!(r.next_deadline(), None); // both starting
    r.step(started("a", 1, 1), t0);
    assert_eq!(r.next_deadline(), Some(t0 + secs(30)));
    r.step(started("b", 1, 2), t0);
    assert_eq!(r.next_deadline(), Some(t0 + secs(30)));
    r.step(exited("b", 1, code(1)), t0 + secs(2));
    assert_eq!(r.next_deadline(), Some(t0 + secs(3)));
    // A tick before any deadline does nothing.
    assert_eq!(r.step(Event::Tick, t0 + secs(2)), vec![]);
    assert_eq!(r.step(Event::Tick, t0 + secs(3)), vec![start("b", 2, &b)]);
    assert_eq!(r.next_deadline(), Some(t0 + secs(30)));
}

#[test]
fn status_reports_everything_sorted_by_name() {
    let mut web = spec("web");
    web.liveness = Some(probe(0, 10, 3, 1));
    web.readiness = Some(probe(0, 10, 3, 1));
    let job = with_restart(spec("job"), RestartPolicy::Never);
    let t0 = Instant::now();
    let mut r = Reconciler::new(CFG);
    r.step(Event::Tick, t0);
    r.step(desired(1, vec![job.clone(), web.clone()]), t0);
    r.step(started("web", 1, 10), t0);
    r.step(started("job", 1, 11), t0);
    r.step(exited("job", 1, code(3)), t0 + secs(1));
    r.step(Event::Tick, t0 + secs(1));
    r.step(result("web", 1, ProbeKind::Liveness, true), t0 + secs(1));
    let base = |app: &str| AppStatus {
        name: name(app),
        phase: Phase::Running,
        pid: None,
        restarts: 0,
        last_exit: None,
        live: Health::None,
        ready: Health::None,
        image: "busybox:1.36".into(),
        image_digest: None,
        error: None,
    };
    assert_eq!(
        r.status(),
        vec![
            AppStatus { phase: Phase::Exited, last_exit: Some(code(3)), ..base("job") },
            AppStatus { pid: Some(10), live: Health::Passing, ready: Health::Unknown, ..base("web") },
        ]
    );
}

#[test]
fn actions_come_out_in_name_order() {
    let (a, b, c) = (spec("a"), spec("b"), spec("c"));
    let t0 = Instant::now();
    let mut r = Reconciler::new(CFG);
    // Out of order on purpose (the model keeps them sorted; do not rely on it).
    assert_eq!(r.step(desired(1, vec![c.clone(), a.clone(), b.clone()]), t0), vec![]);
    assert_eq!(r.step(Event::Tick, t0), vec![start("a", 1, &a), start("b", 1, &b), start("c", 1, &c)]);
    for app in ["a", "b", "c"] {
        r.step(started(app, 1, 1), t0);
    }
    for app in ["c", "a", "b"] {
        r.step(exited(app, 1, code(1)), t0);
    }
    assert_eq!(
        r.step(Event::Tick, t0 + secs(1)),
        vec![start("a", 2, &a), start("b", 2, &b), start("c", 2, &c)]
    );
    for app in ["b", "c", "a"] {
        r.step(started(app, 2, 2), t0 + secs(1));
    }
    assert_eq!(
        r.step(desired(2, vec![]), t0 + secs(1)),
        vec![stop("a", 2, secs(10)), stop("b", 2, secs(10)), stop("c", 2, secs(10))]
    );
}
