//! The Debian packages (packaging/build-deb.sh): what the amd64 and arm64 .debs hold, that
//! lintian finds no error in them, and a whole life in a throwaway root with dpkg --root
//! (install, upgrade keeping a changed agent.env and the state, remove, purge leaving no
//! stray file), where no systemd runs: the maintainer scripts must not fail there.

use skiff_tests::agent::repo;
use skiff_tests::packaging::{cross_bins, deb, output, run, version};
use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    run("dpkg-deb", Command::new("dpkg-deb").args(args).arg(deb))
}

/// `dpkg-deb --contents` as (path, permissions) pairs: `./usr/bin/skiff` -> `-rwxr-xr-x root/root`.
fn contents(deb: &Path) -> Vec<(String, String)> {
    dpkg_deb(&["--contents"], deb)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[5].to_string(), format!("{} {}", f[0], f[1]))
        })
        .collect()
}

#[test]
fn the_debs_hold_the_static_agent_the_unit_and_a_default_agent_env_as_conffile() {
    for (arch, elf) in [("amd64", "x86-64"), ("arm64", "ARM aarch64")] {
        let skiff = deb("skiff", arch);
        let info = dpkg_deb(&["--info"], &skiff);
        for want in
            ["Package: skiff".to_string(), format!("Architecture: {arch}"), format!("Version: {}", version())]
        {
            assert!(info.lines().any(|l| l.trim() == want), "{arch}: --info lacks {want}:\n{info}");
        }
        for script in ["postinst", "prerm", "postrm", "conffiles"] {
            assert!(info.contains(script), "{arch}: no {script} in:\n{info}");
        }
        let files = contents(&skiff);
        for (path, perms) in [
            ("./usr/bin/skiff", "-rwxr-xr-x root/root"),
            ("./lib/systemd/system/skiff.service", "-rw-r--r-- root/root"),
            ("./etc/skiff/agent.env", "-rw-r--r-- root/root"),
            ("./usr/share/doc/skiff/copyright", "-rw-r--r-- root/root"),
            ("./usr/share/doc/skiff/changelog.gz", "-rw-r--r-- root/root"),
        ] {
            assert!(
                files.iter().any(|(p, m)| p == path && m == perms),
                "{arch}: {path} {perms} not in:\n{files:?}"
            );
        }
        assert!(
            !files.iter().any(|(p, _)| p.contains("skiffctl")),
            "{arch}: the board package holds no skiffctl"
        );
        assert!(!files.iter().any(|(p, _)| p.starts_with("./usr/local")), "{arch}: nothing under /usr/local");

        let x = tempfile::tempdir().unwrap();
        run("dpkg-deb -x", Command::new("dpkg-deb").arg("-x").arg(&skiff).arg(x.path()));
        run("dpkg-deb -e", Command::new("dpkg-deb").arg("-e").arg(&skiff).arg(x.path().join("DEBIAN")));
        assert_eq!(
            std::fs::read_to_string(x.path().join("DEBIAN/conffiles")).unwrap(),
            "/etc/skiff/agent.env\n"
        );
        let file = run("file", Command::new("file").arg("-b").arg(x.path().join("usr/bin/skiff")));
        assert!(file.contains(elf) && file.contains("static"), "{arch}: usr/bin/skiff is {file}");
        assert_eq!(
            std::fs::read(x.path().join("usr/bin/skiff")).unwrap(),
            std::fs::read(cross_bins(arch).join("skiff")).unwrap(),
            "{arch}: the packaged skiff is cross/build.sh's"
        );
        // The packaged unit is the shipped one, starting /usr/bin/skiff.
        let unit = std::fs::read_to_string(x.path().join("lib/systemd/system/skiff.service")).unwrap();
        let shipped = std::fs::read_to_string(repo().join("systemd/skiff.service")).unwrap();
        assert_eq!(unit, shipped.replace("ExecStart=/usr/local/bin/skiff ", "ExecStart=/usr/bin/skiff "));
        assert!(unit.lines().any(|l| l == "ExecStart=/usr/bin/skiff agent"));
        // The default agent.env sets nothing (local state only) and names every link option.
        let env = std::fs::read_to_string(x.path().join("etc/skiff/agent.env")).unwrap();
        assert!(env.lines().all(|l| l.is_empty() || l.starts_with('#')), "agent.env sets nothing:\n{env}");
        for var in [
            "SKIFF_MQTT_BROKER",
            "SKIFF_DEVICE",
            "SKIFF_CONTROLLER_KEY",
            "SKIFF_MQTT_CERT",
            "SKIFF_STATE_DIR",
        ] {
            assert!(env.contains(&format!("#{var}=")), "agent.env mentions {var}");
        }

        let ctl = contents(&deb("skiffctl", arch));
        assert!(ctl.iter().any(|(p, m)| p == "./usr/bin/skiffctl" && m == "-rwxr-xr-x root/root"), "{ctl:?}");
        assert!(!ctl.iter().any(|(p, _)| p.contains("/etc/") || p.ends_with("/skiff")), "{ctl:?}");
    }
    // The packaged unit verifies with the binary where it says.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    run("dpkg-deb -x", Command::new("dpkg-deb").arg("-x").arg(deb("skiff", "amd64")).arg(r));
    run("cp", Command::new("cp").arg("-r").arg("/lib/systemd/system").arg(r.join("lib/systemd")));
    let out = output(
        "systemd-analyze",
        Command::new("systemd-analyze")
            .arg("--man=no")
            .arg(format!("--root={}", r.display()))
            .arg("verify")
            .arg(r.join("lib/systemd/system/skiff.service")),
    );
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}

#[test]
fn lintian_finds_no_error_in_the_debs() {
    let all: Vec<PathBuf> =
        ["amd64", "arm64"].iter().flat_map(|a| [deb("skiff", a), deb("skiffctl", a)]).collect();
    let out = output("lintian", Command::new("lintian").arg("--no-tag-display-limit").args(&all));
    let said = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = said.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    // lintian exits 1 on errors, 2 when it could not run.
    assert!(out.status.code() == Some(0), "lintian: {}\n{said}", String::from_utf8_lossy(&out.stderr));
}

/// A bare root dpkg can install into: busybox for the maintainer scripts (dpkg runs them
/// chrooted into --root), /dev/null, an empty dpkg database and the systemd directories a
/// Debian root has.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in [
            "bin",
            "dev",
            "var/lib/dpkg/info",
            "var/lib/dpkg/updates",
            "etc/systemd/system/multi-user.target.wants",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("var/lib/dpkg/status"), "").unwrap();
        let busybox = ["/bin/busybox", "/usr/bin/busybox"].into_iter().find(|p| Path::new(p).exists());
        std::fs::copy(busybox.expect("busybox-static (scripts/deps.sh)"), r.join("bin/busybox")).unwrap();
        for applet in ["sh", "mkdir", "chmod", "ln", "rm", "rmdir", "cat"] {
            std::os::unix::fs::symlink("busybox", r.join("bin").join(applet)).unwrap();
        }
        nix::sys::stat::mknod(
            &r.join("dev/null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        Root { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    fn dpkg(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", self.dir.path().display())).arg("--force-not-root").args(args);
        run(&format!("dpkg {}", args.join(" ")), cmd.env("DEBIAN_FRONTEND", "noninteractive"))
    }

    fn status(&self) -> String {
        std::fs::read_to_string(self.path("var/lib/dpkg/status")).unwrap()
    }

    /// Every path in the root but dpkg's own database, with its type and mode.
    fn tree(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(self.dir.path()).unwrap().display().to_string();
                if rel.starts_with("var/lib/dpkg") {
                    continue;
                }
                let md = std::fs::symlink_metadata(&p).unwrap();
                out.insert(format!("{rel} {:o}", md.mode()));
                if md.is_dir() {
                    stack.push(p);
                }
            }
        }
        out
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn install_upgrade_remove_and_purge_in_a_root_without_systemd() {
    let v1 = deb("skiff", "amd64");
    // The next version, from the same binaries.
    let next = tempfile::tempdir().unwrap();
    run(
        "build-deb.sh --version 99.0.1",
        Command::new("bash")
            .arg(repo().join("packaging/build-deb.sh"))
            .arg("--out")
            .arg(next.path())
            .args(["--version", "99.0.1", "--bin-dir"])
            .arg(cross_bins("amd64"))
            .arg("amd64"),
    );
    let v2 = next.path().join("skiff_99.0.1_amd64.deb");

    let root = Root::new();
    let before = root.tree();
    root.dpkg(&["-i", v1.to_str().unwrap()]);
    assert!(root.status().contains("Package: skiff\nStatus: install ok installed\n"), "{}", root.status());
    assert_eq!(mode(&root.path("usr/bin/skiff")), 0o755);
    assert_eq!(std::fs::metadata(root.path("usr/bin/skiff")).unwrap().uid(), 0);
    assert_eq!(mode(&root.path("var/lib/skiff")), 0o700, "the state dir is root-only");
    assert_eq!(mode(&root.path("etc/skiff/agent.env")), 0o644);
    assert_eq!(mode(&root.path("lib/systemd/system/skiff.service")), 0o644);
    let wants = root.path("etc/systemd/system/multi-user.target.wants/skiff.service");
    assert_eq!(
        std::fs::read_link(&wants).expect("postinst enabled the unit"),
        Path::new("/lib/systemd/system/skiff.service")
    );
    let conffiles = std::fs::read_to_string(root.path("var/lib/dpkg/info/skiff.conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/skiff/agent.env");

    // The admin configures the link; the agent has stored a state.
    let env = "SKIFF_MQTT_BROKER=mqtts://broker.example:8883\nSKIFF_DEVICE=pi-0042\n";
    std::fs::write(root.path("etc/skiff/agent.env"), env).unwrap();
    std::fs::write(root.path("var/lib/skiff/desired.skf"), b"state").unwrap();

    root.dpkg(&["-i", v2.to_str().unwrap()]);
    assert!(root.status().contains("Version: 99.0.1"), "{}", root.status());
    assert_eq!(
        std::fs::read_to_string(root.path("etc/skiff/agent.env")).unwrap(),
        env,
        "upgrade keeps agent.env"
    );
    assert!(
        !root.path("etc/skiff/agent.env.dpkg-new").exists()
            && !root.path("etc/skiff/agent.env.dpkg-old").exists()
    );
    assert_eq!(
        std::fs::read(root.path("var/lib/skiff/desired.skf")).unwrap(),
        b"state",
        "upgrade keeps the state"
    );
    assert_eq!(mode(&root.path("var/lib/skiff")), 0o700);
    assert!(std::fs::read_link(&wants).is_ok(), "upgrade keeps the unit enabled");

    // The admin disables the unit; an upgrade does not enable it again.
    std::fs::remove_file(&wants).unwrap();
    root.dpkg(&["-i", v1.to_str().unwrap()]);
    assert!(std::fs::read_link(&wants).is_err(), "a downgrade/upgrade keeps the unit disabled");
    std::os::unix::fs::symlink("/lib/systemd/system/skiff.service", &wants).unwrap();

    root.dpkg(&["-r", "skiff"]);
    assert!(!root.path("usr/bin/skiff").exists() && !root.path("lib/systemd/system/skiff.service").exists());
    assert_eq!(
        std::fs::read_to_string(root.path("etc/skiff/agent.env")).unwrap(),
        env,
        "remove keeps conffiles"
    );
    assert!(root.path("var/lib/skiff/desired.skf").exists(), "remove keeps the state");

    root.dpkg(&["-P", "skiff"]);
    let after = root.tree();
    assert_eq!(
        after.symmetric_difference(&before).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "purge leaves the root as it was"
    );
    assert!(!root.status().contains("Package: skiff"), "{}", root.status());
}
