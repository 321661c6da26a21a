//! Rollout decisions: one `t0`, later instants built from it, no broker, no
//! sleeping. Each scenario asserts the exact actions of the steps that matter.

use super::*;
use skiff_common::protocol::Rejection;
use skiff_common::{AppName, Origin, RolloutStatus};

const UNIX: u64 = 1_000;
const TIMEOUT: Duration = Duration::from_secs(600);

fn dev(s: &str) -> DeviceId {
    DeviceId::try_from(s).unwrap()
}

fn devs(n: usize) -> Vec<DeviceId> {
    (1..=n).map(|i| dev(&format!("pi-{i}"))).collect()
}

fn state(cmd: &str) -> DesiredState {
    let text = format!("[[app]]\nname = \"web\"\nimage = \"busybox:1\"\ncommand = [\"{cmd}\"]\n");
    let mut s = skiff_common::toml_file::parse(&text).unwrap();
    s.origin = Origin::Controller;
    s
}

fn with_gen(mut s: DesiredState, g: u64) -> DesiredState {
    s.generation = g;
    s
}

fn body(d: &DeviceId, s: DesiredState) -> DesiredBody {
    DesiredBody { device: d.clone(), state: s, replaces: None }
}

fn report(d: &DeviceId, applied: u64, rollout: RolloutStatus) -> Reported {
    Reported {
        device: d.clone(),
        generation_applied: applied,
        origin: Origin::Controller,
        apps: Vec::new(),
        agent_version: "test".into(),
        last_rejection: None,
        sent_unix: 0,
        pulls: Vec::new(),
        rollout,
    }
}

fn committed(g: u64) -> RolloutStatus {
    RolloutStatus { committed: g, testing: None, failed: None }
}

fn testing(good: u64, g: u64) -> RolloutStatus {
    RolloutStatus { committed: good, testing: Some(g), failed: None }
}

fn failed(good: u64, g: u64) -> RolloutStatus {
    RolloutStatus {
        committed: good,
        testing: None,
        failed: Some(RolloutFailure {
            generation: g,
            app: Some(AppName::try_from("web").unwrap()),
            reason: "exited with code 1".into(),
            rolled_back: true,
        }),
    }
}

/// A group of `n` devices all running generation 5 of the old state.
fn planner(n: usize, waves: &str, abort: bool) -> Planner {
    let d = devs(n);
    let w = parse_waves(waves).unwrap().resolve(n).unwrap();
    let mut p = Planner::new(d.clone(), w, state("new"), TIMEOUT, abort);
    for x in &d {
        p.desired(x, Some(body(x, with_gen(state("old"), 5))));
        p.reported(x, report(x, 5, committed(5)), 3);
    }
    p
}

fn send(d: &str, g: u64) -> Action {
    Action::Send { device: dev(d), state: with_gen(state("new"), g), rollback: false }
}

fn moved(d: &str, progress: Progress) -> Action {
    Action::Progress { device: dev(d), progress }
}

/// What the broker echoes once the planner's Send is published.
fn echo(p: &mut Planner, actions: &[Action]) {
    for a in actions {
        if let Action::Send { device, state, .. } = a {
            p.desired(device, Some(body(device, state.clone())));
        }
    }
}

fn commit(p: &mut Planner, d: &str, g: u64) {
    p.reported(&dev(d), report(&dev(d), g, committed(g)), 3);
}

fn done(actions: &[Action]) -> &Outcome {
    match actions.last() {
        Some(Action::Done(o)) => o,
        other => panic!("not done: {other:?}"),
    }
}

#[test]
fn waves_parse_strictly_and_name_the_bad_part() {
    let w = parse_waves("1, 10%,100%").unwrap();
    assert_eq!(w.resolve(6).unwrap(), vec![0..1, 1..6], "10% of 6 reaches no device more than 1");
    assert_eq!(w.resolve(20).unwrap(), vec![0..1, 1..2, 2..20]);
    assert_eq!(w.resolve(1).unwrap(), vec![0..1]);
    assert_eq!(parse_waves("1,50%,100%").unwrap().resolve(6).unwrap(), vec![0..1, 1..3, 3..6]);
    assert_eq!(parse_waves("10").unwrap().resolve(6).unwrap(), vec![0..6]);
    assert_eq!(parse_waves("1,2").unwrap().resolve(6).unwrap(), vec![0..1, 1..2], "waves may stop short");

    assert_eq!(parse_waves(""), Err(WavesError::Empty));
    assert_eq!(parse_waves("  "), Err(WavesError::Empty));
    let err = |s: &str| parse_waves(s).unwrap_err().to_string();
    assert_eq!(err("0"), "--waves part 1 (\"0\"): a wave has at least one device");
    assert_eq!(err("1,150%"), "--waves part 2 (\"150%\"): a percentage of the group is 1% to 100%");
    assert_eq!(err("1,0%"), "--waves part 2 (\"0%\"): a percentage of the group is 1% to 100%");
    assert_eq!(err("1,,100%"), "--waves part 2 (\"\"): empty");
    assert!(err("1,x").starts_with("--waves part 2 (\"x\"): not a device count"), "{}", err("1,x"));
    assert!(err("-1").starts_with("--waves part 1 (\"-1\"): not a device count"));
    assert!(err("5%%").contains("not a percentage"));
    assert!(err("3,2").starts_with("--waves part 2 (\"2\") does not reach more devices than part 1 (\"3\")"));
    assert!(err("10%,10%").starts_with("--waves part 2 (\"10%\") does not reach more"), "{}", err("10%,10%"));
    assert!(err("1,100%,200").starts_with("--waves part 3 (\"200\") does not reach more devices than part 2"));
    // Counts and percentages compare only once the group is known.
    let e = parse_waves("5,10%").unwrap().resolve(6).unwrap_err().to_string();
    assert!(
        e.starts_with(
            "--waves part 2 (\"10%\") does not reach more devices than part 1 (\"5\") over a group of 6"
        ),
        "{e}"
    );
}

#[test]
fn three_waves_commit_one_after_the_other() {
    let mut p = planner(6, "1,50%,100%", false);
    let t0 = Instant::now();
    let g = UNIX; // above every generation the group has (5)
    let a = p.step(t0, UNIX).unwrap();
    assert_eq!(
        a,
        vec![
            Action::WaveStarted { wave: 1, devices: vec![dev("pi-1")] },
            send("pi-1", g),
            Action::Wait { until: t0 + TIMEOUT },
        ]
    );
    // Nothing new until the broker echoes: no second send.
    assert_eq!(p.step(t0, UNIX).unwrap(), vec![Action::Wait { until: t0 + TIMEOUT }]);
    echo(&mut p, &a);
    assert_eq!(
        p.step(t0, UNIX).unwrap(),
        vec![moved("pi-1", Progress::Pending { generation: g }), Action::Wait { until: t0 + TIMEOUT }]
    );
    p.reported(&dev("pi-1"), report(&dev("pi-1"), g, testing(5, g)), 3);
    assert_eq!(
        p.step(t0, UNIX).unwrap(),
        vec![moved("pi-1", Progress::Testing { generation: g }), Action::Wait { until: t0 + TIMEOUT }]
    );
    commit(&mut p, "pi-1", g);
    let t1 = t0 + Duration::from_secs(70);
    let a = p.step(t1, UNIX + 70).unwrap();
    assert_eq!(
        a,
        vec![
            moved("pi-1", Progress::Committed { generation: g, legacy: false }),
            Action::WaveDone { wave: 1 },
            Action::WaveStarted { wave: 2, devices: vec![dev("pi-2"), dev("pi-3")] },
            send("pi-2", g),
            send("pi-3", g),
            Action::Wait { until: t1 + TIMEOUT },
        ],
        "the second wave gets the same generation, and its own timeout"
    );
    echo(&mut p, &a);
    commit(&mut p, "pi-2", g);
    commit(&mut p, "pi-3", g);
    let a = p.step(t1, UNIX).unwrap();
    assert!(a.contains(&Action::WaveDone { wave: 2 }), "{a:?}");
    assert_eq!(
        a.iter().filter(|x| matches!(x, Action::Send { .. })).count(),
        3,
        "wave 3 is pi-4..pi-6: {a:?}"
    );
    echo(&mut p, &a);
    for d in ["pi-4", "pi-5", "pi-6"] {
        commit(&mut p, d, g);
    }
    let a = p.step(t1, UNIX).unwrap();
    let o = done(&a);
    assert_eq!((o.verdict, o.wave, o.waves, o.generation), (Verdict::Committed, 3, 3, Some(g)));
    assert!(o
        .rows
        .iter()
        .all(|r| matches!(r.progress, Progress::Committed { generation, .. } if generation == g)));
    assert_eq!(o.rows.iter().map(|r| r.wave).collect::<Vec<_>>(), [1, 2, 2, 3, 3, 3]);
    assert_eq!(p.step(t1, UNIX).unwrap(), vec![], "nothing after done");
}

#[test]
fn a_rollback_in_wave_two_stops_before_wave_three() {
    let mut p = planner(6, "1,50%,100%", false);
    let t0 = Instant::now();
    let a = p.step(t0, UNIX).unwrap();
    echo(&mut p, &a);
    commit(&mut p, "pi-1", UNIX);
    let a = p.step(t0, UNIX).unwrap();
    echo(&mut p, &a);
    commit(&mut p, "pi-2", UNIX);
    p.reported(&dev("pi-3"), report(&dev("pi-3"), UNIX, failed(5, UNIX)), 3);
    let a = p.step(t0, UNIX).unwrap();
    let Progress::Failed { failure, .. } = p.progress_of(&dev("pi-3")) else { panic!() };
    assert_eq!(
        a,
        vec![
            moved("pi-2", Progress::Committed { generation: UNIX, legacy: false }),
            moved("pi-3", Progress::Failed { generation: UNIX, failure }),
            Action::Done(Outcome {
                verdict: Verdict::Failed,
                wave: 2,
                waves: 3,
                generation: Some(UNIX),
                rows: p.outcome(Verdict::Failed, None).rows,
                abort: None,
            }),
        ],
        "no send to wave 3"
    );
    let o = done(&a);
    assert_eq!(o.rows[2].progress.word(), "rolled-back");
    assert_eq!(o.rows[3].progress, Progress::NotSent);
}

#[test]
fn abort_on_failure_resends_the_previous_state_of_the_wave_above_all_generations() {
    let mut p = planner(6, "1,50%,100%", true);
    let t0 = Instant::now();
    let a = p.step(t0, UNIX).unwrap();
    echo(&mut p, &a);
    commit(&mut p, "pi-1", UNIX);
    let a = p.step(t0, UNIX).unwrap();
    echo(&mut p, &a);
    commit(&mut p, "pi-2", UNIX);
    p.reported(&dev("pi-3"), report(&dev("pi-3"), UNIX, failed(5, UNIX)), 3);
    let a = p.step(t0, UNIX).unwrap();
    let sends: Vec<_> = a.iter().filter(|x| matches!(x, Action::Send { .. })).cloned().collect();
    let g = UNIX + 1;
    assert_eq!(
        sends,
        vec![
            Action::Send { device: dev("pi-2"), state: with_gen(state("old"), g), rollback: true },
            Action::Send { device: dev("pi-3"), state: with_gen(state("old"), g), rollback: true },
        ],
        "wave 2 only; wave 1 keeps what it committed"
    );
    let o = done(&a);
    assert_eq!(o.verdict, Verdict::Failed);
    assert_eq!(
        o.abort,
        Some(Abort { resent: vec![dev("pi-2"), dev("pi-3")], generation: g, unknown: vec![] })
    );
}

#[test]
fn abort_reaches_a_device_whose_send_the_broker_has_not_echoed_yet() {
    let mut p = planner(2, "100%", true);
    let t0 = Instant::now();
    let a = p.step(t0, UNIX).unwrap();
    // Only pi-2's state has come back; pi-2 fails at once.
    echo(&mut p, &a[2..3]);
    assert_eq!(a[2], send("pi-2", UNIX));
    p.reported(&dev("pi-2"), report(&dev("pi-2"), UNIX, failed(5, UNIX)), 3);
    let a = p.step(t0, UNIX).unwrap();
    let o = done(&a);
    assert_eq!(o.abort.as_ref().unwrap().resent, vec![dev("pi-1"), dev("pi-2")]);
    assert!(a.contains(&Action::Send {
        device: dev("pi-1"),
        state: with_gen(state("old"), UNIX + 1),
        rollback: true
    }));
}

#[test]
fn a_restarted_controller_sends_nothing_twice_and_continues() {
    // The first run sent wave 1 and half of wave 2, then died.
    let mut p = planner(6, "1,50%,100%", true);
    let g = 900;
    for d in ["pi-1", "pi-2"] {
        p.desired(&dev(d), Some(body(&dev(d), with_gen(state("new"), g))));
    }
    commit(&mut p, "pi-1", g);
    p.reported(&dev("pi-2"), report(&dev("pi-2"), g, testing(5, g)), 3);
    let t0 = Instant::now();
    let a = p.step(t0, UNIX).unwrap();
    assert_eq!(
        a,
        vec![
            Action::WaveStarted { wave: 1, devices: vec![dev("pi-1")] },
            moved("pi-1", Progress::Committed { generation: g, legacy: false }),
            Action::WaveDone { wave: 1 },
            Action::WaveStarted { wave: 2, devices: vec![dev("pi-2"), dev("pi-3")] },
            moved("pi-2", Progress::Testing { generation: g }),
            send("pi-3", UNIX),
            Action::Wait { until: t0 + TIMEOUT },
        ],
        "only pi-3 is sent, with a new generation"
    );
    echo(&mut p, &a);
    // pi-2 (sent by the earlier run) fails: its previous state is unknown here.
    p.reported(&dev("pi-2"), report(&dev("pi-2"), g, failed(5, g)), 3);
    let a = p.step(t0, UNIX).unwrap();
    let o = done(&a);
    assert_eq!(
        o.abort,
        Some(Abort { resent: vec![dev("pi-3")], generation: UNIX + 1, unknown: vec![dev("pi-2")] })
    );
}

#[test]
fn a_wave_that_does_not_commit_in_time_times_out() {
    let mut p = planner(2, "1,100%", false);
    let t0 = Instant::now();
    let a = p.step(t0, UNIX).unwrap();
    echo(&mut p, &a);
    p.reported(&dev("pi-1"), report(&dev("pi-1"), UNIX, testing(5, UNIX)), 3);
    let almost = t0 + TIMEOUT - Duration::from_millis(1);
    assert_eq!(p.step(almost, UNIX).unwrap().last(), Some(&Action::Wait { until: t0 + TIMEOUT }));
    let a = p.step(t0 + TIMEOUT, UNIX).unwrap();
    let o = done(&a);
    assert_eq!((o.verdict, o.wave), (Verdict::TimedOut, 1));
    assert_eq!(o.rows[0].progress, Progress::Testing { generation: UNIX });
    assert_eq!(o.rows[1].progress, Progress::NotSent);
}

#[test]
fn a_refused_state_stops_the_wave() {
    let mut p = planner(2, "1,100%", false);
    let t0 = Instant::now();
    let a = p.step(t0, UNIX).unwrap();
    echo(&mut p, &a);
    let mut r = report(&dev("pi-1"), 5, committed(5));
    r.last_rejection = Some(Rejection::new(Some(UNIX), "unknown key"));
    p.reported(&dev("pi-1"), r, 3);
    let a = p.step(t0, UNIX).unwrap();
    assert_eq!(
        done(&a).rows[0].progress,
        Progress::Refused { generation: UNIX, reason: "unknown key".into() }
    );
}

#[test]
fn an_agent_before_rollouts_commits_at_once() {
    let mut p = planner(1, "100%", false);
    let t0 = Instant::now();
    let a = p.step(t0, UNIX).unwrap();
    echo(&mut p, &a);
    // A schema-2 report decodes with committed = generation_applied.
    p.reported(&dev("pi-1"), report(&dev("pi-1"), UNIX, committed(UNIX)), 2);
    let a = p.step(t0, UNIX).unwrap();
    assert_eq!(a[0], moved("pi-1", Progress::Committed { generation: UNIX, legacy: true }));
    assert_eq!(done(&a).verdict, Verdict::Committed);
}

#[test]
fn the_generation_is_above_everything_the_group_has() {
    let mut p = planner(2, "100%", false);
    // A device reports a generation above the clock (a local apply, say).
    p.reported(&dev("pi-2"), report(&dev("pi-2"), 5000, failed(5, 5000)), 3);
    let a = p.step(Instant::now(), UNIX).unwrap();
    assert!(a.contains(&send("pi-1", 5001)) && a.contains(&send("pi-2", 5001)), "{a:?}");

    let mut p = planner(1, "100%", false);
    p.reported(&dev("pi-1"), report(&dev("pi-1"), MAX_GENERATION, committed(MAX_GENERATION)), 3);
    assert_eq!(
        p.step(Instant::now(), UNIX),
        Err(RolloutError::Generation { device: dev("pi-1"), generation: MAX_GENERATION })
    );
}

#[test]
fn content_is_apps_and_rollout_settings_not_the_generation() {
    let seen = |s: DesiredState| Seen { desired: Some(body(&dev("pi-1"), s)), ..Seen::default() };
    let target = state("new");
    assert_eq!(progress(&target, &seen(with_gen(state("new"), 77))), Progress::Pending { generation: 77 });
    assert_eq!(progress(&target, &seen(state("old"))), Progress::NotSent);
    let mut other = state("new");
    other.rollout.stable = Duration::from_secs(120);
    assert_eq!(progress(&target, &seen(other)), Progress::NotSent, "--stable changes the content");
    assert_eq!(progress(&target, &Seen::default()), Progress::NotSent);
}
