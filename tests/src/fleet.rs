//! A controller and one device for end-to-end tests: a real mosquitto with the
//! shipped mTLS config, `skiffctl` with fresh keys, and an agent sandbox wired
//! to both.

use crate::agent::{skiffctl_bin, Sandbox};
use crate::mqtt::{Broker, CONTROLLER};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

pub struct Fleet {
    pub broker: Broker,
    pub keys: tempfile::TempDir,
    pub device: String,
}

impl Fleet {
    pub fn new(device: &str) -> Fleet {
        let broker = Broker::start(&[device]).expect("mosquitto");
        let keys = tempfile::tempdir().unwrap();
        let out = Command::new(skiffctl_bin()).arg("keygen").arg("--out").arg(keys.path()).output().unwrap();
        assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
        Fleet { broker, keys, device: device.to_string() }
    }

    /// The broker and TLS flags of every skiffctl command.
    pub fn tls(&self) -> Vec<String> {
        let b = &self.broker;
        let p = |p: &Path| p.display().to_string();
        vec![
            "--broker".into(),
            b.controller_url(),
            "--ca".into(),
            p(&b.ca()),
            "--cert".into(),
            p(&b.cert(CONTROLLER)),
            "--tls-key".into(),
            p(&b.key(CONTROLLER)),
        ]
    }

    pub fn skiffctl(&self, args: &[&str]) -> Output {
        Command::new(skiffctl_bin()).args(args).args(self.tls()).output().expect("skiffctl")
    }

    /// `skiffctl apply` of `toml` to the device, signed with the controller key, with `extra` flags.
    pub fn apply(&self, dir: &Path, toml: &str, extra: &[&str]) -> Output {
        self.apply_signed(dir, toml, &self.keys.path().join("controller.key"), extra)
    }

    /// `skiffctl apply` signed with another key (a forgery, as the device sees it).
    pub fn apply_with_key(&self, dir: &Path, toml: &str, key: &Path) -> Output {
        self.apply_signed(dir, toml, key, &[])
    }

    fn apply_signed(&self, dir: &Path, toml: &str, key: &Path, extra: &[&str]) -> Output {
        let f = dir.join("fleet-apps.toml");
        std::fs::write(&f, toml).unwrap();
        let (f, key) = (f.display().to_string(), key.display().to_string());
        let mut args = vec!["apply", "-f", &f, "--device", &self.device, "--key", &key];
        args.extend_from_slice(extra);
        self.skiffctl(&args)
    }

    /// This device's entry of `skiffctl status --json`.
    pub fn status(&self) -> Value {
        let out = self.skiffctl(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        let all: Value = serde_json::from_slice(&out.stdout).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == self.device.as_str())
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// `skiffctl events --json` drained with a persistent session `client`.
    pub fn events(&self, client: &str) -> Vec<Value> {
        let out = self.skiffctl(&["events", "--json", "--client-id", client]);
        assert!(out.status.success(), "events: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// A sandbox whose agent talks to this broker as the device.
    pub fn agent(&self) -> Sandbox {
        let mut sb = Sandbox::new();
        let b = &self.broker;
        sb.agent_args = vec![
            "--backoff-base".into(),
            "300ms".into(),
            "--backoff-max".into(),
            "2s".into(),
            "--mqtt-broker".into(),
            b.device_url(),
            "--device".into(),
            self.device.clone(),
            "--controller-key".into(),
            self.keys.path().join("controller.pub").display().to_string(),
            "--mqtt-ca".into(),
            b.ca().display().to_string(),
            "--mqtt-cert".into(),
            b.cert(&self.device).display().to_string(),
            "--mqtt-key".into(),
            b.key(&self.device).display().to_string(),
            "--mqtt-keepalive".into(),
            "2s".into(),
        ];
        sb
    }
}
