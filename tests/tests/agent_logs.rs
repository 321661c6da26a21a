//! Per-app logs: captured from the container, capped and rotated, read back by
//! `skiff logs` with --tail and --follow.

use skiff_tests::agent::{wait_for, Sandbox};
use std::io::Read;
use std::time::Duration;

#[test]
fn logs_are_capped_rotated_and_followed() {
    let mut sb = Sandbox::new();
    sb.agent_args = vec!["--log-max-size".into(), "8Ki".into()];
    sb.start_agent();
    sb.apply(
        r#"
[[app]]
name = "chatty"
image = "busybox:1"
command = ["sh", "-c", "i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done; echo done >&2; exec sleep 600"]
"#,
    );
    wait_for(Duration::from_secs(20), "all output", || sb.logs("chatty").contains("done").then_some(()));
    let total: u64 = ["chatty.log", "chatty.log.1"]
        .iter()
        .map(|f| std::fs::metadata(sb.log_dir().join(f)).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(total <= 8 * 1024, "logs hold {total} bytes, over the 8Ki cap");
    assert!(sb.log_dir().join("chatty.log.1").exists(), "never rotated");
    let tail = String::from_utf8(sb.skiff(&["logs", "chatty", "--tail", "2"]).stdout).unwrap();
    assert_eq!(tail, "line 2999\ndone\n", "stdout and stderr both captured, in order");

    // --follow prints what the app writes next.
    sb.apply(
        r#"
[[app]]
name = "chatty"
image = "busybox:1"
command = ["sh", "-c", "sleep 1; echo after-follow; exec sleep 600"]
stop_grace = "1s"
"#,
    );
    let mut child = sb
        .cmd(&["logs", "chatty", "--follow", "--tail", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let mut got = String::new();
        while !got.contains("after-follow") {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        got
    });
    wait_for(Duration::from_secs(30), "followed output", || reader.is_finished().then_some(()));
    let text = reader.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("after-follow"), "{text}");
    // Unknown apps are an error, not an empty success.
    let out = sb.skiff(&["logs", "nosuchapp"]);
    assert!(!out.status.success());
}
