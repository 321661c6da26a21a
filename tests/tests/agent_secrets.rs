//! Secrets are not world-readable: the state dir, image store, run dir and
//! log dir are 0700, the desired state (and its previous generation) and the
//! logs 0600, whatever the umask, and an older install's readable files are
//! fixed when the agent starts. Checked as a user would, with stat.
//!
//! One test in this file: it sets the process-wide umask.

use nix::sys::stat::{umask, Mode};
use skiff_tests::agent::{wait_for, Sandbox};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).mode() & 0o7777
}

#[test]
fn secrets_are_private_whatever_the_umask_and_old_installs_are_fixed() {
    // Every skiff process of this test inherits the most permissive umask.
    umask(Mode::empty());
    let mut sb = Sandbox::new();
    let secret = r#"
[[app]]
name = "chatty"
image = "busybox:1"
command = ["sh", "-c", "i=0; while [ $i -lt 500 ]; do echo token $TOKEN line $i; i=$((i+1)); done; exec sleep 600"]
env = { TOKEN = "s3cret" }
"#;
    // Written with no agent running (the install before the agent's first start).
    sb.apply(secret);
    // What an older version left: readable dirs and files.
    let loosen = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    std::fs::create_dir_all(sb.log_dir()).unwrap();
    std::fs::write(sb.log_dir().join("old.log"), "token s3cret\n").unwrap();
    loosen(&sb.log_dir().join("old.log"), 0o644);
    loosen(&sb.log_dir(), 0o755);
    loosen(&sb.state_dir(), 0o755);
    loosen(&sb.state_dir().join("images"), 0o755);
    loosen(&sb.state_dir().join("desired.skf"), 0o644);

    sb.agent_args = vec!["--log-max-size".into(), "4Ki".into()];
    sb.start_agent();
    // A second generation: desired.prev.skf appears.
    sb.apply(&secret.replace("s3cret", "s3cret2"));
    sb.wait_running("chatty");
    wait_for(Duration::from_secs(20), "a rotated log", || {
        (sb.log_dir().join("chatty.log.1").exists() && sb.logs("chatty").contains("line 499")).then_some(())
    });

    for d in [sb.state_dir(), sb.state_dir().join("images"), sb.run_dir(), sb.log_dir()] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    for f in ["desired.skf", "desired.prev.skf"] {
        assert_eq!(mode(&sb.state_dir().join(f)), 0o600, "{f}");
    }
    for f in ["chatty.log", "chatty.log.1", "old.log"] {
        assert_eq!(mode(&sb.log_dir().join(f)), 0o600, "{f}");
    }
    // Nothing directly in these dirs is readable by others, whatever it is.
    for d in [sb.state_dir(), sb.log_dir(), sb.run_dir()] {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if !m.file_type().is_symlink() {
                assert_eq!(m.mode() & 0o077, 0, "{} is {:o}", e.path().display(), m.mode() & 0o7777);
            }
        }
    }
}
