//! A state file that is well-formed (envelope, CRC, postcard) but breaks an
//! invariant of the desired state is refused by the running agent like a
//! corrupt one: what runs keeps running, the log names the app and field.
//! Before `DesiredState::validate` ran on every decode, the agent adopted it,
//! and the first stop of the app computed `Instant + stop_grace` and panicked.

use skiff_common::codec::{self, state_file, Kind};
use skiff_tests::agent::Sandbox;
use std::time::Duration;

#[test]
fn a_state_file_that_breaks_an_invariant_is_not_adopted() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    sb.apply("[[app]]\nname = \"keep\"\nimage = \"busybox:1\"\ncommand = [\"sleep\", \"600\"]\n");
    let running = sb.wait_running("keep");
    let gen = sb.ps()["generation"].as_u64().unwrap();

    // Written by hand, as a bug or a bad tool could: CRC-correct, schema
    // current, a changed command (so adopting it would stop the app) and a
    // stop grace no clock can add.
    let path = sb.state_dir().join("desired.skf");
    let mut state = state_file::decode(&std::fs::read(&path).unwrap()).unwrap();
    state.generation += 1;
    state.apps[0].command = Some(vec!["sleep".into(), "700".into()]);
    state.apps[0].stop_grace = Duration::MAX;
    let bytes = codec::encode(Kind::StateFile, state_file::SCHEMA, &state).unwrap();
    let tmp = sb.state_dir().join("by-hand.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    // The file watch reloads it; `skiff apply`'s poke is not needed.
    let why = "app \"keep\": stop_grace: must be at most 10m";
    skiff_tests::agent::wait_for(Duration::from_secs(10), "the refusal in the agent's log", || {
        sb.agent_log().contains(why).then_some(())
    });
    assert!(sb.agent_log().contains("invalid desired state"), "{}", sb.agent_log());
    let ps = sb.ps();
    assert_eq!(ps["generation"].as_u64(), Some(gen), "{ps}");
    let now = sb.app("keep");
    assert_eq!((now["phase"].as_str(), &now["pid"]), (Some("running"), &running["pid"]), "{now}");
    sb.kill_agent();
}
