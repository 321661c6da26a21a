//! The Debian packages and the SD-card images, for tests: builds the static binaries
//! (cross/build.sh) and the .debs (packaging/build-deb.sh) once per test process, and small
//! helpers that run a tool and read a file out of a disk image without mounting it.

use crate::agent::repo;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// Runs `cmd`; panics with its output unless it succeeds. Returns stdout.
pub fn run(what: &str, cmd: &mut Command) -> String {
    let out = output(what, cmd);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` to completion, whatever its exit status.
pub fn output(what: &str, cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"))
}

/// The packages' version as the workspace sets it.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// A directory holding skiff_<v>_{amd64,arm64}.deb and skiffctl_<v>_{amd64,arm64}.deb,
/// built from the static binaries of this tree (cross/build.sh x86_64 aarch64, skipped when
/// `SKIFF_CROSS_PREBUILT` is set: the binaries in the target dir's cross/ are used as they are).
pub fn debs() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        std::panic::catch_unwind(|| {
            let root = repo();
            if std::env::var_os("SKIFF_CROSS_PREBUILT").is_none() {
                run(
                    "cross/build.sh x86_64 aarch64",
                    Command::new("bash").arg(root.join("cross/build.sh")).args(["x86_64", "aarch64"]),
                );
            }
            let out = target_dir().join("tmp/packaging-debs");
            let _ = std::fs::remove_dir_all(&out);
            run(
                "packaging/build-deb.sh amd64 arm64",
                Command::new("bash")
                    .arg(root.join("packaging/build-deb.sh"))
                    .arg("--out")
                    .arg(&out)
                    .args(["amd64", "arm64"]),
            );
            out
        })
        .map_err(|e| {
            e.downcast_ref::<String>().cloned().unwrap_or_else(|| "building the .debs panicked".into())
        })
    });
    match dir {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

/// The path of package `name` (skiff or skiffctl) for `arch` in [`debs`].
pub fn deb(name: &str, arch: &str) -> PathBuf {
    debs().join(format!("{name}_{}_{arch}.deb", version()))
}

/// Where the static binaries of a Debian architecture are (cross/build.sh's output).
pub fn cross_bins(arch: &str) -> PathBuf {
    let triple = match arch {
        "amd64" => "x86_64-unknown-linux-gnu",
        "arm64" => "aarch64-unknown-linux-musl",
        "armhf" => "armv7-unknown-linux-gnueabihf",
        other => panic!("no cross target for {other}"),
    };
    target_dir().join("cross").join(triple)
}

/// The workspace's target dir, as cross/build.sh finds it.
fn target_dir() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
    if target.is_absolute() {
        target
    } else {
        repo().join(target)
    }
}

/// A file of an ext4 file system at byte `offset` of `image`, read with debugfs.
pub fn ext4_cat(image: &Path, offset: u64, path: &str) -> Vec<u8> {
    let out = output(
        "debugfs cat",
        Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(at(image, offset)),
    );
    assert!(out.status.success(), "debugfs cat {path}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// An inode's attributes as debugfs `stat` prints them: (type, mode, uid, gid), or None
/// when the path does not exist. Symlinks give their target as the type's detail.
pub fn ext4_stat(image: &Path, offset: u64, path: &str) -> Option<Ext4Stat> {
    let out = output(
        "debugfs stat",
        Command::new("debugfs").arg("-R").arg(format!("stat {path}")).arg(at(image, offset)),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<String> {
        let i = text.find(name)? + name.len();
        text[i..].split_whitespace().next().map(str::to_string)
    };
    let kind = field("Type:")?;
    let mode = u32::from_str_radix(&field("Mode:")?, 8).ok()?;
    let uid = field("User:")?.parse().ok()?;
    let gid = field("Group:")?.parse().ok()?;
    let link = text.find("Fast link dest: \"").map(|i| {
        let rest = &text[i + 17..];
        rest[..rest.find('"').unwrap_or(rest.len())].to_string()
    });
    Some(Ext4Stat { kind, mode, uid, gid, link })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Stat {
    /// debugfs's word: regular, directory, symlink, ...
    pub kind: String,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A symlink's target.
    pub link: Option<String>,
}

/// A file of the FAT file system at byte `offset` of `image`, read with mtype.
pub fn fat_cat(image: &Path, offset: u64, path: &str) -> String {
    run(
        "mtype",
        Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(format!("{}@@{offset}", image.display()))
            .arg(format!("::{path}")),
    )
}

fn at(image: &Path, offset: u64) -> String {
    format!("{}?offset={offset}", image.display())
}
