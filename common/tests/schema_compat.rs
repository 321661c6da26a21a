//! The previous release (schema 1, commit 1790ffa) wrote the files in
//! `fixtures/v1/` (see `fixtures/v1/generate.rs`); this build must read them
//! as what they meant, and write its own schema.

use skiff_common::codec::{self, state_file, CodecError, Kind};
use skiff_common::protocol::{
    decode_reported, open_desired_body, peek_desired, DeviceId, Rejection, Reported, SigningKey,
    DESIRED_SCHEMA, REPORTED_SCHEMA,
};
use skiff_common::status::{AppStatus, ExitInfo, Health, Phase};
use skiff_common::{toml_file, AppName, DesiredState, Origin, PullPolicy, Rollout, RolloutStatus};

fn fixture(name: &str) -> Vec<u8> {
    fixture_of("v1", name)
}

fn fixture_of(release: &str, name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(release).join(name),
    )
    .unwrap()
}

/// The same text `generate.rs` wrote the fixtures from.
const APPS: &str = r#"
[[app]]
name = "web"
image = "busybox:1.36"
command = ["httpd", "-f", "-p", "8080"]
env = { MODE = "prod", TOKEN = "s3cr=t" }
workdir = "/srv"
restart = "on-failure"
network = "host"
mounts = [{ source = "/var/lib/skiff/volumes/web", target = "/data", readonly = true }]
devices = ["/dev/ttyUSB0"]
stop_grace = "3s"
[app.resources]
cpus = 0.5
memory = "32Mi"
pids = 64
[app.liveness]
http = { port = 8080, path = "/health?x=1" }
period = "5s"
timeout = "1s"
failure_threshold = 3
initial_delay = "2s"
[app.readiness]
tcp = { port = 8080 }
success_threshold = 2
[app.startup]
exec = ["cat", "/tmp/ok"]
period = "500ms"

[[app]]
name = "sensor"
image = "registry.local:5000/acme/sensor@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
restart = "never"
network = "none"
"#;

fn expected_state(generation: u64, origin: Origin) -> DesiredState {
    let mut s = toml_file::parse(APPS).unwrap();
    s.generation = generation;
    s.origin = origin;
    s
}

#[test]
fn a_schema_1_state_file_reads_as_the_same_state() {
    let bytes = fixture("desired.skf");
    assert_eq!(bytes[5], 1, "the fixture is schema 1");
    let state = state_file::decode(&bytes).unwrap();
    assert_eq!(state, expected_state(42, Origin::Local));
    assert!(state.apps.iter().all(|a| a.pull == PullPolicy::IfNotPresent));
    assert_eq!(state.apps[1].liveness.as_ref().unwrap().initial_delay, std::time::Duration::from_secs(2));
    // Written back, it is the current schema and reads the same.
    let again = state_file::encode(&state).unwrap();
    assert_eq!(again[5], state_file::SCHEMA);
    assert_eq!(state_file::decode(&again).unwrap(), state);
}

#[test]
fn a_schema_1_signed_desired_state_verifies_and_reads_as_the_same_state() {
    let bytes = fixture("desired.msg");
    assert_eq!(bytes[5], 1, "the fixture is schema 1");
    let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
    let device = DeviceId::try_from("pi-1").unwrap();
    let body = open_desired_body(&bytes, &device, &key).unwrap();
    assert_eq!(body.state, expected_state(7, Origin::Controller));
    assert_eq!(body.replaces, None);
    assert_eq!(peek_desired(&bytes).unwrap().1, body);
    // Another key still fails: the old signature context is checked, not skipped.
    let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
    assert!(open_desired_body(&bytes, &device, &other).is_err());
    // Any flipped bit in the signed body fails (the CRC is recomputed so only the signature can tell).
    let (_, payload) = codec::open(&bytes, Kind::SignedDesired, 1..=1, 1 << 20).unwrap();
    let mut signed: skiff_common::protocol::SignedDesired = codec::decode_payload(payload).unwrap();
    signed.body[10] ^= 1;
    let tampered = codec::encode(Kind::SignedDesired, 1, &signed).unwrap();
    assert!(open_desired_body(&tampered, &device, &key).is_err());
}

#[test]
fn a_schema_1_reported_state_reads_with_no_pulls() {
    let bytes = fixture("reported.msg");
    assert_eq!(bytes[5], 1, "the fixture is schema 1");
    let r = Reported {
        device: DeviceId::try_from("pi-1").unwrap(),
        generation_applied: 7,
        origin: Origin::Controller,
        apps: vec![
            AppStatus {
                name: AppName::try_from("web").unwrap(),
                phase: Phase::Running,
                pid: Some(4242),
                restarts: 2,
                last_exit: Some(ExitInfo { code: Some(1), signal: None, oom_killed: false }),
                live: Health::Passing,
                ready: Health::Unknown,
                image: "busybox:1.36".into(),
                image_digest: Some(format!("sha256:{}", "ab".repeat(32))),
                error: None,
            },
            AppStatus {
                name: AppName::try_from("sensor").unwrap(),
                phase: Phase::Failed,
                pid: None,
                restarts: 0,
                last_exit: None,
                live: Health::None,
                ready: Health::None,
                image: "registry.local:5000/acme/sensor".into(),
                image_digest: None,
                error: Some("image not found".into()),
            },
        ],
        agent_version: "0.1.0".into(),
        last_rejection: Some(Rejection::new(Some(6), "refused: generation 6 is below 7")),
        sent_unix: 1_700_000_000,
        pulls: Vec::new(),
        // An agent before rollouts trusted what it ran.
        rollout: RolloutStatus { committed: 7, testing: None, failed: None },
    };
    assert_eq!(decode_reported(&bytes).unwrap(), r);
}

#[test]
fn newer_schemas_are_refused_with_a_reason() {
    let state = expected_state(1, Origin::Local);
    let bytes = codec::encode(Kind::StateFile, state_file::SCHEMA + 1, &state).unwrap();
    let e = state_file::decode(&bytes).unwrap_err();
    assert!(matches!(e, CodecError::Newer { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "schema version {} is newer than this build reads (1..={}); upgrade the agent",
            state_file::SCHEMA + 1,
            state_file::SCHEMA
        )
    );
    let bytes = codec::encode(Kind::Reported, REPORTED_SCHEMA + 1, &0u8).unwrap();
    let e = decode_reported(&bytes).unwrap_err().to_string();
    assert!(e.ends_with("upgrade skiffctl"), "{e}");
    let bytes = codec::encode(Kind::SignedDesired, DESIRED_SCHEMA + 1, &0u8).unwrap();
    let e = peek_desired(&bytes).unwrap_err().to_string();
    assert!(e.contains(&format!("schema version {} is newer", DESIRED_SCHEMA + 1)), "{e}");
}

/// The same text `fixtures/v2/generate.rs` wrote the schema-2 fixtures from.
const APPS_V2: &str = r#"
[[app]]
name = "web"
image = "registry.local:5000/acme/web:2"
pull = "always"
command = ["httpd", "-f", "-p", "8080"]
env = { MODE = "prod" }
restart = "on-failure"
network = "host"
user = "1000:1000"
read_only_rootfs = true
cap_add = ["NET_BIND_SERVICE"]
cap_drop = ["CHOWN"]
stop_grace = "3s"
[app.resources]
memory = "32Mi"
[app.liveness]
http = { port = 8080, path = "/health" }
[app.readiness]
exec = ["cat", "/tmp/ready"]

[[app]]
name = "tool"
image = "busybox:1.36"
pull = "never"
no_new_privileges = false
network = "none"
[app.security]
seccomp = "unconfined"
"#;

fn expected_v2(generation: u64, origin: Origin) -> DesiredState {
    let mut s = toml_file::parse(APPS_V2).unwrap();
    s.generation = generation;
    s.origin = origin;
    s
}

#[test]
fn a_schema_2_state_file_reads_as_the_same_state_with_the_default_rollout() {
    let bytes = fixture_of("v2", "desired.skf");
    assert_eq!(bytes[5], 2, "the fixture is schema 2");
    let state = state_file::decode(&bytes).unwrap();
    assert_eq!(state, expected_v2(42, Origin::Local));
    assert_eq!(state.rollout, Rollout::default());
    assert_eq!(state.apps[0].pull, PullPolicy::Never);
    assert!(state.apps[1].security.read_only_rootfs);
    let again = state_file::encode(&state).unwrap();
    assert_eq!(again[5], 3);
    assert_eq!(state_file::decode(&again).unwrap(), state);
}

#[test]
fn a_schema_2_signed_desired_state_verifies_and_reads_as_the_same_state() {
    let bytes = fixture_of("v2", "desired.msg");
    assert_eq!(bytes[5], 2, "the fixture is schema 2");
    let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
    let device = DeviceId::try_from("pi-2").unwrap();
    let body = open_desired_body(&bytes, &device, &key).unwrap();
    assert_eq!(body.state, expected_v2(9, Origin::Controller));
    assert_eq!(body.replaces, None);
    let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
    assert!(open_desired_body(&bytes, &device, &other).is_err());
}

#[test]
fn a_schema_2_reported_state_reads_as_committed_at_its_generation() {
    let bytes = fixture_of("v2", "reported.msg");
    assert_eq!(bytes[5], 2, "the fixture is schema 2");
    let r = decode_reported(&bytes).unwrap();
    assert_eq!(r.generation_applied, 9);
    assert_eq!(r.device.to_string(), "pi-2");
    assert_eq!(r.apps.len(), 1);
    assert_eq!(r.apps[0].last_exit, Some(ExitInfo { code: None, signal: Some(9), oom_killed: true }));
    assert_eq!(r.pulls.len(), 1);
    assert_eq!(r.pulls[0].error.as_deref(), Some("connection reset"));
    assert_eq!(r.rollout, RolloutStatus { committed: 9, testing: None, failed: None });
}

#[test]
fn a_schema_1_event_reads_with_this_build() {
    let bytes = fixture_of("v2", "event.msg");
    assert_eq!(bytes[5], 1, "events were schema 1 in the release before rollouts");
    let e = skiff_common::protocol::decode_event(&bytes).unwrap();
    assert_eq!(e.kind, skiff_common::protocol::EventKind::Unhealthy);
    assert_eq!((e.session, e.seq, e.dropped_before), (77, 3, 1));
    assert_eq!(e.app.unwrap().to_string(), "web");
    let bytes = codec::encode(Kind::Event, skiff_common::protocol::EVENT_SCHEMA + 1, &0u8).unwrap();
    let e = skiff_common::protocol::decode_event(&bytes).unwrap_err().to_string();
    assert!(e.ends_with("upgrade skiffctl"), "{e}");
}

#[test]
fn a_schema_2_body_re_enveloped_as_schema_3_does_not_verify() {
    // The controller's schema-2 signature covers the schema-2 context only.
    let bytes = fixture_of("v2", "desired.msg");
    let (_, payload) = codec::open(&bytes, Kind::SignedDesired, 2..=2, 1 << 20).unwrap();
    let signed: skiff_common::protocol::SignedDesired = codec::decode_payload(payload).unwrap();
    let as_3 = codec::encode(Kind::SignedDesired, 3, &signed).unwrap();
    let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
    let device = DeviceId::try_from("pi-2").unwrap();
    let e = open_desired_body(&as_3, &device, &key).unwrap_err();
    assert!(e.to_string().contains("signature"), "{e}");
}
