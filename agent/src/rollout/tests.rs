//! Rollout tests: the real reconciler and a trial fed the same way the daemon
//! feeds them, with `Instant`s built from one `t0`; each asserts the verdict
//! and when it comes.

use super::*;
use crate::reconciler::{Action, BackoffConfig, Event, Reconciler};
use skiff_common::ExitInfo;
use std::time::Duration;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn name(s: &str) -> AppName {
    AppName::try_from(s).unwrap()
}

fn state(generation: u64, toml: &str) -> DesiredState {
    let mut s = skiff_common::toml_file::parse(toml).unwrap();
    s.generation = generation;
    s
}

const WEB: &str = "[[app]]\nname = \"web\"\nimage = \"busybox\"\ncommand = [\"httpd\", \"-f\"]\n";

fn code(c: i32) -> ExitInfo {
    ExitInfo { code: Some(c), signal: None, oom_killed: false }
}

/// A reconciler with the generation on test applied at `t0`, and its trial.
struct Run {
    rec: Reconciler,
    trial: Trial,
    t0: Instant,
    /// Instances started, by app.
    started: BTreeMap<AppName, u64>,
}

impl Run {
    fn new(s: &DesiredState, can_roll_back: bool) -> Run {
        let t0 = Instant::now();
        let mut run = Run {
            rec: Reconciler::new(BackoffConfig::default()),
            trial: Trial::begin(s, can_roll_back.then(DesiredState::empty).as_ref(), t0),
            t0,
            started: BTreeMap::new(),
        };
        assert_eq!(run.step(Event::Desired(s.clone()), 0), None);
        assert_eq!(run.step(Event::Tick, 0), None);
        run
    }

    /// One event at `t0 + at` seconds; the trial's verdict after it.
    fn step(&mut self, ev: Event, at: u64) -> Option<Verdict> {
        self.step_ms(ev, at * 1000)
    }

    fn step_ms(&mut self, ev: Event, ms: u64) -> Option<Verdict> {
        let now = self.t0 + Duration::from_millis(ms);
        for a in self.rec.step(ev, now) {
            match a {
                Action::Note(n) => self.trial.note(&n),
                Action::Start { app, instance, .. } => {
                    self.started.insert(app, instance);
                }
                _ => {}
            }
        }
        self.trial.observe(&self.rec.status(), now)
    }

    fn instance(&self, app: &str) -> u64 {
        self.started[&name(app)]
    }

    fn started(&mut self, app: &str, at: u64) -> Option<Verdict> {
        let instance = self.instance(app);
        self.step(Event::Started { app: name(app), instance, pid: 100 + instance as i32 }, at)
    }

    fn exited(&mut self, app: &str, exit: ExitInfo, at: u64) -> Option<Verdict> {
        let instance = self.instance(app);
        self.step(Event::Exited { app: name(app), instance, exit }, at)
    }

    /// A tick at `at` (the probe is due), then its result.
    fn probe(&mut self, app: &str, kind: crate::reconciler::ProbeKind, ok: bool, at: u64) -> Option<Verdict> {
        let instance = self.instance(app);
        let now = self.t0 + secs(at);
        let due = self.rec.step(Event::Tick, now);
        assert!(
            due.iter().any(|a| matches!(a, Action::Probe { kind: k, .. } if *k == kind)),
            "no {kind:?} probe due at {at} s: {due:?}"
        );
        let detail = if ok { String::new() } else { "connection refused".into() };
        self.step(Event::ProbeResult { app: name(app), instance, kind, ok, detail }, at)
    }
}

fn failed(generation: u64, app: Option<&str>, reason: &str, rolled_back: bool) -> Option<Verdict> {
    Some(Verdict::Fail(RolloutFailure { generation, app: app.map(name), reason: reason.into(), rolled_back }))
}

#[test]
fn a_healthy_generation_commits_when_the_window_has_passed_and_not_before() {
    let s = state(5, &format!("[rollout]\nstable = \"30s\"\n{WEB}"));
    let mut r = Run::new(&s, true);
    assert_eq!(r.started("web", 2), None);
    // Healthy from 2 s: the window ends at 32 s.
    assert_eq!(r.trial.next_deadline(), r.t0 + secs(32));
    assert_eq!(r.step_ms(Event::Tick, 31_999), None);
    assert_eq!(r.step(Event::Tick, 32), Some(Verdict::Commit { generation: 5 }));
}

#[test]
fn an_app_that_exits_1_at_once_fails_the_generation_and_is_named() {
    let s = state(6, WEB);
    let mut r = Run::new(&s, true);
    assert_eq!(r.started("web", 1), None);
    assert_eq!(r.exited("web", code(1), 2), failed(6, Some("web"), "exited with code 1", true));
}

#[test]
fn a_restart_fails_the_test_even_after_a_clean_exit() {
    // restart = "always": an exit 0 is followed by a restart, and "no restart" is the rule.
    let s = state(6, WEB);
    let mut r = Run::new(&s, true);
    r.started("web", 1);
    assert_eq!(r.exited("web", code(0), 20), failed(6, Some("web"), "exited with code 0", true));
}

#[test]
fn a_one_shot_app_that_finished_well_counts_as_healthy() {
    let s = state(
        7,
        &format!(
            "[rollout]\nstable = \"10s\"\n{WEB}[[app]]\nname = \"migrate\"\nimage = \"busybox\"\nrestart = \"never\"\n"
        ),
    );
    let mut r = Run::new(&s, true);
    r.started("migrate", 1);
    r.started("web", 1);
    // Both running from 1 s; the one-shot's clean exit keeps the window going.
    assert_eq!(r.exited("migrate", code(0), 3), None);
    assert_eq!(r.step(Event::Tick, 10), None);
    assert_eq!(r.step(Event::Tick, 11), Some(Verdict::Commit { generation: 7 }));
    // The same app failing is a failure, with no restart to wait for.
    let mut r = Run::new(&s, true);
    r.started("migrate", 1);
    assert_eq!(r.exited("migrate", code(3), 3), failed(7, Some("migrate"), "exited with code 3", true));
}

#[test]
fn a_liveness_kill_fails_the_generation_with_the_probe_s_reason() {
    let s = state(
        8,
        &format!("{WEB}[app.liveness]\ntcp = {{ port = 80 }}\nperiod = \"1s\"\nfailure_threshold = 2\n"),
    );
    let mut r = Run::new(&s, true);
    r.started("web", 1);
    use crate::reconciler::ProbeKind::Liveness;
    assert_eq!(r.probe("web", Liveness, true, 2), None);
    assert_eq!(r.probe("web", Liveness, false, 3), None);
    assert_eq!(
        r.probe("web", Liveness, false, 4),
        failed(8, Some("web"), "killed by its liveness probe (connection refused)", true)
    );
}

#[test]
fn an_app_never_ready_fails_at_the_deadline_with_the_probe_s_reason() {
    let s = state(
        9,
        &format!(
            "[rollout]\nstable = \"10s\"\ndeadline = \"60s\"\n{WEB}[app.readiness]\ntcp = {{ port = 80 }}\nperiod = \"5s\"\n"
        ),
    );
    let mut r = Run::new(&s, true);
    r.started("web", 1);
    use crate::reconciler::ProbeKind::Readiness;
    assert_eq!(r.probe("web", Readiness, false, 5), None);
    assert_eq!(r.trial.next_deadline(), r.t0 + secs(60));
    assert_eq!(r.step_ms(Event::Tick, 59_999), None);
    assert_eq!(
        r.step(Event::Tick, 60),
        failed(
            9,
            Some("web"),
            "not running and ready within the rollout deadline of 1m: readiness probe failed: connection refused",
            true
        )
    );
}

#[test]
fn readiness_lost_restarts_the_window() {
    let s = state(
        10,
        &format!(
            "[rollout]\nstable = \"20s\"\n{WEB}[app.readiness]\ntcp = {{ port = 80 }}\nperiod = \"5s\"\nfailure_threshold = 1\n"
        ),
    );
    let mut r = Run::new(&s, true);
    r.started("web", 1);
    use crate::reconciler::ProbeKind::Readiness;
    assert_eq!(r.probe("web", Readiness, true, 1), None);
    assert_eq!(r.probe("web", Readiness, false, 11), None);
    assert_eq!(r.probe("web", Readiness, true, 16), None);
    assert_eq!(r.step(Event::Tick, 35), None, "the window began again at 16 s");
    assert_eq!(r.step(Event::Tick, 36), Some(Verdict::Commit { generation: 10 }));
}

#[test]
fn a_create_failure_fails_the_generation() {
    let s = state(11, WEB);
    let mut r = Run::new(&s, true);
    let instance = r.instance("web");
    assert_eq!(
        r.step(
            Event::StartFailed {
                app: name("web"),
                instance,
                error: "image busybox is not in the store".into()
            },
            1
        ),
        failed(11, Some("web"), "could not be created: image busybox is not in the store", true)
    );
}

#[test]
fn rollback_off_or_nothing_to_go_back_to_fails_without_rolling_back() {
    let off = state(12, &format!("[rollout]\nrollback = false\n{WEB}"));
    let mut r = Run::new(&off, true);
    r.started("web", 1);
    assert_eq!(r.exited("web", code(2), 2), failed(12, Some("web"), "exited with code 2", false));
    let on = state(12, WEB);
    let mut r = Run::new(&on, false);
    r.started("web", 1);
    assert_eq!(r.exited("web", code(2), 2), failed(12, Some("web"), "exited with code 2", false));
}

#[test]
fn an_empty_generation_commits_after_the_window() {
    let s = state(13, "[rollout]\nstable = \"0s\"\n");
    let t0 = Instant::now();
    let mut t = Trial::begin(&s, Some(&DesiredState::empty()), t0);
    assert_eq!(t.observe(&[], t0), Some(Verdict::Commit { generation: 13 }));
}

#[test]
fn probes_of_an_unchanged_app_are_not_confused_with_restarts() {
    // The counter an app carried from the previous generation is not a restart.
    let s = state(14, &format!("[rollout]\nstable = \"5s\"\n{WEB}"));
    let t0 = Instant::now();
    let mut t = Trial::begin(&s, Some(&DesiredState::empty()), t0);
    let st = AppStatus {
        name: name("web"),
        phase: Phase::Running,
        pid: Some(1),
        restarts: 4,
        last_exit: Some(code(1)),
        live: Health::None,
        ready: Health::None,
        image: "busybox".into(),
        image_digest: None,
        error: None,
    };
    assert_eq!(t.observe(std::slice::from_ref(&st), t0), None);
    assert_eq!(t.observe(std::slice::from_ref(&st), t0 + secs(5)), Some(Verdict::Commit { generation: 14 }));
    let mut t = Trial::begin(&s, Some(&DesiredState::empty()), t0);
    assert_eq!(t.observe(std::slice::from_ref(&st), t0), None);
    let again = AppStatus { restarts: 5, ..st };
    assert_eq!(t.observe(&[again], t0 + secs(1)), failed(14, Some("web"), "exited with code 1", true));
}

fn record(committed: u64, testing: Option<(u64, u32)>, failed: Option<u64>) -> Record {
    Record {
        committed,
        testing,
        failed: failed.map(|g| RolloutFailure {
            generation: g,
            app: None,
            reason: "x".into(),
            rolled_back: true,
        }),
    }
}

#[test]
fn at_start_resumes_a_test_counts_starts_and_gives_up_after_three() {
    // New board or an upgrade: what is stored is trusted.
    assert_eq!(Record::at_start(None, 4, true, false), (AtStart::Run, Some(record(4, None, None))));
    // Committed: nothing to write.
    assert_eq!(Record::at_start(Some(&record(4, None, None)), 4, true, true), (AtStart::Run, None));
    // On test: each start is counted; the third start gives up.
    let r = record(4, Some((5, 0)), None);
    let (what, r) = Record::at_start(Some(&r), 5, true, true);
    assert_eq!((what, r.clone()), (AtStart::Test, Some(record(4, Some((5, 1)), None))));
    let (what, r) = Record::at_start(r.as_ref(), 5, true, true);
    assert_eq!((what, r.clone()), (AtStart::Test, Some(record(4, Some((5, 2)), None))));
    let (what, r) = Record::at_start(r.as_ref(), 5, true, true);
    assert_eq!(what, AtStart::RunGood);
    let r = r.unwrap();
    assert_eq!((r.committed, r.testing), (4, None));
    let f = r.failed.clone().unwrap();
    assert_eq!((f.generation, f.app, f.rolled_back), (5, None, true));
    assert_eq!(f.reason, "the agent started 3 times while this generation was on test");
    // And it stays failed: no ping-pong on the next start.
    assert_eq!(Record::at_start(Some(&r), 5, true, true), (AtStart::RunGood, None));
    // A generation stored while no agent ran goes on test.
    assert_eq!(
        Record::at_start(Some(&record(4, None, Some(5))), 6, true, true),
        (AtStart::Test, Some(record(4, Some((6, 0)), Some(5))))
    );
    // Nothing good on flash to go back to: trusted as it is.
    assert_eq!(
        Record::at_start(Some(&record(4, Some((6, 1)), None)), 6, true, false),
        (AtStart::Run, Some(record(6, None, None)))
    );
    // With rollback off, starts are counted and the test goes on.
    let r = record(4, Some((5, 2)), None);
    assert_eq!(
        Record::at_start(Some(&r), 5, false, true),
        (AtStart::Test, Some(record(4, Some((5, 3)), None)))
    );
    let r = record(4, Some((5, 3)), None);
    assert_eq!(Record::at_start(Some(&r), 5, false, true), (AtStart::Test, None), "nothing to write");
    // A failure that was not rolled back runs on.
    let mut r = record(4, None, Some(5));
    r.failed.as_mut().unwrap().rolled_back = false;
    assert_eq!(Record::at_start(Some(&r), 5, true, true), (AtStart::Run, None));
}

#[test]
fn a_decoded_record_is_checked() {
    assert!(record(4, Some((5, 1)), Some(3)).validate().is_ok());
    assert!(record(4, Some((4, 0)), None).validate().is_err(), "on test and committed at once");
    assert!(record(4, Some((5, MAX_STARTS + 1)), None).validate().is_err());
    assert!(record(MAX_GENERATION + 1, None, None).validate().is_err());
    assert!(record(4, Some((5, 0)), Some(5)).validate().is_err(), "failed and on test at once");
    let mut r = record(4, None, Some(5));
    r.failed.as_mut().unwrap().reason = "x".repeat(REASON_MAX + 1);
    assert!(r.validate().is_err());
}

#[test]
fn a_generation_whose_images_do_not_come_within_the_deadline_fails_naming_the_app() {
    let s = state(
        20,
        "[rollout]\ndeadline = \"5m\"\n[[app]]\nname = \"db\"\nimage = \"db:1\"\n[[app]]\nname = \"web\"\nimage = \"web:2\"\n",
    );
    let t0 = Instant::now();
    let w = PullWait::new(&s, t0);
    let why = "pulling web:2: registry 127.0.0.1:5000: connection refused";
    assert_eq!(w.failed(why, t0 + secs(299)), None);
    assert_eq!(
        w.failed(why, t0 + secs(300)),
        Some(RolloutFailure {
            generation: 20,
            app: Some(name("web")),
            reason: format!("images not pulled within the rollout deadline of 5m: {why}"),
            rolled_back: true,
        })
    );
    let mut off = s.clone();
    off.rollout.rollback = false;
    assert_eq!(PullWait::new(&off, t0).failed(why, t0 + secs(3600)), None, "tried until its images come");
}

#[test]
fn only_the_apps_the_generation_adds_or_changes_are_judged() {
    // crashy crash-loops in the good generation already and is not changed.
    let crashy = "[[app]]\nname = \"crashy\"\nimage = \"busybox\"\ncommand = [\"false\"]\n";
    let good = state(1, crashy);
    let next = state(2, &format!("[rollout]\nstable = \"5s\"\n{crashy}{WEB}"));
    let t0 = Instant::now();
    let mut t = Trial::begin(&next, Some(&good), t0);
    let st = |name: &str, phase: Phase, restarts: u32| AppStatus {
        name: AppName::try_from(name).unwrap(),
        phase,
        pid: Some(1),
        restarts,
        last_exit: Some(code(1)),
        live: Health::None,
        ready: Health::None,
        image: "busybox".into(),
        image_digest: None,
        error: None,
    };
    assert_eq!(t.observe(&[st("crashy", Phase::Backoff, 7), st("web", Phase::Running, 0)], t0), None);
    assert_eq!(
        t.observe(&[st("crashy", Phase::Backoff, 9), st("web", Phase::Running, 0)], t0 + secs(5)),
        Some(Verdict::Commit { generation: 2 })
    );
    // The same app changed by the generation is judged.
    let next = state(3, &format!("{}{WEB}", crashy.replace("false", "true")));
    let mut t = Trial::begin(&next, Some(&good), t0);
    assert_eq!(
        t.observe(&[st("crashy", Phase::Backoff, 1), st("web", Phase::Running, 0)], t0),
        failed(3, Some("crashy"), "exited with code 1", true)
    );
}
