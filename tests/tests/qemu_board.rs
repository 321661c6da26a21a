//! Tests on an emulated aarch64 board ([`skiff_tests::board`]): qemu-system-aarch64 with
//! Debian's arm64 kernel, a busybox initramfs and the static aarch64 `skiff` from
//! cross/build.sh. Each test boots the board with a shell script, reads what the script
//! printed on the console (QEMU exits 0 even on a guest panic, so every test looks for the
//! lines it expects) and asserts what a user of the board would check:
//!
//! - the board runs skiff and has what containers need (`board_smoke`);
//! - on cgroup v2, a memory limit ends in an OOM kill that `skiff ps` reports as such, a CPU
//!   quota of 0.5 holds, a crashing app is restarted, a failing liveness probe restarts its
//!   app (`board_containers_on_cgroup_v2`);
//! - on cgroup v1 with cpu,cpuacct co-mounted (older systemd boards), the same limits hold
//!   (`board_containers_on_cgroup_v1_comounted`);
//! - with no memory controller, `skiff agent` refuses with exit code 3 and one line naming
//!   the fix (`board_agent_refuses_without_memory_controller`);
//! - power cut at random moments of `skiff apply`, 20 times: every following boot, with no
//!   network, finds the old or the new desired state intact and brings all its apps back
//!   (`board_power_cuts_during_apply`);
//! - a guest that hangs is killed at the timeout (`board_hung_guest_times_out`);
//! - the security settings and network defaults hold inside containers on the board:
//!   `user`, a read-only root, `cap_add`/`cap_drop` in CapBnd, no raw or packet socket on
//!   the host network unless CAP_NET_RAW is added, loopback up with `network = "none"`,
//!   /proc/interrupts masked (`board_confinement`).
//! - the default seccomp profile confines aarch64 and armhf (compat) programs alike, and
//!   armhf programs keep working under it (`board_seccomp_for_aarch64_and_armhf_programs`).
//!
//! They run as root and need apt (the scripts install QEMU and fetch the kernel). Boots are
//! serialized, one board at a time.

use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::Value;
use skiff_tests::board::{self, Disk, Ending, GuestOutput, GuestRun, PowerCut, GUEST_LIB};
use std::collections::BTreeMap;
use std::time::Duration;

/// `[GUEST_LIB, script]`, with each `(placeholder, value)` replaced in the script.
fn guest_script(script: &str, values: &[(&str, &str)]) -> String {
    let script = values.iter().fold(script.to_string(), |s, (k, v)| s.replace(k, v));
    [GUEST_LIB, &script].concat()
}

/// The app `name` in a `skiff ps --json` document.
fn app<'a>(ps: &'a Value, name: &str) -> &'a Value {
    ps["apps"]
        .as_array()
        .and_then(|apps| apps.iter().find(|a| a["name"] == name))
        .unwrap_or_else(|| panic!("no app {name} in skiff ps: {ps}"))
}

/// Cores used from a `CPU: <cpu µs> <uptime before> <uptime after>` line.
fn cores(out: &GuestOutput) -> f64 {
    let v: Vec<f64> =
        out.expect_value("CPU: ").split_whitespace().map(|x| x.parse().expect("CPU: numbers")).collect();
    assert_eq!(v.len(), 3, "CPU: line: {v:?}");
    let wall = v[2] - v[1];
    assert!(wall >= 2.0, "measured over {wall} s only");
    v[0] / 1e6 / wall
}

/// The board boots, runs the static aarch64 skiff, and has what containers need:
/// cgroup2 with the cpu, memory and pids controllers, and overlayfs.
#[test]
fn board_smoke() {
    let script = r#"
set -eu
echo "SMOKE-ARCH: $(uname -m)"
if v=$(skiff --version 2>&1); then :; else
    echo "skiff --version failed: $v"
    v=$(skiff --help 2>&1 | head -n 1)
fi
echo "SMOKE-SKIFF: $v"

ctl=" $(cat /sys/fs/cgroup/cgroup.subtree_control) "
echo "SMOKE-CGROUP: $ctl"
for c in cpu memory pids; do
    case "$ctl" in *" $c "*) ;; *) echo "cgroup controller $c not enabled"; exit 1 ;; esac
done
mkdir /sys/fs/cgroup/smoke
for f in cpu.max memory.max pids.max; do test -f "/sys/fs/cgroup/smoke/$f"; done
rmdir /sys/fs/cgroup/smoke

o=/tmp/overlay
mkdir -p $o/lower $o/upper $o/work $o/merged
echo lower > $o/lower/f
mount -t overlay overlay -o lowerdir=$o/lower,upperdir=$o/upper,workdir=$o/work $o/merged
test "$(cat $o/merged/f)" = lower
echo upper > $o/merged/g
test -f $o/upper/g
umount $o/merged
echo "SMOKE-OVERLAY: ok"

rc=0
skiff doctor || rc=$?
echo "SMOKE-DOCTOR: rc=$rc"
echo SMOKE-OK
"#;
    let out = board::run_guest(script, None, Duration::from_secs(60));
    out.assert_success();
    assert!(out.has_line("SMOKE-OK"), "{}", out.transcript());
    assert_eq!(out.expect_value("SMOKE-ARCH: "), "aarch64");
    let version = out.expect_value("SMOKE-SKIFF: ");
    assert!(version.contains("skiff"), "skiff did not run: {version:?}\n{}", out.transcript());
    assert_eq!(out.expect_value("SMOKE-OVERLAY: "), "ok");
    assert_eq!(out.expect_value("SMOKE-DOCTOR: "), "rc=0", "{}", out.transcript());
    println!(
        "boot-to-/init: {:?} from QEMU start (guest uptime {:?} s); whole run {:?}",
        out.boot_to_init, out.init_uptime, out.elapsed
    );
}

const V2_APPS: &str = r#"
[[app]]
name = "hog"
image = "busybox:1"
command = ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]
restart = "never"
[app.resources]
memory = "32Mi"

[[app]]
name = "spin"
image = "busybox:1"
command = ["sh", "-c", "while :; do :; done"]
stop_grace = "0s"
[app.resources]
cpus = 0.5

[[app]]
name = "crash"
image = "busybox:1"
command = ["sh", "-c", "exit 3"]
restart = "always"

[[app]]
name = "sick"
image = "busybox:1"
command = ["sleep", "600"]
stop_grace = "0s"
[app.liveness]
exec = ["cat", "/tmp/healthy"]
period = "300ms"
failure_threshold = 2

[[app]]
name = "well"
image = "busybox:1"
command = ["sh", "-c", "touch /tmp/healthy; exec sleep 600"]
stop_grace = "0s"
[app.liveness]
exec = ["cat", "/tmp/healthy"]
period = "300ms"
failure_threshold = 2
initial_delay = "1s"
"#;

/// On cgroup v2 (the board's default): the agent runs a desired state with a memory hog, a
/// CPU spinner limited to half a core, a crashing app and an app whose liveness probe fails
/// (next to one whose probe passes). `skiff ps` reports the OOM kill, the restarts and the
/// probe's verdicts; the spinner's cgroup shows the quota and the CPU time it was allowed.
#[test]
fn board_containers_on_cgroup_v2() {
    let script = guest_script(
        r#"
set -u
skiff image load /images/busybox >/dev/null || exit 1
cat >/tmp/apps.toml <<'APPS'
@APPS@
APPS
skiff apply -f /tmp/apps.toml >/dev/null || exit 1
start_agent
until_ps '$1 == "spin" && $2 == "running"' 30 || echo "WAIT-TIMEOUT: spin running"
cg=/sys/fs/cgroup/skiff/spin
echo "CPU-MAX: $(cat $cg/cpu.max)"
usec() { awk '$1 == "usage_usec" { print $2 }' $cg/cpu.stat; }
u0=$(usec); t0=$(up)
sleep 3
u1=$(usec); t1=$(up)
echo "CPU: $((u1 - u0)) $t0 $t1"
echo "CPU-THROTTLED: $(awk '$1 == "nr_throttled" { print $2 }' $cg/cpu.stat)"
until_ps '$1 == "hog" && $7 == "oom-killed"' 20 || echo "WAIT-TIMEOUT: hog oom-killed"
until_ps '$1 == "crash" && $6 >= 2' 20 || echo "WAIT-TIMEOUT: crash restarted"
until_ps '$1 == "sick" && $6 >= 1' 20 || echo "WAIT-TIMEOUT: sick restarted"
ps_line "PS: "
echo "UNHEALTHY-KILLS: $(grep -c unhealthy /tmp/agent.log)"
kill -0 "$AGENT_PID" && echo "AGENT: alive"
agent_log
"#,
        &[("@APPS@", V2_APPS)],
    );
    let out = board::run_guest(&script, None, Duration::from_secs(90));
    out.assert_success();
    let t = out.transcript();
    let ps = out.json("PS: ");

    let hog = app(&ps, "hog");
    assert_eq!(hog["phase"], "exited", "hog (restart never) should have exited: {hog}\n{t}");
    assert_eq!(hog["last_exit"]["oom_killed"], true, "hog's OOM kill not reported: {hog}\n{t}");
    assert_eq!(hog["last_exit"]["signal"], 9, "{hog}");
    assert_eq!(hog["restarts"], 0, "{hog}");

    let spin = app(&ps, "spin");
    assert_eq!(spin["phase"], "running", "{spin}\n{t}");
    assert_eq!(spin["restarts"], 0, "{spin}");
    assert_eq!(out.expect_value("CPU-MAX: "), "50000 100000", "cpus = 0.5 as cpu.max");
    let c = cores(&out);
    assert!((0.4..=0.6).contains(&c), "cpus = 0.5 but the spinner used {c:.3} cores\n{t}");
    let throttled: u64 = out.expect_value("CPU-THROTTLED: ").parse().expect("nr_throttled");
    assert!(throttled > 0, "the quota never throttled the spinner\n{t}");

    let crash = app(&ps, "crash");
    assert!(crash["restarts"].as_u64().unwrap() >= 2, "crash not restarted: {crash}\n{t}");
    assert_eq!(crash["last_exit"]["code"], 3, "{crash}");

    let sick = app(&ps, "sick");
    assert!(sick["restarts"].as_u64().unwrap() >= 1, "failing liveness did not restart sick: {sick}\n{t}");
    assert_eq!(sick["last_exit"]["signal"], 9, "sick was not killed: {sick}");
    assert_eq!(sick["last_exit"]["oom_killed"], false, "{sick}");
    let kills: u64 = out.expect_value("UNHEALTHY-KILLS: ").parse().expect("a count");
    assert!(kills >= 1, "the agent logged no liveness kill\n{t}");

    let well = app(&ps, "well");
    assert_eq!(well["phase"], "running", "{well}\n{t}");
    assert_eq!(well["restarts"], 0, "a passing liveness probe restarted well: {well}\n{t}");
    assert_eq!(well["live"], "passing", "{well}");

    assert_eq!(out.value("AGENT: "), Some("alive"), "{t}");
    println!("cgroup v2: spinner at cpus = 0.5 used {c:.3} cores; run took {:?}", out.elapsed);
}

const V1_APPS: &str = r#"
[[app]]
name = "hog"
image = "busybox:1"
command = ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]
restart = "never"
[app.resources]
memory = "32Mi"

[[app]]
name = "spin"
image = "busybox:1"
command = ["sh", "-c", "while :; do :; done"]
stop_grace = "0s"
[app.resources]
cpus = 0.5
memory = "64Mi"
pids = 16
"#;

/// cgroup v1 as older systemd boards have it: one hierarchy per controller, cpu and cpuacct
/// co-mounted, no cgroup2 at all (cross/qemu/init.sh with `skiff.cgroup=v1`). skiff runs its
/// apps there with their limits: the hog is OOM-killed and reported as such, the spinner sits
/// in /skiff/spin of every hierarchy with quota 50000/100000 and uses about half a core.
#[test]
fn board_containers_on_cgroup_v1_comounted() {
    let script = guest_script(
        r#"
set -u
echo "CGROUP2-MOUNTS: $(grep -c ' - cgroup2 ' /proc/self/mountinfo)"
echo "CGROUP1-MOUNTS: $(grep ' - cgroup ' /proc/self/mountinfo | awk '{ print $5 }' | tr '\n' ' ')"
rc=0
skiff doctor >/tmp/doctor 2>&1 || rc=$?
echo "DOCTOR-EXIT: $rc"
sed 's/^/DOCTOR: /' /tmp/doctor
skiff image load /images/busybox >/dev/null || exit 1
cat >/tmp/apps.toml <<'APPS'
@APPS@
APPS
skiff apply -f /tmp/apps.toml >/dev/null || exit 1
start_agent
until_ps '$1 == "spin" && $2 == "running"' 30 || echo "WAIT-TIMEOUT: spin running"
pid=$(skiff ps | awk '$1 == "spin" { print $3 }')
echo "SPIN-CGROUPS: $(tr '\n' ' ' </proc/$pid/cgroup)"
c=/sys/fs/cgroup/cpu,cpuacct/skiff/spin
echo "CFS: $(cat $c/cpu.cfs_quota_us) $(cat $c/cpu.cfs_period_us)"
echo "MEMORY-LIMIT: $(cat /sys/fs/cgroup/memory/skiff/spin/memory.limit_in_bytes)"
echo "PIDS-MAX: $(cat /sys/fs/cgroup/pids/skiff/spin/pids.max)"
u0=$(cat $c/cpuacct.usage); t0=$(up)
sleep 3
u1=$(cat $c/cpuacct.usage); t1=$(up)
echo "CPU: $(( (u1 - u0) / 1000 )) $t0 $t1"
echo "CPU-THROTTLED: $(awk '$1 == "nr_throttled" { print $2 }' $c/cpu.stat)"
until_ps '$1 == "hog" && $7 == "oom-killed"' 20 || echo "WAIT-TIMEOUT: hog oom-killed"
ps_line "PS: "
kill -0 "$AGENT_PID" && echo "AGENT: alive"
agent_log
"#,
        &[("@APPS@", V1_APPS)],
    );
    let out = board::run_guest_with(&GuestRun {
        kernel_args: "skiff.cgroup=v1",
        ..GuestRun::new(&script, Duration::from_secs(90))
    });
    out.assert_success();
    let t = out.transcript();
    assert_eq!(out.expect_value("CGROUP2-MOUNTS: "), "0", "the board should have no cgroup2\n{t}");
    let v1 = out.expect_value("CGROUP1-MOUNTS: ");
    assert!(v1.contains("/sys/fs/cgroup/cpu,cpuacct"), "cpu,cpuacct not co-mounted: {v1}");
    assert_eq!(out.expect_value("DOCTOR-EXIT: "), "0", "skiff doctor fails on v1\n{t}");
    assert!(
        out.values("DOCTOR: ").any(|l| l.contains("cgroup v1")),
        "skiff doctor does not see cgroup v1\n{t}"
    );

    let ps = out.json("PS: ");
    let spin = app(&ps, "spin");
    assert_eq!(spin["phase"], "running", "spin does not run on cgroup v1: {spin}\n{t}");
    assert_eq!(spin["restarts"], 0, "{spin}");
    let cgroups = out.expect_value("SPIN-CGROUPS: ");
    for h in ["cpu,cpuacct", "memory", "pids"] {
        assert!(cgroups.contains(&format!(":{h}:/skiff/spin")), "spin not in {h}:/skiff/spin: {cgroups}");
    }
    assert_eq!(out.expect_value("CFS: "), "50000 100000", "cpus = 0.5 as the CFS quota");
    assert_eq!(out.expect_value("MEMORY-LIMIT: "), (64u64 << 20).to_string(), "memory = 64Mi");
    assert_eq!(out.expect_value("PIDS-MAX: "), "16", "pids = 16");
    let c = cores(&out);
    assert!((0.4..=0.6).contains(&c), "cpus = 0.5 but the spinner used {c:.3} cores on v1\n{t}");
    let throttled: u64 = out.expect_value("CPU-THROTTLED: ").parse().expect("nr_throttled");
    assert!(throttled > 0, "the quota never throttled the spinner\n{t}");

    let hog = app(&ps, "hog");
    assert_eq!(hog["last_exit"]["oom_killed"], true, "hog's OOM kill not reported on v1: {hog}\n{t}");
    assert_eq!(hog["last_exit"]["signal"], 9, "{hog}");
    assert_eq!(out.value("AGENT: "), Some("alive"), "{t}");
    println!("cgroup v1: spinner at cpus = 0.5 used {c:.3} cores; run took {:?}", out.elapsed);
}

/// A kernel without the memory controller (`cgroup_disable=memory`, as Raspberry Pi OS
/// kernels ship it): `skiff agent` refuses to start with exit code 3 (the systemd unit does
/// not restart on it) and one line on stderr that names the fix.
#[test]
fn board_agent_refuses_without_memory_controller() {
    let script = r#"
echo "CONTROLLERS: $(cat /sys/fs/cgroup/cgroup.controllers)"
rc=0
timeout 30 skiff agent >/tmp/out 2>/tmp/err || rc=$?
echo "AGENT-EXIT: $rc"
sed 's/^/AGENT-STDERR: /' /tmp/err
sed 's/^/AGENT-STDOUT: /' /tmp/out
"#;
    let out = board::run_guest_with(&GuestRun {
        kernel_args: "cgroup_disable=memory",
        ..GuestRun::new(script, Duration::from_secs(60))
    });
    out.assert_success();
    let t = out.transcript();
    let controllers = out.expect_value("CONTROLLERS: ");
    assert!(
        !controllers.split_whitespace().any(|c| c == "memory") && controllers.contains("cpu"),
        "the board should have cgroup2 without the memory controller: {controllers}"
    );
    assert_eq!(out.expect_value("AGENT-EXIT: "), "3", "skiff agent should refuse with exit code 3\n{t}");
    let stderr: Vec<&str> = out.values("AGENT-STDERR: ").filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(stderr.len(), 1, "one line on stderr, got {stderr:#?}");
    assert!(
        stderr[0].contains("memory") && stderr[0].contains("cgroup_enable=memory"),
        "the line should name the fix (cgroup_enable=memory): {}",
        stderr[0]
    );
    assert_eq!(out.values("AGENT-STDOUT: ").count(), 0, "nothing on stdout\n{t}");
}

/// What one boot of `board_power_cuts_during_apply` found after the agent started.
#[derive(Debug)]
struct Found {
    /// The counter of the desired state the apps run (each app prints its `GEN`).
    counter: u64,
    /// `skiff ps` generation.
    generation: u64,
    /// Guest uptime when `skiff ps` first showed every app running.
    all_running: f64,
}

/// The apps of desired state number `n`: web and worker, plus even or odd, all with GEN=n.
fn cut_apps(n: u64) -> [&'static str; 3] {
    ["web", "worker", if n.is_multiple_of(2) { "even" } else { "odd" }]
}

/// Checks what a power-cut boot found: the agent ran, every app of one intact desired state
/// runs, generation and apps agree. Returns the state's counter and generation.
fn check_found(out: &GuestOutput) -> Found {
    let t = out.transcript();
    assert!(!out.has_line("FELL-BACK"), "desired.skf was unreadable: the agent fell back\n{t}");
    let all_running = out.value("ALL-RUNNING: ").unwrap_or_else(|| panic!("not every app came back\n{t}"));
    let ps = out.json("PS: ");
    let gens: BTreeMap<&str, u64> = out
        .values("APP-GEN: ")
        .map(|l| {
            let (app, n) = l.split_once(' ').unwrap_or_else(|| panic!("APP-GEN: {l}"));
            (app, n.parse().unwrap_or_else(|_| panic!("app {app} has no GEN: {l:?}\n{t}")))
        })
        .collect();
    let counter = *gens.values().next().unwrap_or_else(|| panic!("no app running\n{t}"));
    assert!(gens.values().all(|&g| g == counter), "apps from different desired states: {gens:?}\n{t}");
    let mut want: Vec<&str> = cut_apps(counter).to_vec();
    want.sort();
    let running: Vec<&str> = gens.keys().copied().collect();
    assert_eq!(running, want, "state {counter} has other apps than these\n{t}");
    let apps = ps["apps"].as_array().expect("apps");
    let mut listed: Vec<&str> = apps.iter().map(|a| a["name"].as_str().unwrap()).collect();
    listed.sort();
    assert_eq!(listed, want, "skiff ps lists other apps than state {counter} has\n{t}");
    assert!(apps.iter().all(|a| a["phase"] == "running"), "not all running: {ps}");
    Found {
        counter,
        generation: ps["generation"].as_u64().expect("generation"),
        all_running: all_running.parse().expect("uptime"),
    }
}

/// Guest script for `board_power_cuts_during_apply`. Every boot starts the agent and reports
/// what runs. MODE setup first loads the image and stores state 1; MODE setup and cut then
/// apply the next state and wait for the power to go; MODE check only reports.
const CUT_SCRIPT: &str = r#"
set -u
MODE=@MODE@
state() {
    if [ $(( $1 % 2 )) -eq 0 ]; then x=even; else x=odd; fi
    # No rollback: every boot is cut during a test, and the boot counter would
    # (rightly) send the board back to the last good state; this checks the writes.
    {
        printf '[rollout]\nrollback = false\n\n'
        for a in web worker $x; do
            printf '[[app]]\nname = "%s"\nimage = "busybox:1"\ncommand = ["sleep", "600"]\n' "$a"
            printf 'env = { GEN = "%s" }\nstop_grace = "0s"\n\n' "$1"
        done
    } >/tmp/state-$1.toml
}
cd /var/lib/skiff || exit 1
echo "STATE-DIR: $(ls -A | tr '\n' ' ')"
# What a cut in the middle of a write leaves; the next write reuses it. Removed here so that
# each boot reports what the cut before it left.
rm -f .desired.skf.tmp .desired.prev.tmp
dmesg | grep -q 'EXT4-fs (vda): recovery complete' && echo "JOURNAL: replayed"
if [ "$MODE" = setup ]; then
    skiff image load /images/busybox >/dev/null || exit 1
    state 1
    skiff apply -f /tmp/state-1.toml >/dev/null || exit 1
fi
echo "AGENT-START: $(up)"
start_agent
if wait_running 3 30; then echo "ALL-RUNNING: $(up)"; else echo "NOT-RUNNING"; agent_log; fi
ps_line "PS: "
skiff ps >/tmp/ps.txt
gen() { tr '\0' '\n' <"/proc/$1/environ" | sed -n 's/^GEN=//p'; }
# App lines follow the column header (header lines above it vary: link, reserve).
for pid in $(awk 'seen && $3 != "-" { print $1 ":" $3 } $1 == "APP" { seen = 1 }' /tmp/ps.txt); do
    echo "APP-GEN: ${pid%%:*} $(gen "${pid#*:}")"
done
grep -q unreadable /tmp/agent.log && { echo "FELL-BACK"; agent_log; }
echo "START-FAILURES: $(grep -c 'start failed' /tmp/agent.log)"
grep -m 1 'start failed' /tmp/agent.log | sed 's/^/START-FAILURE: /'
if [ "$MODE" != check ]; then
    n=$(( $(gen "$(awk '$1 == "web" { print $3 }' /tmp/ps.txt)") + 1 ))
    state $n
    echo "APPLY-START $n"
    skiff apply -f /tmp/state-$n.toml
    echo "APPLY-DONE $n"
    sleep 120
fi
"#;

/// Power cuts in `board_power_cuts_during_apply`; the first `LATE_CUTS` come just after apply
/// returned and time its write for the others.
const CUTS: usize = 20;
const LATE_CUTS: usize = 4;

/// The power is cut (QEMU SIGKILLed) at a random moment of `skiff apply`, 20 times, with the
/// agent running and the state dir on the board's ext4 disk. Each boot verifies the cut
/// before it, then applies the next state and is cut: the agent, with no network, finds the
/// old or the new desired state intact (never a mix, never the fallback copy; the new one
/// whenever apply had said it was written), and all of that state's apps run. The first cuts
/// come just after apply returned and time its write (a boot's first write is slower than the
/// ones after it); the others are spread over the apply and packed around its
/// write, so cuts land before, during and after it. Boot -> all apps running is the guest's
/// uptime when `skiff ps` first showed them all running.
#[test]
fn board_power_cuts_during_apply() {
    let disk = Disk::new(64);
    let mut rng = rand::thread_rng();
    let mut writes: Vec<Duration> = Vec::new(); // APPLY-START -> "written", in late-cut boots
    let mut delays: Vec<Duration> = Vec::new(); // for the cuts after the late ones
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut all_running = Vec::new();
    let mut boot_times = Vec::new();
    let mut retried: Vec<String> = Vec::new(); // boots where an app's first start failed
    let mut offset = None; // generation - state counter: every apply writes one generation
    let mut last: Option<(GuestOutput, Found)> = None;

    for b in 0..=CUTS {
        let mode = match b {
            0 => "setup",
            _ if b == CUTS => "check",
            _ => "cut",
        };
        let cut = match b {
            _ if b == CUTS => None,
            _ if b < LATE_CUTS => Some(PowerCut {
                after_line: "APPLY-DONE".into(),
                delay: Duration::from_micros(rng.gen_range(0..20_000)),
            }),
            _ => {
                if delays.is_empty() {
                    delays = cut_delays(&writes, CUTS - LATE_CUTS, &mut rng);
                }
                Some(PowerCut { after_line: "APPLY-START".into(), delay: delays[b - LATE_CUTS] })
            }
        };
        let script = guest_script(CUT_SCRIPT, &[("@MODE@", mode)]);
        let out = board::run_guest_with(&GuestRun {
            disk: Some(disk.path()),
            cut: cut.clone(),
            ..GuestRun::new(&script, Duration::from_secs(60))
        });
        let t = out.transcript();
        let found = check_found(&out);
        if b > 0 {
            // The setup boot loaded the image first.
            all_running.push(found.all_running);
        }
        boot_times.push(out.elapsed);
        if out.value("START-FAILURES: ").is_some_and(|n| n != "0") {
            retried.push(out.value("START-FAILURE: ").unwrap_or("?").to_string());
        }
        let offset = *offset.get_or_insert(found.generation - found.counter);
        assert_eq!(found.generation - found.counter, offset, "generation and apps disagree: {found:?}\n{t}");

        if let Some((cut_boot, before)) = &last {
            // What the cut before this boot left.
            let applied = before.counter + 1;
            let returned = cut_boot.has_line(&format!("APPLY-DONE {applied}"));
            let written = cut_boot.console.iter().any(|l| l.starts_with("desired state generation"));
            assert!(
                found.counter == applied || (found.counter == before.counter && !written),
                "boot {b}: state {} found; {} was running and {applied} was being applied (apply {})\n{t}",
                found.counter,
                before.counter,
                if returned {
                    "had returned"
                } else if written {
                    "had written it"
                } else {
                    "had not finished"
                }
            );
            let temp_left = out.expect_value("STATE-DIR: ").contains(".desired.skf.tmp");
            *outcomes
                .entry(match (found.counter == applied, written, temp_left) {
                    (true, true, _) => "new state (cut after apply said written)",
                    (true, false, _) => "new state (cut before apply said written)",
                    (false, _, true) => "old state, temp file left (cut mid-write)",
                    (false, _, false) => "old state",
                })
                .or_default() += 1;
        }
        match &cut {
            Some(c) => {
                assert_eq!(out.ending, Ending::PowerCut, "boot {b} was to be cut {c:?}\n{t}");
                assert!(out.cut_line_at.is_some(), "boot {b} never applied\n{t}");
                if b > 0 && b < LATE_CUTS {
                    let (Some(start), Some(written)) =
                        (out.line_time("APPLY-START"), out.line_time("desired state generation"))
                    else {
                        panic!("boot {b}: apply returned without saying it wrote\n{t}")
                    };
                    writes.push(written - start);
                }
            }
            None => {
                out.assert_success();
                assert_eq!(
                    out.value("JOURNAL: "),
                    Some("replayed"),
                    "the last cut left no journal to replay?"
                );
            }
        }
        last = Some((out, found));
    }
    disk.fsck().unwrap_or_else(|e| panic!("file system damaged after {CUTS} power cuts:\n{e}"));

    all_running.sort_by(f64::total_cmp);
    boot_times.sort();
    println!(
        "{CUTS} power cuts; apply wrote {writes:?} after APPLY-START; windowed cuts at \
         {:?}..{:?}: {outcomes:#?}",
        delays.iter().min().unwrap(),
        delays.iter().max().unwrap()
    );
    println!(
        "one boot (verify, apply, cut): median {:?}, max {:?} host time",
        boot_times[boot_times.len() / 2],
        boot_times[boot_times.len() - 1]
    );
    println!(
        "boot -> all 3 apps running (guest uptime, {} boots): median {:.2} s, max {:.2} s",
        all_running.len(),
        all_running[all_running.len() / 2],
        all_running[all_running.len() - 1]
    );
    if !retried.is_empty() {
        println!(
            "{} of {} boots had an app whose first start failed (retried after the backoff), e.g.: {}",
            retried.len(),
            CUTS + 1,
            retried[0]
        );
    }
    let old = outcomes.iter().filter(|(k, _)| k.starts_with("old")).map(|(_, n)| n).sum::<usize>();
    assert!(
        old > 0 && old < CUTS - LATE_CUTS,
        "of {} cuts timed into apply, {old} found the old state: the delays miss the write\n{outcomes:?}",
        CUTS - LATE_CUTS
    );
}

/// `n` delays after APPLY-START for the cuts, given when apply wrote in earlier boots: half
/// spread from 0 to well past the write, half packed around the write itself (its fsyncs
/// and the rename), one at a random point of each stratum, shuffled.
fn cut_delays(writes: &[Duration], n: usize, rng: &mut impl Rng) -> Vec<Duration> {
    let mut w = writes.to_vec();
    w.sort();
    let write_at = w[w.len() / 2];
    let half = n / 2;
    let spread = (Duration::ZERO, write_at.mul_f64(1.6));
    let around = (write_at.saturating_sub(Duration::from_millis(25)), write_at + Duration::from_millis(5));
    let mut delays: Vec<Duration> = (0..n)
        .map(|i| {
            let ((lo, hi), k, strata) =
                if i < half { (spread, i, half) } else { (around, i - half, n - half) };
            let step = (hi - lo) / strata as u32;
            lo + step * k as u32 + step.mul_f64(rng.gen_range(0.0..1.0))
        })
        .collect();
    delays.shuffle(rng);
    delays
}

/// A guest that never finishes is killed at the timeout, not waited on forever.
#[test]
fn board_hung_guest_times_out() {
    // Long enough for the guest to boot on a loaded machine (5 s was not, once),
    // far shorter than the script.
    let timeout = Duration::from_secs(30);
    let out = board::run_guest("echo HANG-START; sleep 600", None, timeout);
    assert_eq!(out.ending, Ending::TimedOut, "{}", out.transcript());
    assert!(out.has_line("HANG-START"), "the guest never ran the script\n{}", out.transcript());
    assert!(out.elapsed < timeout + Duration::from_secs(5), "the kill took {:?}", out.elapsed);
}

const CONFINED_APPS: &str = r#"
[[app]]
name = "plain"
image = "busybox:1"
command = ["sh", "-c", "/probe"]
restart = "never"
mounts = [{ source = "/tmp/probe", target = "/probe", readonly = true }]

[[app]]
name = "raw"
image = "busybox:1"
command = ["sh", "-c", "/probe"]
restart = "never"
mounts = [{ source = "/tmp/probe", target = "/probe", readonly = true }]
cap_add = ["NET_RAW"]

[[app]]
name = "tweaked"
image = "busybox:1"
command = ["sh", "-c", "/probe"]
restart = "never"
mounts = [{ source = "/tmp/probe", target = "/probe", readonly = true }]
cap_add = ["NET_ADMIN"]
cap_drop = ["CHOWN"]
read_only_rootfs = true

[[app]]
name = "isolated"
image = "busybox:1"
command = ["sh", "-c", "/probe; echo lo-flags=$(cat /sys/class/net/lo/flags); ping -c 1 -W 2 127.0.0.1 >/dev/null 2>&1 && echo ping=ok || echo ping=failed"]
restart = "never"
mounts = [{ source = "/tmp/probe", target = "/probe", readonly = true }]
network = "none"

[[app]]
name = "user"
image = "busybox:1"
command = ["sh", "-c", "id; grep CapEff /proc/self/status"]
restart = "never"
user = "1000:1000"

[[app]]
name = "devunlisted"
image = "busybox:1"
command = ["sh", "-c", "/devprobe"]
restart = "never"
mounts = [{ source = "/tmp/devprobe", target = "/devprobe", readonly = true }]

[[app]]
name = "devlisted"
image = "busybox:1"
command = ["sh", "-c", "/devprobe"]
restart = "never"
mounts = [{ source = "/tmp/devprobe", target = "/devprobe", readonly = true }]
devices = ["/dev/kmsg"]
"#;

/// What each app sees from inside on the board (cgroup v2, aarch64): the same checks as
/// tests/confinement.rs on x86. A raw ICMP socket (traceroute) and a packet socket (arping)
/// are refused with EPERM on the host network unless `cap_add` has NET_RAW.
/// An app can mknod, but opens only the standard devices and those it lists (/dev/kmsg).
#[test]
fn board_confinement() {
    let script = guest_script(
        r#"
set -u
cat >/tmp/probe <<'PROBE'
#!/bin/sh
grep -E '^Cap(Eff|Bnd):' /proc/self/status
out=$(traceroute -n -m 1 -q 1 -w 1 127.0.0.1 2>&1)
case "$out" in *'not permitted'*) echo raw=eperm ;; *) echo raw=opened ;; esac
out=$(arping -c 1 -w 1 -I lo 127.0.0.1 2>&1)
case "$out" in *'not permitted'*) echo packet=eperm ;; *) echo packet=opened ;; esac
touch /written 2>/dev/null && echo root=writable || echo root=read-only
echo interrupts-bytes=$(wc -c </proc/interrupts)
PROBE
chmod 755 /tmp/probe
cat >/tmp/devprobe <<'PROBE'
#!/bin/sh
try() { if out=$( (: >> "$1") 2>&1); then echo "$2=opened"; else case "$out" in *'not permitted'*) echo "$2=eperm" ;; *) echo "$2=failed: $out" ;; esac; fi; }
mknod /tmp/kmsg c 1 11 && echo mknod=ok || echo mknod=failed
try /tmp/kmsg made
if [ -e /dev/kmsg ]; then try /dev/kmsg dev-kmsg; else echo dev-kmsg=absent; fi
try /dev/null null
echo zero=$(head -c 4 /dev/zero | wc -c)
echo urandom=$(head -c 4 /dev/urandom | wc -c)
PROBE
chmod 755 /tmp/devprobe
echo "HOST-INTERRUPTS: $(wc -c </proc/interrupts)"
skiff image load /images/busybox >/dev/null || exit 1
cat >/tmp/apps.toml <<'APPS'
@APPS@
APPS
skiff apply -f /tmp/apps.toml >/dev/null || exit 1
start_agent
for a in plain raw tweaked isolated user devunlisted devlisted; do
    until_ps "\$1 == \"$a\" && \$2 == \"exited\"" 30 || echo "WAIT-TIMEOUT: $a exited"
    skiff logs "$a" | sed "s/^/$a| /"
done
sleep 1
for a in devunlisted devlisted; do
    if [ -d "/sys/fs/cgroup/skiff/$a" ]; then echo "CGROUP-LEFT: $a"; fi
done
agent_log
"#,
        &[("@APPS@", CONFINED_APPS)],
    );
    let out = board::run_guest(&script, None, Duration::from_secs(120));
    out.assert_success();
    let t = out.transcript();
    let caps = |app: &str, key: &str| {
        u64::from_str_radix(out.expect_value(&format!("{app}| {key}")).trim(), 16)
            .unwrap_or_else(|e| panic!("{app} {key}: {e}\n{t}"))
    };
    let val = |app: &str, key: &str| out.expect_value(&format!("{app}| {key}=")).trim().to_string();
    const CHOWN: u64 = 1 << 0;
    const NET_ADMIN: u64 = 1 << 12;
    const NET_RAW: u64 = 1 << 13;

    let plain = caps("plain", "CapBnd:");
    assert_eq!(plain & NET_RAW, 0, "a host-network app has no CAP_NET_RAW\n{t}");
    assert_ne!(plain & CHOWN, 0, "{t}");
    assert_eq!(caps("plain", "CapEff:"), plain, "{t}");
    assert_eq!(val("plain", "raw"), "eperm", "{t}");
    assert_eq!(val("plain", "packet"), "eperm", "{t}");
    assert_eq!(val("plain", "root"), "writable", "{t}");
    assert_ne!(out.expect_value("HOST-INTERRUPTS: "), "0", "{t}");
    assert_eq!(val("plain", "interrupts-bytes"), "0", "/proc/interrupts is masked\n{t}");

    assert_eq!(caps("raw", "CapBnd:"), plain | NET_RAW, "{t}");
    assert_eq!(val("raw", "raw"), "opened", "{t}");
    assert_eq!(val("raw", "packet"), "opened", "{t}");

    assert_eq!(caps("tweaked", "CapBnd:"), (plain | NET_ADMIN) & !CHOWN, "{t}");
    assert_eq!(val("tweaked", "root"), "read-only", "{t}");

    let flags = val("isolated", "lo-flags");
    let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).expect("lo flags");
    assert_eq!(flags & 1, 1, "lo is up\n{t}");
    assert_eq!(val("isolated", "ping"), "ok", "{t}");
    assert_ne!(caps("isolated", "CapBnd:") & NET_RAW, 0, "{t}");

    assert!(out.value("user| uid=1000 gid=1000").is_some(), "user = 1000:1000\n{t}");
    assert_eq!(caps("user", "CapEff:"), 0, "{t}");

    // Device rules on cgroup v2 (the shim's BPF program): mknod works (CAP_MKNOD
    // kept), but an unlisted device cannot be opened; a listed one can.
    assert_eq!(val("devunlisted", "mknod"), "ok", "{t}");
    assert_eq!(val("devunlisted", "made"), "eperm", "an unlisted device made with mknod\n{t}");
    assert_eq!(val("devunlisted", "dev-kmsg"), "absent", "{t}");
    assert_eq!(val("devunlisted", "null"), "opened", "{t}");
    assert_eq!(val("devunlisted", "zero"), "4", "{t}");
    assert_eq!(val("devunlisted", "urandom"), "4", "{t}");
    assert_eq!(val("devlisted", "dev-kmsg"), "opened", "{t}");
    assert_eq!(val("devlisted", "made"), "opened", "{t}");
    assert!(out.value("CGROUP-LEFT: ").is_none(), "the apps' cgroups (and programs) are gone\n{t}");
    println!("board confinement: run took {:?}", out.elapsed);
}

/// `tests/probe/sysprobe.c` built static for the board's two user spaces: aarch64 (musl)
/// and armhf (32-bit, glibc), as base64 for the guest script.
fn board_probes() -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let src = board::repo().join("tests/probe/sysprobe.c");
    let build = |cc: &str, out: &str| {
        let path = dir.path().join(out);
        let o = std::process::Command::new(cc)
            .args(["-static", "-Os", "-s", "-pthread", "-o"])
            .arg(&path)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("{cc}: {e} (cross/build.sh installs the cross compilers)"));
        assert!(o.status.success(), "{cc}: {}", String::from_utf8_lossy(&o.stderr));
        let b64 = std::process::Command::new("base64").arg(&path).output().expect("base64");
        String::from_utf8(b64.stdout).unwrap()
    };
    (build("aarch64-linux-musl-gcc", "probe64"), build("arm-linux-gnueabihf-gcc", "probe32"))
}

/// The default seccomp profile on the aarch64 board: the app sees `Seccomp: 2`; an aarch64
/// and an armhf (compat) program alike get EPERM for unshare, mount, keyctl, add_key,
/// perf_event_open and AF_ALG sockets, ENOSYS for clone3, and can still make threads, fork
/// and open ordinary sockets (armhf's own calls, set_tls and the time64 ones, pass their
/// own architecture check). An unconfined app shows `Seccomp: 0` and gets through.
#[test]
fn board_seccomp_for_aarch64_and_armhf_programs() {
    let (p64, p32) = board_probes();
    let script = guest_script(
        r#"
set -u
mkdir -p /probe
base64 -d >/probe/p64 <<'B64'
@P64@
B64
base64 -d >/probe/p32 <<'B64'
@P32@
B64
chmod 0755 /probe/p64 /probe/p32
skiff image load /images/busybox >/dev/null || exit 1
cat >/tmp/apps.toml <<'APPS'
[[app]]
name = "confined"
image = "busybox:1"
command = ["sh", "-c", "grep Seccomp: /proc/self/status; /probe/p64 | sed s/^/a64./; /probe/p32 | sed s/^/a32./; echo script=done"]
restart = "never"
mounts = [{ source = "/probe", target = "/probe", readonly = true }]

[[app]]
name = "free"
image = "busybox:1"
command = ["sh", "-c", "grep Seccomp: /proc/self/status; /probe/p32 | sed s/^/a32./; echo script=done"]
restart = "never"
mounts = [{ source = "/probe", target = "/probe", readonly = true }]
[app.security]
seccomp = "unconfined"
APPS
skiff apply -f /tmp/apps.toml >/dev/null || exit 1
start_agent
until_ps '$1 == "confined" && $2 == "exited"' 60 || echo "WAIT-TIMEOUT: confined exited"
until_ps '$1 == "free" && $2 == "exited"' 60 || echo "WAIT-TIMEOUT: free exited"
skiff logs confined | sed 's/^/CONFINED: /'
skiff logs free | sed 's/^/FREE: /'
agent_log
"#,
        &[("@P64@", p64.trim()), ("@P32@", p32.trim())],
    );
    let out = board::run_guest(&script, None, Duration::from_secs(120));
    out.assert_success();
    let t = out.transcript();
    let lines = |prefix: &str| -> BTreeMap<String, String> {
        out.values(prefix)
            .filter_map(|l| {
                l.split_once(['=', ':']).map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect()
    };
    let confined = lines("CONFINED: ");
    let free = lines("FREE: ");
    let get =
        |m: &BTreeMap<String, String>, k: &str| m.get(k).cloned().unwrap_or_else(|| panic!("no {k}\n{t}"));
    assert_eq!(get(&confined, "Seccomp"), "2", "{t}");
    assert_eq!(get(&confined, "script"), "done", "{t}");
    for arch in ["a64", "a32"] {
        for (call, want) in [
            ("unshare_user", "EPERM"),
            ("unshare_mount", "EPERM"),
            ("mount", "EPERM"),
            ("clone_userns", "EPERM"),
            ("clone3", "ENOSYS"),
            ("keyctl", "EPERM"),
            ("add_key", "EPERM"),
            ("perf_event_open", "EPERM"),
            ("socket_alg", "EPERM"),
            ("socket_vsock", "EPERM"),
            ("personality_exec", "EPERM"),
            ("socket_inet", "ok"),
            ("socket_unix", "ok"),
            ("personality_query", "ok"),
            ("thread", "ok"),
            ("fork", "ok"),
            ("probe", "done"),
        ] {
            assert_eq!(get(&confined, &format!("{arch}.{call}")), want, "{arch} {call}\n{t}");
        }
    }
    assert_eq!(get(&free, "Seccomp"), "0", "{t}");
    assert_eq!(get(&free, "a32.unshare_user"), "ok", "{t}");
    assert_eq!(get(&free, "a32.clone3"), "EINVAL", "{t}");
    assert_eq!(get(&free, "a32.thread"), "ok", "{t}");
    println!("board seccomp: run took {:?}", out.elapsed);
}
