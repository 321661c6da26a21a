use std::fmt;

/// An OCI platform: `linux/arm64`, `linux/arm/v7`, `linux/amd64`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on. On 32-bit arm the variant comes from
    /// the CPU (`/proc/cpuinfo`: ARMv7 or a v8 CPU in 32-bit mode -> `v7`,
    /// ARMv6 (Pi Zero / 1) -> `v6`); v7 when it cannot be read.
    pub fn host() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "aarch64" => ("arm64", None),
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "arm" => {
                let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
                ("arm", Some(arm_variant(&cpuinfo)))
            }
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

/// The OCI arm variant for a `/proc/cpuinfo`: `v6` when the model name says
/// ARMv6 (the Pi 1 / Zero's ARM1176 also says `CPU architecture: 7`), else from
/// the first `CPU architecture` line (`7`, `8`, `5TEJ`), `v7` when there is none.
fn arm_variant(cpuinfo: &str) -> &'static str {
    if cpuinfo.lines().any(|l| l.starts_with("model name") && (l.contains("ARMv6") || l.contains("(v6l)"))) {
        return "v6";
    }
    let level = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("CPU architecture")?.split_once(':').map(|(_, v)| v.trim()))
        .and_then(|v| v.chars().take_while(char::is_ascii_digit).collect::<String>().parse::<u32>().ok());
    match level {
        Some(0..=5) => "v5",
        Some(6) => "v6",
        _ => "v7",
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
    fn arm_variant_from_cpuinfo() {
        assert_eq!(arm_variant("processor\t: 0\nCPU architecture: 7\n"), "v7");
        assert_eq!(arm_variant("CPU architecture: 8\n"), "v7");
        assert_eq!(
            arm_variant("model name\t: ARMv6-compatible processor rev 7 (v6l)\nCPU architecture: 6\n"),
            "v6"
        );
        assert_eq!(arm_variant("CPU architecture: 5TEJ\n"), "v5");
        let zero = "model name\t: ARMv6-compatible processor rev 7 (v6l)\nCPU architecture: 7\n";
        assert_eq!(arm_variant(zero), "v6");
        assert_eq!(arm_variant(""), "v7");
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
