//! Validated names. An `AppName` becomes a directory name, a container id and a
//! cgroup name, so it is checked once here and trusted everywhere after.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("app name is empty")]
    Empty,
    #[error("app name {0:?} is longer than 63 characters")]
    TooLong(String),
    #[error("app name {0:?} may only hold a-z, 0-9 and '-', and must start and end with a letter or digit")]
    BadChars(String),
    #[error("image reference {0:?} is not name[:tag] or name@sha256:<64 hex digits>")]
    BadImage(String),
}

/// An app's name: 1-63 of `[a-z0-9-]`, starting and ending with a letter or digit
/// (a DNS label, so it is safe as a path component and a cgroup name).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AppName(String);

impl AppName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for AppName {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > 63 {
            return Err(NameError::TooLong(s.to_string()));
        }
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if !s.chars().all(ok_char) || s.starts_with('-') || s.ends_with('-') {
            return Err(NameError::BadChars(s.to_string()));
        }
        Ok(AppName(s.to_string()))
    }
}

impl TryFrom<String> for AppName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        AppName::try_from(s.as_str())
    }
}

impl From<AppName> for String {
    fn from(n: AppName) -> String {
        n.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// An image reference as a user writes it: `name[:tag]`, `name@sha256:<hex>` or
/// `name:tag@sha256:<hex>`. `name` may start with a registry host, with a port
/// (`127.0.0.1:5000/lib/busybox`): its first component is a host when it holds a `.`
/// or a `:` or is `localhost`, as Docker reads it. Without a host the image is on
/// Docker Hub, and a one-component name is in `library/`.
///
/// Docker Hub names are kept in their short ("familiar") form, so `busybox`,
/// `busybox:latest`, `library/busybox` and `docker.io/library/busybox:latest` are
/// equal, have `name() == "busybox"`, and hash alike. The text as written is kept
/// for `Display` and serialisation, so a state file round-trips byte for byte.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef {
    /// The reference as written (it parsed).
    raw: String,
    /// Familiar name: Docker Hub's `docker.io/` and `library/` prefixes removed.
    name: String,
    /// The tag as written, without the `:`.
    tag: Option<String>,
    /// `sha256:<hex>`, without the `@`.
    digest: Option<String>,
}

/// Docker Hub, as `registry()` names it.
pub const DOCKER_HUB: &str = "docker.io";

impl ImageRef {
    /// The repository name, without tag or digest, in familiar form: `busybox`,
    /// `someone/app`, `127.0.0.1:5000/app` (Docker Hub's `docker.io/` and
    /// `library/` prefixes removed). Store keys use it.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The registry host, with its port if one was given: `docker.io` for Docker Hub.
    pub fn registry(&self) -> &str {
        match self.host_split() {
            Some((host, _)) => host,
            None => DOCKER_HUB,
        }
    }
    /// Whether the reference names its registry (`host/...`, `docker.io/...`)
    /// rather than being a short name such as `busybox:1`, which is also how
    /// sideloaded images are named.
    pub fn names_registry(&self) -> bool {
        let written = self.raw.split(['@']).next().unwrap_or("");
        written.split_once('/').is_some_and(|(first, _)| is_host(first))
    }
    /// The repository path within the registry: `library/busybox` for `busybox`,
    /// `app` for `127.0.0.1:5000/app`.
    pub fn repository(&self) -> std::borrow::Cow<'_, str> {
        match self.host_split() {
            Some((_, path)) => path.into(),
            None if !self.name.contains('/') => format!("library/{}", self.name).into(),
            None => self.name.as_str().into(),
        }
    }
    /// The tag; `latest` when neither a tag nor a digest was given.
    pub fn tag(&self) -> Option<&str> {
        match (&self.tag, &self.digest) {
            (Some(t), _) => Some(t),
            (None, None) => Some("latest"),
            (None, Some(_)) => None,
        }
    }
    /// `sha256:<hex>` when the reference pins a digest.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }
    /// What a registry's manifest endpoint is asked for: the digest when pinned
    /// (a digest wins over a tag), else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest().or(self.tag()).unwrap_or("latest")
    }
    /// The fully qualified form: `docker.io/library/busybox:latest`,
    /// `127.0.0.1:5000/app@sha256:...`.
    pub fn canonical(&self) -> String {
        let mut s = format!("{}/{}", self.registry(), self.repository());
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        } else if self.tag.is_none() {
            s.push_str(":latest");
        }
        s
    }
    /// This reference pinned to `digest` (`sha256:<hex>`), tag dropped:
    /// `name@sha256:...` as written (host kept).
    pub fn with_digest(&self, digest: &str) -> Result<ImageRef, NameError> {
        let written = self.raw.split('@').next().unwrap_or(&self.raw);
        let written_name = match &self.tag {
            Some(t) => &written[..written.len().saturating_sub(t.len() + 1)],
            None => written,
        };
        ImageRef::try_from(format!("{written_name}@{digest}"))
    }

    /// `(host, path)` when the name starts with a registry host other than Docker Hub.
    fn host_split(&self) -> Option<(&str, &str)> {
        let (first, rest) = self.name.split_once('/')?;
        is_host(first).then_some((first, rest))
    }

    fn key(&self) -> (&str, Option<&str>, Option<&str>) {
        (&self.name, self.tag(), self.digest())
    }
}

/// Docker's rule: the first component of a name is a registry host when it holds a
/// `.` or a `:`, or is `localhost`.
fn is_host(first: &str) -> bool {
    first.contains(['.', ':']) || first == "localhost"
}

/// `docker.io/library/busybox` -> `busybox`; `index.docker.io/x/y` -> `x/y`.
fn familiar(name: &str) -> &str {
    let mut n = name;
    for hub in ["docker.io/", "index.docker.io/", "registry-1.docker.io/"] {
        if let Some(rest) = n.strip_prefix(hub) {
            n = rest;
            break;
        }
    }
    let first_is_host = n.split_once('/').is_some_and(|(first, _)| is_host(first));
    if !first_is_host {
        if let Some(rest) = n.strip_prefix("library/") {
            if !rest.contains('/') {
                n = rest;
            }
        }
    }
    n
}

impl PartialEq for ImageRef {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for ImageRef {}
impl std::hash::Hash for ImageRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state)
    }
}
impl PartialOrd for ImageRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ImageRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl TryFrom<&str> for ImageRef {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        let bad = || NameError::BadImage(s.to_string());
        let (rest, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let hex = d.strip_prefix("sha256:").ok_or_else(bad)?;
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
                    return Err(bad());
                }
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A ':' after the last '/' separates the tag; one before it is a registry port.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(rest[i + 1..].to_string())),
            _ => (rest, None),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 255
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c))
            && !name.starts_with(['/', '.', '-'])
            && !name.ends_with('/')
            && !name.contains("//")
            && !name.split('/').any(|p| p == ".." || p == ".");
        if !name_ok {
            return Err(bad());
        }
        // A ':' is a port separator, so only in the host component, once, before digits.
        let components: Vec<&str> = name.split('/').collect();
        for (i, c) in components.iter().enumerate() {
            if let Some((host, port)) = c.split_once(':') {
                let host_ok = i == 0 && components.len() > 1 && !host.is_empty();
                let port_ok = !port.is_empty() && port.len() <= 5 && port.chars().all(|c| c.is_ascii_digit());
                if !host_ok || !port_ok {
                    return Err(bad());
                }
            }
        }
        let familiar = familiar(name);
        // `docker.io/x` alone (nothing after the hub prefix) is not a name.
        if familiar.is_empty() || familiar.ends_with('/') {
            return Err(bad());
        }
        if let Some(t) = &tag {
            let tag_ok = !t.is_empty()
                && t.len() <= 128
                && t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && !t.starts_with(['.', '-']);
            if !tag_ok {
                return Err(bad());
            }
        }
        Ok(ImageRef { raw: s.to_string(), name: familiar.to_string(), tag, digest })
    }
}

impl TryFrom<String> for ImageRef {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        ImageRef::try_from(s.as_str())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        ImageRef::try_from(s)
    }
}

impl From<ImageRef> for String {
    fn from(r: ImageRef) -> String {
        r.raw
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names() {
        for ok in ["web", "a", "web-1", "0x", &"a".repeat(63)] {
            assert!(AppName::try_from(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "-web", "web-", "we_b", "we/b", "..", "a.b", &"a".repeat(64)] {
            assert!(AppName::try_from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_refs() {
        let r = ImageRef::try_from("busybox:1").unwrap();
        assert_eq!((r.name(), r.tag(), r.digest()), ("busybox", Some("1"), None));
        let r = ImageRef::try_from("busybox").unwrap();
        assert_eq!(r.tag(), Some("latest"));
        let r = ImageRef::try_from("127.0.0.1:5000/lib/busybox").unwrap();
        assert_eq!((r.name(), r.tag()), ("127.0.0.1:5000/lib/busybox", Some("latest")));
        let d = format!("busybox@sha256:{}", "a".repeat(64));
        let r = ImageRef::try_from(d.as_str()).unwrap();
        assert_eq!(r.digest().unwrap().len(), 71);
        assert_eq!(r.to_string(), d);
        for bad in ["", "Busybox", "busybox:", "busybox@sha256:abc", "../x", "/x", "a//b", "x:t t"] {
            assert!(ImageRef::try_from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn registry_hosts_and_repositories() {
        let cases = [
            ("busybox", "docker.io", "library/busybox", "busybox", "latest"),
            ("busybox:1.36", "docker.io", "library/busybox", "busybox", "1.36"),
            ("library/busybox", "docker.io", "library/busybox", "busybox", "latest"),
            ("docker.io/library/busybox:latest", "docker.io", "library/busybox", "busybox", "latest"),
            ("index.docker.io/someone/app:v1", "docker.io", "someone/app", "someone/app", "v1"),
            ("someone/app", "docker.io", "someone/app", "someone/app", "latest"),
            ("127.0.0.1:5000/app:v2", "127.0.0.1:5000", "app", "127.0.0.1:5000/app", "v2"),
            (
                "127.0.0.1:5000/library/app",
                "127.0.0.1:5000",
                "library/app",
                "127.0.0.1:5000/library/app",
                "latest",
            ),
            ("localhost/a/b:c", "localhost", "a/b", "localhost/a/b", "c"),
            ("ghcr.io/org/img:1", "ghcr.io", "org/img", "ghcr.io/org/img", "1"),
        ];
        for (s, registry, repo, name, tag) in cases {
            let r = ImageRef::try_from(s).unwrap();
            assert_eq!(
                (r.registry(), r.repository().as_ref(), r.name(), r.tag()),
                (registry, repo, name, Some(tag)),
                "{s}"
            );
            assert_eq!(r.to_string(), s, "written form kept");
        }
        for bad in ["host:50x0/app", "a/b:1/c", "docker.io/", "x:1:2/a"] {
            assert!(ImageRef::try_from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_registry() {
        for (s, named) in [
            ("busybox:1", false),
            ("library/busybox", false),
            ("docker.io/library/busybox:1", true),
            ("127.0.0.1:5000/app", true),
            ("localhost/app", true),
            ("someone/app", false),
        ] {
            assert_eq!(ImageRef::try_from(s).unwrap().names_registry(), named, "{s}");
        }
    }

    #[test]
    fn docker_hub_forms_are_equal() {
        let short = ImageRef::try_from("busybox").unwrap();
        let forms =
            ["busybox:latest", "library/busybox", "docker.io/library/busybox:latest", "docker.io/busybox"];
        for f in forms {
            let r = ImageRef::try_from(f).unwrap();
            assert_eq!(r, short, "{f}");
            assert_eq!(r.canonical(), "docker.io/library/busybox:latest");
        }
        assert_ne!(short, ImageRef::try_from("busybox:1").unwrap());
        assert_ne!(short, ImageRef::try_from("127.0.0.1:5000/busybox").unwrap());
        use std::collections::HashSet;
        let set: HashSet<ImageRef> = forms.iter().map(|f| ImageRef::try_from(*f).unwrap()).collect();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn digest_pins() {
        let hex = "0123456789abcdef".repeat(4);
        let r = ImageRef::try_from(format!("127.0.0.1:5000/app:v2@sha256:{hex}")).unwrap();
        assert_eq!((r.tag(), r.manifest_reference()), (Some("v2"), format!("sha256:{hex}").as_str()));
        let pinned = ImageRef::try_from("127.0.0.1:5000/app:v2")
            .unwrap()
            .with_digest(&format!("sha256:{hex}"))
            .unwrap();
        assert_eq!(pinned.to_string(), format!("127.0.0.1:5000/app@sha256:{hex}"));
        assert_eq!(pinned.registry(), "127.0.0.1:5000");
        let hub = ImageRef::try_from("busybox").unwrap().with_digest(&format!("sha256:{hex}")).unwrap();
        assert_eq!(hub.canonical(), format!("docker.io/library/busybox@sha256:{hex}"));
        assert!(ImageRef::try_from("busybox").unwrap().with_digest("sha256:zz").is_err());
    }

    #[test]
    fn serde_keeps_the_written_form() {
        let r = ImageRef::try_from("docker.io/library/busybox:1").unwrap();
        assert_eq!(String::from(r.clone()), "docker.io/library/busybox:1");
        assert_eq!(r.name(), "busybox");
    }
}
