//! The daemon loop on in-memory ports: no root, no containers, no registry.
//! Each test asserts what the loop carried out (starts, stops, writes, pulls,
//! answers to the link), never how long it took.

use super::*;
use crate::link::Incoming;
use skiff_common::{toml_file, AppSpec, ExitInfo, Probe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

type Key = (AppName, u64);

#[derive(Default)]
struct Record {
    /// Every start: app, instance, image.
    starts: Vec<(AppName, u64, String)>,
    stops: Vec<Key>,
    removed: Vec<AppName>,
    /// Running containers: their image, and how to end them.
    running: HashMap<Key, (String, oneshot::Sender<ExitInfo>)>,
}

#[derive(Default)]
struct FakeContainers {
    /// What `scan` finds: containers a previous agent left running.
    left: Mutex<Vec<(AppSpec, u64)>>,
    rec: Arc<Mutex<Record>>,
    /// Creations under way now, and the most seen at once.
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    /// How long creating a container takes.
    start_delay: Mutex<Duration>,
    /// `stop` hangs the caller (the loop) this long: a wedged loop.
    hang_in_stop: Mutex<Duration>,
    /// Read when the hang begins and ends (watchdog pings received so far).
    hang_probe: Mutex<Option<Arc<dyn Fn() -> usize + Send + Sync>>>,
    hang_seen: Mutex<Option<(usize, usize)>>,
    /// Stops are recorded but containers do not exit (a long stop grace).
    slow_stops: Mutex<bool>,
}

impl FakeContainers {
    fn rec(&self) -> std::sync::MutexGuard<'_, Record> {
        self.rec.lock().unwrap()
    }
}

impl Containers for FakeContainers {
    fn scan(&self) -> Vec<crate::runtime::Found> {
        let started = crate::runtime::instance::Started {
            init_pid: 7,
            shim_pid: 6,
            shim_start_ticks: 1,
            started_boot_ms: 0,
        };
        self.left
            .lock()
            .unwrap()
            .iter()
            .map(|(spec, instance)| crate::runtime::Found {
                app: spec.name.clone(),
                instance: *instance,
                spec: spec.clone(),
                image_digest: "sha256:left".into(),
                state: crate::runtime::FoundState::Running(started),
            })
            .collect()
    }

    fn start(&self, spec: AppSpec, instance: u64) -> BoxFut<Result<Running, String>> {
        let (tx, rx) = oneshot::channel();
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(n, Ordering::SeqCst);
        {
            let mut r = self.rec();
            r.starts.push((spec.name.clone(), instance, spec.image.to_string()));
            r.running.insert((spec.name.clone(), instance), (spec.image.to_string(), tx));
        }
        let in_flight = self.in_flight.clone();
        let delay = *self.start_delay.lock().unwrap();
        Box::pin(async move {
            // Creating a container takes a while; others queue meanwhile.
            tokio::time::sleep(Duration::from_millis(5).max(delay)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(Running {
                pid: 100,
                digest: "sha256:fake".into(),
                exit: Box::pin(async move {
                    rx.await.unwrap_or(ExitInfo { code: None, signal: Some(9), oom_killed: false })
                }),
            })
        })
    }

    fn watch(&self, app: AppName, instance: u64, _: crate::runtime::instance::Started) -> BoxFut<ExitInfo> {
        let (tx, rx) = oneshot::channel();
        let image =
            self.left.lock().unwrap().iter().find(|(s, _)| s.name == app).map(|(s, _)| s.image.to_string());
        self.rec().running.insert((app, instance), (image.unwrap_or_default(), tx));
        Box::pin(
            async move { rx.await.unwrap_or(ExitInfo { code: None, signal: Some(9), oom_killed: false }) },
        )
    }

    fn stop(&self, app: AppName, instance: u64, _: Duration) -> BoxFut<()> {
        let hang = *self.hang_in_stop.lock().unwrap();
        if !hang.is_zero() {
            let probe = self.hang_probe.lock().unwrap().clone().expect("a hang probe");
            let before = probe();
            std::thread::sleep(hang);
            *self.hang_seen.lock().unwrap() = Some((before, probe()));
        }
        let mut r = self.rec();
        r.stops.push((app.clone(), instance));
        if *self.slow_stops.lock().unwrap() {
            return Box::pin(async {});
        }
        if let Some((_, tx)) = r.running.remove(&(app, instance)) {
            let _ = tx.send(ExitInfo { code: None, signal: Some(15), oom_killed: false });
        }
        Box::pin(async {})
    }

    fn probe(&self, _: AppName, _: u64, _: Probe) -> BoxFut<(bool, String)> {
        Box::pin(async { (true, String::new()) })
    }

    fn reap_lost(&self, _: AppName, _: u64) -> BoxFut<()> {
        Box::pin(async {})
    }

    fn forget(&self, _: &AppName, _: u64) {}

    fn remove_app(&self, app: &AppName) {
        self.rec().removed.push(app.clone());
    }

    fn images_in_use(&self) -> BTreeSet<ImageRef> {
        self.rec().running.values().map(|(image, _)| img(image)).collect()
    }
}

/// The state file in memory.
struct FakeStates {
    current: Mutex<DesiredState>,
    saves: Mutex<Vec<u64>>,
    fail_saves: Mutex<Option<String>>,
    /// A slow SD card: each save takes this long (blocking).
    slow_saves: Mutex<Duration>,
    path: PathBuf,
    /// `rollout.skf` and `good.skf`.
    record: Mutex<Option<crate::rollout::Record>>,
    good: Mutex<Option<DesiredState>>,
}

impl States for FakeStates {
    fn load(&self) -> Result<(DesiredState, Option<String>), String> {
        Ok((self.current.lock().unwrap().clone(), None))
    }

    fn save(&self, state: DesiredState) -> Result<(), String> {
        if let Some(e) = self.fail_saves.lock().unwrap().clone() {
            return Err(e);
        }
        let slow = *self.slow_saves.lock().unwrap();
        std::thread::sleep(slow);
        self.saves.lock().unwrap().push(state.generation);
        *self.current.lock().unwrap() = state;
        Ok(())
    }

    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn load_rollout(&self) -> crate::store::RolloutFiles {
        crate::store::RolloutFiles {
            record: self.record.lock().unwrap().clone(),
            good: self.good.lock().unwrap().clone(),
            problems: Vec::new(),
        }
    }

    fn save_record(&self, record: &crate::rollout::Record) -> Result<(), String> {
        *self.record.lock().unwrap() = Some(record.clone());
        Ok(())
    }

    fn commit(&self, state: &DesiredState, record: &crate::rollout::Record) -> Result<(), String> {
        *self.good.lock().unwrap() = Some(state.clone());
        self.save_record(record)
    }
}

/// A store with `present` images; each pull waits until the test lets it end.
#[derive(Default)]
struct FakeImages {
    present: Mutex<BTreeSet<ImageRef>>,
    pulls: Mutex<Vec<String>>,
    gates: Mutex<HashMap<String, oneshot::Sender<Result<(), String>>>>,
    collected: Mutex<Vec<BTreeSet<ImageRef>>>,
}

impl Images for Arc<FakeImages> {
    fn present(&self, images: &[ImageRef]) -> BTreeSet<ImageRef> {
        let p = self.present.lock().unwrap();
        images.iter().filter(|i| p.contains(i)).cloned().collect()
    }

    fn pull(&self, image: ImageRef, progress: Progress) -> BoxFut<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        self.pulls.lock().unwrap().push(image.to_string());
        self.gates.lock().unwrap().insert(image.to_string(), tx);
        let me = self.clone();
        Box::pin(async move {
            progress(512, 1024);
            let r = rx.await.unwrap_or_else(|_| Err("test ended".into()));
            if r.is_ok() {
                me.present.lock().unwrap().insert(image);
            }
            r
        })
    }

    fn collect(&self, keep: &BTreeSet<ImageRef>) {
        self.collected.lock().unwrap().push(keep.clone());
    }
}

struct Harness {
    containers: Arc<FakeContainers>,
    states: Arc<FakeStates>,
    images: Arc<FakeImages>,
    link: mpsc::Sender<Incoming>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn state(generation: u64, origin: Origin, apps: &[(&str, &str)]) -> DesiredState {
    let mut text = String::new();
    for (name, image) in apps {
        text.push_str(&format!(
            "[[app]]\nname = \"{name}\"\nimage = \"{image}\"\ncommand = [\"sleep\", \"9\"]\n"
        ));
    }
    let mut s = toml_file::parse(&text).unwrap();
    s.generation = generation;
    s.origin = origin;
    s
}

fn img(s: &str) -> ImageRef {
    ImageRef::try_from(s).unwrap()
}

fn name(s: &str) -> AppName {
    AppName::try_from(s).unwrap()
}

impl Harness {
    fn start(initial: DesiredState, present: &[&str]) -> Harness {
        Harness::start_with(Ok((initial, None)), Vec::new(), present, None)
    }

    /// Starts with rollout files set up by `before` on the fake store.
    fn start_on_flash(initial: DesiredState, present: &[&str], before: impl FnOnce(&FakeStates)) -> Harness {
        Harness::start_full(Ok((initial, None)), Vec::new(), present, None, before)
    }

    fn start_with(
        initial: Result<(DesiredState, Option<String>), String>,
        left: Vec<(AppSpec, u64)>,
        present: &[&str],
        notify: Option<crate::sdnotify::Notifier>,
    ) -> Harness {
        Harness::start_full(initial, left, present, notify, |_| {})
    }

    fn start_full(
        initial: Result<(DesiredState, Option<String>), String>,
        left: Vec<(AppSpec, u64)>,
        present: &[&str],
        notify: Option<crate::sdnotify::Notifier>,
        before: impl FnOnce(&FakeStates),
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("skiff.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let containers = Arc::new(FakeContainers { left: Mutex::new(left), ..Default::default() });
        let states = Arc::new(FakeStates {
            current: Mutex::new(initial.clone().map(|s| s.0).unwrap_or_else(|_| DesiredState::empty())),
            saves: Mutex::default(),
            fail_saves: Mutex::default(),
            slow_saves: Mutex::default(),
            path: dir.path().join("desired.skf"),
            record: Mutex::default(),
            good: Mutex::default(),
        });
        before(&states);
        let images = Arc::new(FakeImages::default());
        images.present.lock().unwrap().extend(present.iter().map(|s| img(s)));
        let (link, incoming) = mpsc::channel(4);
        let parts = Parts {
            containers: containers.clone(),
            states: states.clone(),
            images: Arc::new(images.clone()),
            backoff: BackoffConfig::default(),
            listener,
            usage: None,
            link: None,
            incoming: Some(incoming),
            initial,
            notify,
            headroom: None,
            rollout: states.load_rollout(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with(parts, async move {
            let _ = stopped.await;
        }));
        Harness { containers, states, images, link, socket, _dir: dir, stop: Some(stop), task }
    }

    async fn ps(&self) -> PsReply {
        match api::call(&self.socket, &Request::Ps).await.unwrap() {
            Response::Ps(p) => *p,
            other => panic!("{other:?}"),
        }
    }

    /// Waits (up to 10 s) until `f` holds.
    async fn until(&self, what: &str, f: impl Fn(&Harness) -> bool) {
        for _ in 0..1000 {
            if f(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    async fn offer(&self, s: DesiredState) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        self.link.send(Incoming::Desired { state: s, persisted: tx }).await.unwrap();
        rx
    }

    fn release(&self, image: &str, result: Result<(), String>) {
        let gate = self.images.gates.lock().unwrap().remove(image).expect("a pull waiting");
        gate.send(result).unwrap();
    }

    fn running(&self) -> Vec<(String, String)> {
        let r = self.containers.rec();
        let mut v: Vec<(String, String)> =
            r.running.iter().map(|((a, _), (image, _))| (a.to_string(), image.clone())).collect();
        v.sort();
        v
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_start_storm_goes_through_in_bounded_waves_and_the_api_answers_meanwhile() {
    let apps: Vec<(String, String)> =
        (0..60).map(|i| (format!("app-{i:03}"), "busybox:1".to_string())).collect();
    let refs: Vec<(&str, &str)> = apps.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let h = Harness::start(state(1, Origin::Local, &refs), &["busybox:1"]);
    // The API answers while the storm is on.
    let ps = h.ps().await;
    assert_eq!(ps.apps.len(), 60);
    h.until("every app running", |h| h.containers.rec().running.len() == 60).await;
    assert_eq!(h.containers.max_in_flight.load(Ordering::SeqCst), START_CONCURRENCY);
    h.shutdown().await;
}

#[tokio::test]
async fn a_new_image_is_pulled_before_the_old_container_stops() {
    let h = Harness::start(state(1, Origin::Local, &[("web", "web:1"), ("db", "db:1")]), &["web:1", "db:1"]);
    h.until("both apps running", |h| h.running().len() == 2).await;

    let answer = h.offer(state(10, Origin::Controller, &[("web", "web:2"), ("db", "db:1")])).await;
    h.until("the pull started", |h| h.images.pulls.lock().unwrap().len() == 1).await;
    assert_eq!(*h.images.pulls.lock().unwrap(), vec!["web:2"]);
    // While it pulls: nothing written, nothing stopped, progress in ps.
    let mut ps = h.ps().await;
    for _ in 0..500 {
        if !ps.pulls.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        ps = h.ps().await;
    }
    assert_eq!(ps.generation, 1);
    assert_eq!(ps.pulls.len(), 1, "{:?}", ps.pulls);
    assert_eq!((ps.pulls[0].image.as_str(), ps.pulls[0].done, ps.pulls[0].total), ("web:2", 512, 1024));
    assert!(h.states.saves.lock().unwrap().is_empty());
    assert!(h.containers.rec().stops.is_empty());

    h.release("web:2", Ok(()));
    assert_eq!(answer.await.unwrap(), Ok(()));
    assert_eq!(*h.states.saves.lock().unwrap(), vec![10], "persisted before the answer");
    h.until("web replaced", |h| {
        h.running() == [("db".into(), "db:1".into()), ("web".into(), "web:2".into())]
    })
    .await;
    assert_eq!(h.containers.rec().stops, vec![(name("web"), 1)], "db kept running");
    assert!(h.ps().await.pulls.is_empty());
    // The old generation's images are kept, nothing else is named.
    h.until("collection", |h| !h.images.collected.lock().unwrap().is_empty()).await;
    let keep = h.images.collected.lock().unwrap().last().unwrap().clone();
    assert_eq!(keep, [img("db:1"), img("web:1"), img("web:2")].into_iter().collect());
    h.shutdown().await;
}

#[tokio::test]
async fn a_failed_pull_stops_nothing_is_answered_and_shown() {
    let h = Harness::start(state(1, Origin::Local, &[("web", "web:1")]), &["web:1"]);
    h.until("web running", |h| h.running().len() == 1).await;
    let answer = h.offer(state(10, Origin::Controller, &[("web", "web:2")])).await;
    h.until("the pull started", |h| h.images.gates.lock().unwrap().contains_key("web:2")).await;
    h.release("web:2", Err("registry 127.0.0.1:5000: connection refused".into()));
    let got = answer.await.unwrap();
    assert_eq!(got, Err("pulling web:2: registry 127.0.0.1:5000: connection refused".into()));
    let ps = h.ps().await;
    assert_eq!(ps.generation, 1);
    assert_eq!(ps.pulls[0].error.as_deref(), Some("registry 127.0.0.1:5000: connection refused"));
    assert!(h.states.saves.lock().unwrap().is_empty());
    assert!(h.containers.rec().stops.is_empty());
    assert_eq!(h.running(), [("web".into(), "web:1".into())]);
    // The link offers it again later: the pull is tried again.
    let answer = h.offer(state(10, Origin::Controller, &[("web", "web:2")])).await;
    h.until("a second pull", |h| h.images.gates.lock().unwrap().contains_key("web:2")).await;
    h.release("web:2", Ok(()));
    assert_eq!(answer.await.unwrap(), Ok(()));
    h.shutdown().await;
}

#[tokio::test]
async fn a_failed_write_is_not_acknowledged_and_changes_nothing() {
    let h = Harness::start(state(1, Origin::Local, &[("web", "web:1")]), &["web:1", "web:2"]);
    h.until("web running", |h| h.running().len() == 1).await;
    *h.states.fail_saves.lock().unwrap() = Some("No space left on device".into());
    let answer = h.offer(state(10, Origin::Controller, &[("web", "web:2")])).await;
    assert_eq!(answer.await.unwrap(), Err("No space left on device".into()));
    assert!(h.containers.rec().stops.is_empty());
    assert_eq!(h.ps().await.generation, 1);
    h.shutdown().await;
}

#[tokio::test]
async fn a_removed_app_is_stopped_and_its_files_removed() {
    let h = Harness::start(state(1, Origin::Local, &[("web", "web:1"), ("old", "web:1")]), &["web:1"]);
    h.until("both running", |h| h.running().len() == 2).await;
    *h.states.current.lock().unwrap() = state(2, Origin::Local, &[("web", "web:1")]);
    match api::call(&h.socket, &Request::Reload).await.unwrap() {
        Response::Reloaded { generation } => assert_eq!(generation, 2),
        other => panic!("{other:?}"),
    }
    h.until("old removed", |h| h.containers.rec().removed == [name("old")]).await;
    assert_eq!(h.containers.rec().stops, vec![(name("old"), 1)]);
    assert_eq!(h.running(), [("web".into(), "web:1".into())]);
    h.shutdown().await;
}

#[tokio::test]
async fn an_unreadable_state_at_start_keeps_what_runs_until_a_new_state_comes() {
    let left = state(3, Origin::Local, &[("web", "web:1")]).apps.remove(0);
    let h = Harness::start_with(
        Err("desired.skf: CRC mismatch".into()),
        vec![(left, 4)],
        &["web:1", "web:2"],
        None,
    );
    let mut ps = h.ps().await;
    for _ in 0..500 {
        if !ps.apps.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        ps = h.ps().await;
    }
    assert_eq!(ps.generation, 0);
    assert_eq!(ps.apps.len(), 1, "the adopted app is kept: {:?}", ps.apps);
    // Nothing was stopped or started meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.containers.rec().stops.is_empty());
    assert!(h.containers.rec().starts.is_empty());
    // The controller can still take the board over.
    let answer = h.offer(state(10, Origin::Controller, &[("web", "web:2")])).await;
    assert_eq!(answer.await.unwrap(), Ok(()));
    h.until("web:2 running", |h| h.running() == [("web".into(), "web:2".into())]).await;
    assert_eq!(h.containers.rec().stops, vec![(name("web"), 4)]);
    h.shutdown().await;
}

#[tokio::test]
async fn a_slow_flash_write_does_not_stall_the_loop() {
    let h = Harness::start(state(1, Origin::Local, &[("web", "web:1")]), &["web:1", "web:2"]);
    h.until("web running", |h| h.running().len() == 1).await;
    *h.states.slow_saves.lock().unwrap() = Duration::from_secs(3);
    let answer = h.offer(state(10, Origin::Controller, &[("web", "web:2")])).await;
    // The write is under way for 3 s; the API answers meanwhile, from the loop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ps =
        tokio::time::timeout(Duration::from_secs(2), h.ps()).await.expect("ps answered while flash was busy");
    assert_eq!(ps.generation, 1, "not applied before it is on flash");
    assert_eq!(answer.await.unwrap(), Ok(()));
    h.until("web:2 running", |h| h.running() == [("web".into(), "web:2".into())]).await;
    h.shutdown().await;
}

/// systemd's side of the notify socket: every datagram, in order.
struct Systemd {
    got: Arc<Mutex<Vec<String>>>,
    pings: Arc<AtomicUsize>,
}

impl Systemd {
    fn listen(dir: &std::path::Path) -> (Systemd, PathBuf) {
        let path = dir.join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let got: Arc<Mutex<Vec<String>>> = Arc::default();
        let pings = Arc::new(AtomicUsize::new(0));
        let (g, p) = (got.clone(), pings.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg == "WATCHDOG=1" {
                    p.fetch_add(1, Ordering::SeqCst);
                }
                g.lock().unwrap().push(msg);
            }
        });
        (Systemd { got, pings }, path)
    }

    fn ready(&self) -> Option<String> {
        self.got.lock().unwrap().iter().find(|m| m.starts_with("READY=1")).cloned()
    }
}

#[tokio::test]
async fn systemd_hears_ready_once_the_apps_are_created_and_pings_come_from_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let (systemd, path) = Systemd::listen(dir.path());
    let every = Duration::from_millis(40);
    let notify = crate::sdnotify::Notifier::new(path.to_str().unwrap(), Some(every * 2)).unwrap();
    let apps = [("a", "busybox:1"), ("b", "busybox:1"), ("c", "busybox:1")];
    // Starting one app takes 300 ms (more than a watchdog period): READY waits for all.
    let h = {
        let h = Harness::start_with(
            Ok((state(5, Origin::Local, &apps), None)),
            Vec::new(),
            &["busybox:1"],
            Some(notify),
        );
        *h.containers.start_delay.lock().unwrap() = Duration::from_millis(300);
        h
    };
    h.until("READY", |_| systemd.ready().is_some()).await;
    assert_eq!(systemd.ready().unwrap(), "READY=1\nSTATUS=generation 5: 3/3 apps running");

    // Pings keep coming while the loop turns...
    let seen = systemd.pings.load(Ordering::SeqCst);
    h.until("more pings", |_| systemd.pings.load(Ordering::SeqCst) >= seen + 3).await;
    // ...and stop while it hangs: a stop that blocks the loop for 25 periods
    // lets at most the ping already in flight through.
    let pings = systemd.pings.clone();
    *h.containers.hang_probe.lock().unwrap() = Some(Arc::new(move || pings.load(Ordering::SeqCst)));
    *h.containers.hang_in_stop.lock().unwrap() = every * 25;
    let _answer = h.offer(state(6, Origin::Controller, &apps[..2])).await;
    h.until("the hang over", |h| h.containers.hang_seen.lock().unwrap().is_some()).await;
    let (before, after) = h.containers.hang_seen.lock().unwrap().unwrap();
    assert!(after <= before + 1, "{} pings while the loop hung", after - before);
    h.until("pings again", |_| systemd.pings.load(Ordering::SeqCst) >= after + 2).await;
    h.shutdown().await;
    // The listener thread may not have read the last datagram yet.
    for _ in 0..500 {
        if systemd.got.lock().unwrap().iter().any(|m| m == "STOPPING=1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let got = systemd.got.lock().unwrap().clone();
    assert_eq!(got.iter().filter(|m| m.starts_with("READY")).count(), 1, "READY once");
    assert_eq!(got.last().map(String::as_str), Some("STOPPING=1"));
}

#[tokio::test]
async fn collection_keeps_the_image_of_a_container_still_stopping() {
    let h = Harness::start(state(1, Origin::Local, &[("web", "web:1")]), &["web:1", "web:2", "web:3"]);
    h.until("web:1 running", |h| h.running() == [("web".into(), "web:1".into())]).await;
    // web:1 takes its time to stop while two newer states come.
    *h.containers.slow_stops.lock().unwrap() = true;
    let _v2 = h.offer(state(10, Origin::Controller, &[("web", "web:2")])).await;
    h.until("web:1 asked to stop", |h| !h.containers.rec().stops.is_empty()).await;
    let _v3 = h.offer(state(11, Origin::Controller, &[("web", "web:3")])).await;
    h.until("two collections", |h| h.images.collected.lock().unwrap().len() == 2).await;
    let keep = h.images.collected.lock().unwrap()[1].clone();
    // The states say web:2 (previous) and web:3 (current); web:1 still runs.
    assert_eq!(keep, [img("web:1"), img("web:2"), img("web:3")].into_iter().collect());
    h.shutdown().await;
}

fn stable(mut s: DesiredState, ms: u64) -> DesiredState {
    s.rollout.stable = Duration::from_millis(ms);
    s
}

impl Harness {
    /// The running container of `app` exits with `code`.
    fn crash(&self, app: &str, code: i32) {
        let mut r = self.containers.rec();
        let key = r.running.keys().find(|(a, _)| a.as_str() == app).cloned().expect("app running");
        let (_, tx) = r.running.remove(&key).unwrap();
        let _ = tx.send(ExitInfo { code: Some(code), signal: None, oom_killed: false });
    }

    fn record(&self) -> crate::rollout::Record {
        self.states.record.lock().unwrap().clone().unwrap_or_default()
    }

    fn good(&self) -> Option<u64> {
        self.states.good.lock().unwrap().as_ref().map(|s| s.generation)
    }
}

#[tokio::test]
async fn a_generation_that_fails_its_test_is_rolled_back_and_a_healthy_one_is_committed() {
    let images = ["web:1", "web:2", "web:3"];
    let h = Harness::start(state(1, Origin::Local, &[("web", "web:1")]), &images);
    h.until("web:1 running", |h| h.running() == [("web".into(), "web:1".into())]).await;
    // The first state of a board has nothing to go back to: trusted at once.
    h.until("generation 1 committed", |h| h.good() == Some(1) && h.record().committed == 1).await;

    let _answer = h.offer(state(2, Origin::Controller, &[("web", "web:2")])).await;
    h.until("web:2 running", |h| h.running() == [("web".into(), "web:2".into())]).await;
    let ps = h.ps().await;
    assert_eq!(ps.rollout.as_ref().map(|r| (r.committed, r.testing)), Some((1, Some(2))));
    h.until("the test on flash", |h| h.record().testing == Some((2, 0))).await;

    h.crash("web", 1);
    h.until("web:1 back", |h| h.running() == [("web".into(), "web:1".into())]).await;
    h.until("the failure on flash", |h| h.record().failed.is_some()).await;
    let failed = skiff_common::RolloutFailure {
        generation: 2,
        app: Some(name("web")),
        reason: "exited with code 1".into(),
        rolled_back: true,
    };
    assert_eq!(
        h.record(),
        crate::rollout::Record { committed: 1, testing: None, failed: Some(failed.clone()) }
    );
    let ps = h.ps().await;
    assert_eq!(ps.generation, 1, "ps shows the generation that runs");
    assert_eq!(ps.rollout.unwrap().failed, Some(failed));
    assert_eq!(h.good(), Some(1));
    // Only 2 then 1's web were started after the crash: no retry of 2.
    let starts: Vec<String> = h.containers.rec().starts.iter().map(|(_, _, i)| i.clone()).collect();
    assert_eq!(starts, ["web:1", "web:2", "web:1"]);

    // A newer generation is tried, passes its (short) window and is committed.
    let _answer = h.offer(stable(state(3, Origin::Controller, &[("web", "web:3")]), 200)).await;
    h.until("generation 3 committed", |h| h.good() == Some(3) && h.record().committed == 3).await;
    assert_eq!(h.running(), [("web".into(), "web:3".into())]);
    let r = h.record();
    assert_eq!((r.committed, r.testing), (3, None));
    h.shutdown().await;
}

#[tokio::test]
async fn a_failed_generation_is_not_run_again_at_start_and_a_test_resumes_until_three_starts() {
    // As a restarted agent finds the files: generation 2 failed and was rolled back.
    let failed = skiff_common::RolloutFailure {
        generation: 2,
        app: Some(name("web")),
        reason: "exited with code 1".into(),
        rolled_back: true,
    };
    let on_flash = |s: &FakeStates, record: crate::rollout::Record| {
        *s.record.lock().unwrap() = Some(record);
        *s.good.lock().unwrap() = Some(state(1, Origin::Local, &[("web", "web:1")]));
    };
    let h = Harness::start_on_flash(
        state(2, Origin::Controller, &[("web", "web:2")]),
        &["web:1", "web:2"],
        |h| on_flash(h, crate::rollout::Record { committed: 1, testing: None, failed: Some(failed.clone()) }),
    );
    h.until("web:1 running", |h| h.running() == [("web".into(), "web:1".into())]).await;
    assert_eq!(h.containers.rec().starts.len(), 1, "generation 2 not tried");
    h.shutdown().await;

    // Generation 2 on test, second start: it resumes.
    let h = Harness::start_on_flash(
        state(2, Origin::Controller, &[("web", "web:2")]),
        &["web:1", "web:2"],
        |h| on_flash(h, crate::rollout::Record { committed: 1, testing: Some((2, 1)), failed: None }),
    );
    h.until("web:2 running", |h| h.running() == [("web".into(), "web:2".into())]).await;
    h.until("the second start on flash", |h| h.record().testing == Some((2, 2))).await;
    h.shutdown().await;

    // Third start while on test: back to the last good one, and said why.
    let h = Harness::start_on_flash(
        state(2, Origin::Controller, &[("web", "web:2")]),
        &["web:1", "web:2"],
        |h| on_flash(h, crate::rollout::Record { committed: 1, testing: Some((2, 2)), failed: None }),
    );
    h.until("web:1 running", |h| h.running() == [("web".into(), "web:1".into())]).await;
    h.until("the failure on flash", |h| h.record().failed.is_some()).await;
    let r = h.record();
    assert_eq!((r.committed, r.testing), (1, None));
    let f = r.failed.unwrap();
    assert_eq!((f.generation, f.rolled_back), (2, true));
    assert!(f.reason.contains("started 3 times"), "{}", f.reason);
    h.shutdown().await;
}

#[tokio::test]
async fn a_generation_whose_image_does_not_come_within_the_deadline_is_given_up_once() {
    let h = Harness::start(state(1, Origin::Local, &[("web", "web:1")]), &["web:1"]);
    h.until("web:1 running", |h| h.running() == [("web".into(), "web:1".into())]).await;
    let mut two = state(2, Origin::Controller, &[("web", "web:2")]);
    two.rollout.stable = Duration::ZERO;
    two.rollout.deadline = Duration::from_millis(300);
    let why = "registry 127.0.0.1:5000: connection refused";
    // A failed pull within the deadline: not taken, the link offers it again later.
    let answer = h.offer(two.clone()).await;
    h.until("the pull", |h| h.images.gates.lock().unwrap().contains_key("web:2")).await;
    h.release("web:2", Err(why.into()));
    assert_eq!(answer.await.unwrap(), Err(format!("pulling web:2: {why}")));
    assert!(h.record().failed.is_none());
    tokio::time::sleep(Duration::from_millis(350)).await;
    // Past the deadline: given up, reported, and taken so the link stops offering it.
    let answer = h.offer(two.clone()).await;
    h.until("the pull", |h| h.images.gates.lock().unwrap().contains_key("web:2")).await;
    h.release("web:2", Err(why.into()));
    assert_eq!(answer.await.unwrap(), Ok(()));
    h.until("the failure on flash", |h| h.record().failed.is_some()).await;
    let f = h.record().failed.unwrap();
    assert_eq!((f.generation, f.app.clone(), f.rolled_back), (2, Some(name("web")), true));
    assert_eq!(
        f.reason,
        format!("images not pulled within the rollout deadline of 300ms: pulling web:2: {why}")
    );
    assert_eq!(h.ps().await.rollout.unwrap().failed, Some(f));
    // Offered again (a reconnect): not pulled again.
    let answer = h.offer(two).await;
    assert_eq!(answer.await.unwrap(), Ok(()));
    assert_eq!(*h.images.pulls.lock().unwrap(), ["web:2", "web:2"]);
    assert_eq!(h.running(), [("web".into(), "web:1".into())]);
    assert!(h.states.saves.lock().unwrap().is_empty(), "never persisted");
    h.shutdown().await;
}
