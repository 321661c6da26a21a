//! SD-card provisioning (images/provision.sh) without loop devices: a small Raspberry Pi
//! OS style image (MBR, FAT boot partition with cmdline.txt, ext4 root with a dpkg
//! database and usrmerge symlinks) is made here from partition files, two devices are
//! provisioned from a CSV, and both images are read back with debugfs and mtools.

use skiff_tests::agent::{busybox_image, repo, skiff_bin, skiffctl_bin};
use skiff_tests::packaging::{deb, ext4_cat, ext4_stat, fat_cat, output, run};
use std::path::{Path, PathBuf};
use std::process::Command;

const SECTOR: u64 = 512;
const BOOT_START: u64 = 2048;
const BOOT_SECTORS: u64 = 16 * 2048; // 16 MiB
const ROOT_START: u64 = BOOT_START + BOOT_SECTORS;
const ROOT_SECTORS: u64 = 96 * 2048; // 96 MiB: the agent, its state and a busybox image
const CMDLINE: &str =
    "console=serial0,115200 console=tty1 root=PARTUUID=feedbeef-02 rootfstype=ext4 fsck.repair=yes rootwait quiet";

/// A fake Raspberry Pi OS image in `dir`: partitions built as files (mkfs.vfat, mkfs.ext4
/// -d), then placed into a disk with an MBR from sfdisk.
fn pi_os_image(dir: &Path) -> PathBuf {
    let boot_dir = dir.join("boot-files");
    std::fs::create_dir_all(&boot_dir).unwrap();
    std::fs::write(boot_dir.join("cmdline.txt"), format!("{CMDLINE}\n")).unwrap();
    std::fs::write(boot_dir.join("config.txt"), "arm_64bit=1\n").unwrap();
    let boot = dir.join("boot.part");
    run("truncate", Command::new("truncate").arg("-s").arg(format!("{}", BOOT_SECTORS * SECTOR)).arg(&boot));
    run("mkfs.vfat", Command::new("mkfs.vfat").args(["-n", "BOOTFS"]).arg(&boot));
    for f in ["cmdline.txt", "config.txt"] {
        run("mcopy", Command::new("mcopy").arg("-i").arg(&boot).arg(boot_dir.join(f)).arg(format!("::{f}")));
    }

    let root = dir.join("root-files");
    for d in [
        "usr/bin",
        "usr/lib/systemd/system",
        "etc/systemd/system/multi-user.target.wants",
        "var/lib/dpkg/info",
        "var/lib/systemd",
        "home/pi",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    std::fs::write(root.join("etc/hostname"), "raspberrypi\n").unwrap();
    std::fs::write(
        root.join("var/lib/dpkg/status"),
        "Package: base-files\nStatus: install ok installed\nPriority: required\nVersion: 12.4+deb12u5\nArchitecture: arm64\nDescription: base\n\n",
    )
    .unwrap();
    let rootfs = dir.join("root.part");
    run(
        "truncate",
        Command::new("truncate").arg("-s").arg(format!("{}", ROOT_SECTORS * SECTOR)).arg(&rootfs),
    );
    run(
        "mkfs.ext4",
        Command::new("mkfs.ext4").args(["-q", "-F", "-L", "rootfs", "-d"]).arg(&root).arg(&rootfs),
    );

    let img = dir.join("raspios.img");
    run(
        "truncate",
        Command::new("truncate").arg("-s").arg(format!("{}", (ROOT_START + ROOT_SECTORS) * SECTOR)).arg(&img),
    );
    let table = format!(
        "label: dos\nlabel-id: 0xfeedbeef\nstart={BOOT_START}, size={BOOT_SECTORS}, type=c\nstart={ROOT_START}, size={ROOT_SECTORS}, type=83\n"
    );
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.arg("-q").arg(&img).stdin(std::process::Stdio::piped());
    let mut child = sfdisk.spawn().expect("sfdisk (scripts/deps.sh installs fdisk)");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), table.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "sfdisk");
    for (part, start) in [(&boot, BOOT_START), (&rootfs, ROOT_START)] {
        run(
            "dd",
            Command::new("dd")
                .arg(format!("if={}", part.display()))
                .arg(format!("of={}", img.display()))
                .args(["bs=512", &format!("seek={start}"), "conv=notrunc,sparse", "status=none"]),
        );
    }
    img
}

/// An operator's CA (P-256, as the shipped broker config uses).
fn ca(dir: &Path) -> (PathBuf, PathBuf) {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    run(
        "openssl req -x509",
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .args(["-days", "30", "-subj", "/CN=fleet-ca"])
            .args([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]),
    );
    (crt, key)
}

#[test]
fn two_devices_from_a_csv_get_their_own_identity_the_agent_enabled_and_their_apps_offline() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let base = pi_os_image(dir);
    let (ca_crt, ca_key) = ca(dir);
    run("skiffctl keygen", Command::new(skiffctl_bin()).arg("keygen").arg("--out").arg(dir.join("keys")));
    std::fs::write(
        dir.join("devices.csv"),
        "device,broker\r\npi-0001\n\n# the second line is on its own broker\npi-0002,mqtts://line2.example.internal:8883\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("apps.toml"),
        "[[app]]\nname = \"ticker\"\nimage = \"busybox:1\"\npull = \"never\"\ncommand = [\"sh\", \"-c\", \"while true; do date; sleep 5; done\"]\n",
    )
    .unwrap();
    let out_dir = dir.join("out");
    let provision = |extra: &[&str]| {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("images/provision.sh"))
            .arg("--image")
            .arg(&base)
            .arg("--devices")
            .arg(dir.join("devices.csv"))
            .arg("--out")
            .arg(&out_dir)
            .arg("--deb")
            .arg(deb("skiff", "arm64"))
            .arg("--ca")
            .arg(&ca_crt)
            .arg("--ca-key")
            .arg(&ca_key)
            .arg("--controller-pub")
            .arg(dir.join("keys/controller.pub"))
            .args(["--broker", "mqtts://broker.example.internal:8883"])
            .arg("--state")
            .arg(dir.join("apps.toml"))
            .arg("--load")
            .arg(busybox_image())
            .arg("--skiff")
            .arg(skiff_bin())
            .args(extra);
        output("images/provision.sh", &mut cmd)
    };
    let out = provision(&[]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "provision.sh: {said}");

    let root_off = ROOT_START * SECTOR;
    let boot_off = BOOT_START * SECTOR;
    let base_bytes = std::fs::read(&base).unwrap();
    let mut keys = Vec::new();
    for (id, broker) in [
        ("pi-0001", "mqtts://broker.example.internal:8883"),
        ("pi-0002", "mqtts://line2.example.internal:8883"),
    ] {
        let img = out_dir.join(format!("{id}.img"));
        assert_eq!(
            std::fs::metadata(&img).unwrap().len(),
            base_bytes.len() as u64,
            "{id}: same size as the base"
        );
        let stat = |p: &str| ext4_stat(&img, root_off, p).unwrap_or_else(|| panic!("{id}: {p} is missing"));
        let text = |p: &str| String::from_utf8(ext4_cat(&img, root_off, p)).unwrap();

        // The agent from the .deb, its unit, enabled; the package is known to dpkg.
        assert_eq!(
            ext4_cat(&img, root_off, "/usr/bin/skiff"),
            std::fs::read(skiff_tests::packaging::cross_bins("arm64").join("skiff")).unwrap()
        );
        let bin = stat("/usr/bin/skiff");
        assert_eq!((bin.mode, bin.uid, bin.gid), (0o755, 0, 0), "{id}: {bin:?}");
        assert!(text("/lib/systemd/system/skiff.service").contains("ExecStart=/usr/bin/skiff agent"));
        let wants = stat("/etc/systemd/system/multi-user.target.wants/skiff.service");
        assert_eq!(wants.kind, "symlink");
        assert_eq!(wants.link.as_deref(), Some("/lib/systemd/system/skiff.service"));
        let status = text("/var/lib/dpkg/status");
        assert!(status.contains("Package: base-files\n"), "{id}: the base's packages stay:\n{status}");
        assert!(status.contains("Package: skiff\nStatus: install ok installed\n"), "{id}:\n{status}");
        assert!(status.contains("Architecture: arm64"), "{id}:\n{status}");
        assert!(text("/var/lib/dpkg/info/skiff.list").lines().any(|l| l == "/usr/bin/skiff"));

        // Its own identity and link.
        let env = text("/etc/skiff/agent.env");
        for line in [
            format!("SKIFF_DEVICE={id}"),
            format!("SKIFF_MQTT_BROKER={broker}"),
            "SKIFF_CONTROLLER_KEY=/etc/skiff/controller.pub".into(),
            "SKIFF_MQTT_CA=/etc/skiff/ca.crt".into(),
            "SKIFF_MQTT_CERT=/etc/skiff/device.crt".into(),
            "SKIFF_MQTT_KEY=/etc/skiff/device.key".into(),
        ] {
            assert!(env.lines().any(|l| l == line), "{id}: agent.env lacks {line}:\n{env}");
        }
        let key = stat("/etc/skiff/device.key");
        assert_eq!(
            (key.kind.as_str(), key.mode, key.uid, key.gid),
            ("regular", 0o600, 0, 0),
            "{id}: the key is root-only"
        );
        let etc = stat("/etc/skiff");
        assert_eq!((etc.mode, etc.uid, etc.gid), (0o755, 0, 0));
        for f in [
            "/etc/skiff/device.crt",
            "/etc/skiff/ca.crt",
            "/etc/skiff/controller.pub",
            "/etc/skiff/agent.env",
        ] {
            let s = stat(f);
            assert_eq!((s.mode, s.uid, s.gid), (0o644, 0, 0), "{id}: {f}");
        }
        assert_eq!(
            text("/etc/skiff/controller.pub"),
            std::fs::read_to_string(dir.join("keys/controller.pub")).unwrap()
        );
        assert_eq!(text("/etc/skiff/ca.crt"), std::fs::read_to_string(&ca_crt).unwrap());
        let crt = dir.join(format!("{id}.crt"));
        std::fs::write(&crt, ext4_cat(&img, root_off, "/etc/skiff/device.crt")).unwrap();
        let subject = run(
            "openssl x509",
            Command::new("openssl")
                .args(["x509", "-noout", "-subject", "-ext", "extendedKeyUsage", "-in"])
                .arg(&crt),
        );
        assert!(
            subject.contains(&format!("CN = {id}")) && subject.contains("TLS Web Client Authentication"),
            "{subject}"
        );
        run("openssl verify", Command::new("openssl").arg("verify").arg("-CAfile").arg(&ca_crt).arg(&crt));
        // The key in the image is the certificate's.
        let keyfile = dir.join(format!("{id}.key"));
        std::fs::write(&keyfile, ext4_cat(&img, root_off, "/etc/skiff/device.key")).unwrap();
        let pub_of_key =
            run("openssl pkey", Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(&keyfile));
        let pub_of_crt =
            run("openssl x509", Command::new("openssl").args(["x509", "-noout", "-pubkey", "-in"]).arg(&crt));
        assert_eq!(pub_of_key, pub_of_crt, "{id}: device.key matches device.crt");
        keys.push(pub_of_key);

        // The desired state and the image, stored as the agent reads them, root-only.
        let state_dir = stat("/var/lib/skiff");
        assert_eq!((state_dir.mode, state_dir.uid), (0o700, 0));
        let desired = stat("/var/lib/skiff/desired.skf");
        assert_eq!((desired.mode, desired.uid), (0o600, 0));
        let state_copy = dir.join(format!("{id}-state"));
        std::fs::create_dir_all(&state_copy).unwrap();
        std::fs::write(
            state_copy.join("desired.skf"),
            ext4_cat(&img, root_off, "/var/lib/skiff/desired.skf"),
        )
        .unwrap();
        let refs = text("/var/lib/skiff/images/refs.json");
        assert!(refs.contains("busybox:1") || refs.contains("busybox"), "{id}: refs.json:\n{refs}");
        assert!(refs.contains("arm64"), "{id}: the arm64 image was loaded for the arm64 board:\n{refs}");
        let sh = stat_in_rootfs(&img, root_off, "/bin/busybox");
        assert_eq!(sh.kind, "regular", "{id}: the image's rootfs is unpacked into the state dir");

        // The memory cgroup on the kernel command line, once.
        let cmdline = fat_cat(&img, boot_off, "cmdline.txt");
        assert_eq!(cmdline, format!("{CMDLINE} cgroup_enable=memory cgroup_memory=1\n"), "{id}");
        assert_eq!(fat_cat(&img, boot_off, "config.txt"), "arm_64bit=1\n");
        let fsck = output(
            "e2fsck",
            Command::new("e2fsck").arg("-fn").arg(format!("{}?offset={root_off}", img.display())),
        );
        assert!(fsck.status.success(), "{id}: e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
    }
    assert_ne!(keys[0], keys[1], "each device has its own key");

    // The stored state reads back as the agent will read it: the ticker app.
    let loaded = skiff_agent::store::StateStore::new(&dir.join("pi-0001-state")).load().unwrap();
    let apps: Vec<&str> = loaded.state.apps.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(apps, ["ticker"]);
    assert!(loaded.state.generation > 0);

    // A second run leaves the images alone; --force rewrites them, and cmdline.txt keeps
    // one copy of the parameters.
    let again = provision(&[]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists: skipped"));
    let again = provision(&["--force"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let cmdline = fat_cat(&out_dir.join("pi-0001.img"), boot_off, "cmdline.txt");
    assert_eq!(cmdline.matches("cgroup_enable=memory").count(), 1, "{cmdline}");
}

/// A file inside the unpacked rootfs of the one image in the store.
fn stat_in_rootfs(img: &Path, off: u64, path: &str) -> skiff_tests::packaging::Ext4Stat {
    let listing = output(
        "debugfs ls",
        Command::new("debugfs")
            .arg("-R")
            .arg("ls -p /var/lib/skiff/images/rootfs")
            .arg(format!("{}?offset={off}", img.display())),
    );
    let text = String::from_utf8_lossy(&listing.stdout);
    let dir = text
        .lines()
        .filter_map(|l| l.split('/').nth(5))
        .find(|n| !n.is_empty() && *n != "." && *n != "..")
        .unwrap_or_else(|| panic!("no rootfs in the store: {text}"))
        .to_string();
    ext4_stat(img, off, &format!("/var/lib/skiff/images/rootfs/{dir}{path}"))
        .unwrap_or_else(|| panic!("{path} not in rootfs {dir}"))
}

#[test]
fn bad_device_lists_are_refused_before_anything_is_written() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    for f in ["base.img", "ca.crt", "ca.key", "controller.pub", "skiff.deb"] {
        std::fs::write(dir.join(f), "x").unwrap();
    }
    for (csv, want) in [
        ("pi-0001\npi-0001\n", "listed twice"),
        ("Pi_0001\n", "is not a device id"),
        ("skiffctl\n", "controller's certificate name"),
        ("pi-1,ftp://x\n", "expected mqtts://"),
        ("# nobody\n", "lists no device"),
    ] {
        std::fs::write(dir.join("devices.csv"), csv).unwrap();
        let out = output(
            "provision.sh",
            Command::new("bash")
                .arg(repo().join("images/provision.sh"))
                .current_dir(dir)
                .args([
                    "--image",
                    "base.img",
                    "--devices",
                    "devices.csv",
                    "--out",
                    "out",
                    "--deb",
                    "skiff.deb",
                ])
                .args(["--ca", "ca.crt", "--ca-key", "ca.key", "--controller-pub", "controller.pub"])
                .args(["--broker", "mqtts://broker:8883"]),
        );
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains(want), "{csv:?}: {said}");
        assert!(!dir.join("out").exists(), "{csv:?}: nothing written");
    }
}
