//! `skiff image load`, `ls`, `pull` and `check`: output for people (a table, a progress
//! line on a terminal) or for programs (`--json`, no progress).

use super::{pull, ImageInfo, ImageStore, PullPolicy, PullProgress};
use skiff_common::ImageRef;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokio::time::{Duration, Instant};

/// How the agent and `skiff image pull` reach registries and bound the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullConfig {
    /// registries.toml (credentials, insecure registries); absent means defaults.
    pub registries: PathBuf,
    /// Download cap in bytes per second, for all pulls of the process.
    pub rate: Option<u64>,
    /// Bytes the image store may take (blobs, rootfs, partial downloads).
    pub budget: Option<u64>,
    /// Registries (`host[:port]`) to reach over plain HTTP besides those the file marks.
    pub insecure: Vec<String>,
    /// How long one pull keeps retrying a registry without progress before it fails
    /// (`None`: the client's default). The agent fails sooner and tries again later,
    /// so that a person sees why a pull does not move.
    pub retry_budget: Option<std::time::Duration>,
}

impl PullConfig {
    /// A registry client for this configuration (reads the registries file).
    pub fn client(&self) -> Result<skiff_registry::Client, skiff_registry::Error> {
        let mut registries = skiff_registry::RegistriesConfig::load_or_default(&self.registries)?;
        for host in &self.insecure {
            registries.set_insecure(host);
        }
        let mut opts = skiff_registry::ClientOptions {
            registries,
            rate: self.rate.map(skiff_registry::RateLimiter::new),
            ..Default::default()
        };
        if let Some(budget) = self.retry_budget {
            opts.retry.budget = budget;
        }
        Ok(skiff_registry::Client::new(opts))
    }
}

/// `256KiB/s`, `1M/s`, `100k`, `65536`: bytes per second, more than zero.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let t = t.strip_suffix('B').unwrap_or(t);
    let n =
        skiff_common::quantity::parse_bytes(t).map_err(|e| format!("{s:?}: {e} (write e.g. 256KiB/s)"))?;
    if n == 0 {
        return Err(format!("{s:?}: a rate must be more than zero"));
    }
    Ok(n)
}

/// `skiff image pull`: `insecure` allows plain HTTP to this reference's registry.
pub fn cli_pull(
    store: &ImageStore,
    cfg: &PullConfig,
    reference: &str,
    insecure: bool,
    json: bool,
) -> anyhow::Result<()> {
    let r = ImageRef::try_from(reference)?;
    let mut cfg = cfg.clone();
    if insecure {
        cfg.insecure.push(r.registry().to_string());
    }
    let client = cfg.client()?;
    let show = !json && std::io::stdout().is_terminal();
    let bar = Bar::new(r.to_string());
    let progress = |p: PullProgress| {
        if show {
            bar.update(p);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let pulled = rt.block_on(pull(store, &client, &r, PullPolicy::Always, &progress));
    if show {
        bar.finish();
    }
    let info = pulled?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!(
            "Pulled {} ({}, {}, {})",
            info.reference,
            short(&info.digest),
            info.platform,
            human(info.size)
        );
    }
    Ok(())
}

pub fn cli_check(store: &ImageStore, json: bool) -> anyhow::Result<()> {
    let report = store.check()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            println!("problem: {p}");
        }
        let usage = report.usage.map(|u| human(u.total)).unwrap_or_else(|| "?".into());
        println!(
            "{} references, {} images, {} blobs ({} unreferenced), {} partial downloads, {usage} on disk: {}",
            report.references,
            report.images,
            report.blobs,
            report.unreferenced_blobs,
            report.partial_downloads,
            if report.ok { "ok" } else { "PROBLEMS" }
        );
    }
    if !report.ok {
        anyhow::bail!(
            "the image store at {} has {} problem(s)",
            store.dir().display(),
            report.problems.len()
        );
    }
    Ok(())
}

/// One progress line, redrawn at most 5 times a second: bytes, rate, ETA.
struct Bar {
    name: String,
    state: Mutex<BarState>,
}

struct BarState {
    start: Instant,
    /// Bytes already on disk when the pull began (a resumed download).
    first: Option<u64>,
    drawn: Option<Instant>,
    last: PullProgress,
}

impl Bar {
    fn new(name: String) -> Bar {
        let state = BarState {
            start: Instant::now(),
            first: None,
            drawn: None,
            last: PullProgress { done: 0, total: 0 },
        };
        Bar { name, state: Mutex::new(state) }
    }

    fn update(&self, p: PullProgress) {
        let Ok(mut s) = self.state.lock() else { return };
        let now = Instant::now();
        s.first.get_or_insert(p.done);
        s.last = p;
        if s.drawn.is_some_and(|d| now.duration_since(d) < Duration::from_millis(200)) && p.done < p.total {
            return;
        }
        s.drawn = Some(now);
        let line = progress_line(
            &self.name,
            p,
            p.done.saturating_sub(s.first.unwrap_or(0)),
            now.duration_since(s.start),
        );
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r{line}\x1b[K");
        let _ = out.flush();
    }

    fn finish(&self) {
        let drawn = self.state.lock().map(|s| s.drawn.is_some()).unwrap_or(false);
        if drawn {
            println!();
        }
    }
}

/// `name: 12.0 MB / 40.0 MB  1.2 MB/s  ETA 23s`; `fresh` bytes came in `elapsed`.
fn progress_line(name: &str, p: PullProgress, fresh: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { fresh as f64 / secs } else { 0.0 };
    let left = p.total.saturating_sub(p.done);
    let eta = if left == 0 {
        "done".to_string()
    } else if rate >= 1.0 {
        format!("ETA {}", eta_text(left as f64 / rate))
    } else {
        "ETA -".to_string()
    };
    format!("{name}: {} / {}  {}/s  {eta}", human(p.done), human(p.total), human(rate as u64))
}

fn eta_text(secs: f64) -> String {
    let s = secs.ceil().min(360_000.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn cli_load(store: &ImageStore, path: &Path, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let name = name.map(ImageRef::try_from).transpose()?;
    let loaded = store.load(path, name.as_ref())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&loaded)?);
    } else {
        for i in &loaded {
            println!("Loaded {} ({}, {}, {})", i.reference, short(&i.digest), i.platform, human(i.size));
        }
    }
    Ok(())
}

pub fn cli_ls(store: &ImageStore, json: bool) -> anyhow::Result<()> {
    let images = store.list()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&images)?);
    } else {
        print!("{}", table(&images));
    }
    Ok(())
}

fn table(images: &[ImageInfo]) -> String {
    let rows: Vec<[String; 4]> = images
        .iter()
        .map(|i| [i.reference.clone(), short(&i.digest).to_string(), i.platform.clone(), human(i.size)])
        .collect();
    let head = ["REFERENCE", "DIGEST", "PLATFORM", "SIZE"].map(String::from);
    let mut width = [0; 4];
    for row in std::iter::once(&head).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&head).chain(&rows) {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The first 12 hex digits, as docker and podman show them.
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "kB", "MB", "GB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lines_up() {
        let i = ImageInfo {
            reference: "busybox:1".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 2_020_000,
            platform: "linux/amd64".into(),
        };
        assert_eq!(
            table(&[i]),
            "REFERENCE  DIGEST        PLATFORM     SIZE\nbusybox:1  abababababab  linux/amd64  2.0 MB\n"
        );
        assert_eq!(human(999), "999 B");
    }

    #[test]
    fn rates_parse_with_units() {
        assert_eq!(parse_rate("256KiB/s"), Ok(256 * 1024));
        assert_eq!(parse_rate("1M/s"), Ok(1_000_000));
        assert_eq!(parse_rate("2MiB"), Ok(2 << 20));
        assert_eq!(parse_rate("65536"), Ok(65536));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("99999999999999999999Gi/s").is_err());
    }

    #[test]
    fn progress_line_shows_bytes_rate_and_eta() {
        let p = PullProgress { done: 3_000_000, total: 5_000_000 };
        // 1 MB arrived in 1 s (2 MB were on disk already): 2 MB left at 1 MB/s.
        assert_eq!(
            progress_line("x:1", p, 1_000_000, Duration::from_secs(1)),
            "x:1: 3.0 MB / 5.0 MB  1.0 MB/s  ETA 2s"
        );
        assert_eq!(eta_text(3725.0), "1h02m");
        let done = PullProgress { done: 5, total: 5 };
        assert_eq!(progress_line("x", done, 0, Duration::ZERO), "x: 5 B / 5 B  0 B/s  done");
    }
}
