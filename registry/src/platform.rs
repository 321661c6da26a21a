use std::fmt;

/// An OCI platform: `linux/arm64`, `linux/arm/v7`, `linux/amd64`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary was built for (an armv7 build says `linux/arm/v7`,
    /// an armv6 one `linux/arm/v6`).
    pub fn host() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "aarch64" => ("arm64", None),
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "arm" if cfg!(target_feature = "v7") => ("arm", Some("v7")),
            "arm" => ("arm", Some("v6")),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Platform { os: "linux".into(), architecture: arch.into(), variant: variant.map(str::to_string) }
    }

    /// Parses `os/arch[/variant]`, normalising the usual aliases (`aarch64` = `arm64`,
    /// `x86_64` = `amd64`, `armhf` = `arm/v7`, `armel` = `arm/v6`).
    pub fn parse(s: &str) -> Option<Platform> {
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty())?;
        let arch = parts.next().filter(|p| !p.is_empty())?;
        let variant = parts.next().filter(|p| !p.is_empty());
        if parts.next().is_some() {
            return None;
        }
        let (arch, implied) = match arch {
            "aarch64" => ("arm64", None),
            "x86_64" | "x86-64" => ("amd64", None),
            "armhf" => ("arm", Some("v7")),
            "armel" => ("arm", Some("v6")),
            a => (a, None),
        };
        let variant = variant.or(implied);
        Some(Platform { os: os.into(), architecture: arch.into(), variant: variant.map(str::to_string) })
    }

    /// How well an index entry for `other` runs here: `None` when it cannot run,
    /// else a rank where lower is better. An arm/v7 board also runs v6 and v5
    /// images (worse ranks); an entry with no variant ranks after an exact match.
    /// arm64 accepts `v8` or no variant.
    pub(crate) fn rank(&self, other: &Platform) -> Option<u32> {
        if self.os != other.os || self.architecture != other.architecture {
            return None;
        }
        let mine = self.variant.as_deref();
        let theirs = other.variant.as_deref();
        match self.architecture.as_str() {
            "arm" => {
                let level = |v: &str| v.strip_prefix('v').and_then(|n| n.parse::<u32>().ok());
                let mine = mine.and_then(level).unwrap_or(7);
                match theirs {
                    None => Some(50),
                    Some(v) => {
                        let theirs = level(v)?;
                        (theirs <= mine).then(|| mine - theirs)
                    }
                }
            }
            "arm64" => match theirs {
                None => Some(1),
                Some("v8") => Some(if mine == Some("v8") { 0 } else { 1 }),
                Some(v) if Some(v) == mine => Some(0),
                Some(_) => None,
            },
            _ => match (mine, theirs) {
                (_, None) => Some(0),
                (Some(a), Some(b)) if a == b => Some(0),
                (None, Some(_)) => Some(1),
                (Some(_), Some(_)) => None,
            },
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Platform::parse(s).ok_or_else(|| format!("{s:?} is not os/architecture[/variant]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn arm_variants() {
        let v7 = p("linux/arm/v7");
        assert_eq!(v7.rank(&p("linux/arm/v7")), Some(0));
        assert_eq!(v7.rank(&p("linux/arm/v6")), Some(1));
        assert_eq!(v7.rank(&p("linux/arm/v5")), Some(2));
        assert_eq!(v7.rank(&p("linux/arm/v8")), None);
        assert!(v7.rank(&p("linux/arm")).unwrap() > 2);
        assert_eq!(v7.rank(&p("linux/arm64")), None);
        let v6 = p("linux/arm/v6");
        assert_eq!(v6.rank(&p("linux/arm/v7")), None);
        assert_eq!(v6.rank(&p("linux/arm/v6")), Some(0));
        assert_eq!(p("linux/armhf"), v7);
    }

    #[test]
    fn arm64_and_amd64() {
        let a = p("linux/arm64");
        assert_eq!(a.rank(&p("linux/arm64/v8")), Some(1));
        assert_eq!(a.rank(&p("linux/arm64")), Some(1));
        assert_eq!(a.rank(&p("linux/amd64")), None);
        assert_eq!(p("linux/aarch64"), a);
        assert_eq!(p("linux/amd64").rank(&p("linux/amd64")), Some(0));
        assert_eq!(p("linux/amd64").rank(&p("windows/amd64")), None);
        assert!(Platform::parse("linux").is_none());
        assert!(Platform::parse("linux/arm/v7/x").is_none());
        assert_eq!(p("linux/arm/v7").to_string(), "linux/arm/v7");
    }
}
