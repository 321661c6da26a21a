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

/// An image reference as a user writes it: `name[:tag]` or `name@sha256:<hex>`.
/// `name` may carry a registry host and path (`127.0.0.1:5000/lib/busybox`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef {
    name: String,
    /// `:tag` or `@sha256:...`, without the separator.
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    /// The repository name, without tag or digest.
    pub fn name(&self) -> &str {
        &self.name
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
        if let Some(t) = &tag {
            let tag_ok = !t.is_empty()
                && t.len() <= 128
                && t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && !t.starts_with(['.', '-']);
            if !tag_ok {
                return Err(bad());
            }
        }
        Ok(ImageRef { name: name.to_string(), tag, digest })
    }
}

impl TryFrom<String> for ImageRef {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        ImageRef::try_from(s.as_str())
    }
}

impl From<ImageRef> for String {
    fn from(r: ImageRef) -> String {
        r.to_string()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
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
}
