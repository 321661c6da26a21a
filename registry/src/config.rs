//! `registries.toml`: per-registry settings and credentials.
//!
//! ```toml
//! [[registry]]
//! host = "registry.example.com:5000"   # as in image references; "docker.io" for Docker Hub
//! username = "fleet"                   # basic auth, also sent to a bearer-token realm
//! password = "..."
//!
//! [[registry]]
//! host = "127.0.0.1:5000"
//! insecure = true                      # plain HTTP (never without this)
//!
//! [[registry]]
//! host = "ghcr.io"
//! token = "..."                        # a bearer token used as is
//! ca = "/etc/skiff/ghcr-ca.pem"        # extra trusted CA (PEM), besides the system's
//! ```
//!
//! The file holds secrets: it must be readable by its owner only when it has any.

use crate::error::Error;
use serde::Deserialize;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A credential. Never printed: `Debug` says `<secret>`, and there is no `Display`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself, for an Authorization header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// One registry's settings.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `host[:port]` as image references name it (`docker.io` for Docker Hub).
    pub host: String,
    /// Plain HTTP allowed (and used) for this registry.
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// A bearer token sent as is (instead of username/password).
    #[serde(default)]
    pub token: Option<Secret>,
    /// A PEM file of extra CA certificates to trust for this registry.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// All registries' settings.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistriesConfig {
    #[serde(default, rename = "registry")]
    pub registries: Vec<RegistryConfig>,
}

impl RegistriesConfig {
    /// Reads and checks `path`. A file that holds a password or token must not be
    /// readable or writable by group or others (refused, with the fix in the error).
    pub fn load(path: &Path) -> Result<RegistriesConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg = RegistriesConfig::parse(&text).map_err(|msg| Error::Config { path: path.into(), msg })?;
        let has_secrets = cfg.registries.iter().any(|r| r.password.is_some() || r.token.is_some());
        let mode = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.permissions().mode();
        if has_secrets && mode & 0o077 != 0 {
            return Err(Error::Config {
                path: path.into(),
                msg: format!(
                    "holds credentials but is readable by group or others (mode {:o}): chmod 600 it",
                    mode & 0o777
                ),
            });
        }
        Ok(cfg)
    }

    /// `load`, or no settings when the file does not exist.
    pub fn load_or_default(path: &Path) -> Result<RegistriesConfig, Error> {
        match path.try_exists() {
            Ok(false) => Ok(RegistriesConfig::default()),
            _ => RegistriesConfig::load(path),
        }
    }

    /// Parses the TOML text; the error names the line, column and field.
    pub fn parse(text: &str) -> Result<RegistriesConfig, String> {
        let cfg: RegistriesConfig = toml::from_str(text).map_err(|e| {
            // toml's message quotes the offending line, which may hold a secret:
            // keep only the position and the reason.
            let reason = e.message().to_string();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: {reason}")
                }
                None => reason,
            }
        })?;
        for (i, r) in cfg.registries.iter().enumerate() {
            let n = i + 1;
            if r.host.is_empty() || r.host.contains(['/', ' ', '@']) {
                return Err(format!("registry #{n}: host {:?} is not host[:port]", r.host));
            }
            if cfg.registries[..i].iter().any(|o| o.host == r.host) {
                return Err(format!("registry #{n}: host {} is listed twice", r.host));
            }
            if r.password.is_some() && r.username.is_none() {
                return Err(format!("registry {}: password without username", r.host));
            }
            if r.token.is_some() && r.username.is_some() {
                return Err(format!("registry {}: give username/password or token, not both", r.host));
            }
        }
        Ok(cfg)
    }

    /// The settings for `host` (`docker.io` for Docker Hub), if any.
    pub fn get(&self, host: &str) -> Option<&RegistryConfig> {
        self.registries.iter().find(|r| r.host == host)
    }

    /// Marks `host` insecure (the CLI's `--insecure`), adding an entry if needed.
    pub fn set_insecure(&mut self, host: &str) {
        match self.registries.iter_mut().find(|r| r.host == host) {
            Some(r) => r.insecure = true,
            None => self.registries.push(RegistryConfig {
                host: host.into(),
                insecure: true,
                ..Default::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_hides_secrets() {
        let cfg = RegistriesConfig::parse(
            "[[registry]]\nhost = \"127.0.0.1:5000\"\ninsecure = true\nusername = \"u\"\npassword = \"hunter2\"\n",
        )
        .unwrap();
        let r = cfg.get("127.0.0.1:5000").unwrap();
        assert!(r.insecure);
        assert_eq!(r.password.as_ref().unwrap().expose(), "hunter2");
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn errors_name_the_line_and_not_the_secret() {
        let e = RegistriesConfig::parse("[[registry]]\nhost = \"h\"\npasword = \"hunter2\"\n").unwrap_err();
        assert!(e.starts_with("line 3: "), "{e}");
        assert!(e.contains("pasword"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = RegistriesConfig::parse("[[registry]]\nhost = \"a/b\"\n").unwrap_err();
        assert!(e.contains("not host[:port]"), "{e}");
        let e = RegistriesConfig::parse("[[registry]]\nhost = \"h\"\npassword = \"x\"\n").unwrap_err();
        assert_eq!(e, "registry h: password without username");
    }

    #[test]
    fn refuses_a_readable_file_with_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("registries.toml");
        std::fs::write(&p, "[[registry]]\nhost = \"h\"\ntoken = \"t0ken\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = RegistriesConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600") && !e.contains("t0ken"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(RegistriesConfig::load(&p).is_ok());
        assert_eq!(
            RegistriesConfig::load_or_default(&dir.path().join("none")).unwrap(),
            RegistriesConfig::default()
        );
    }
}
