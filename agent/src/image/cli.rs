//! `skiff image load` and `skiff image ls`: output for people (a table) or for programs
//! (`--json`: an array of `ImageInfo`). The lead wires these into clap.

use super::{ImageInfo, ImageStore};
use skiff_common::ImageRef;
use std::path::Path;

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
}
