//! `fleet.toml`: named groups of devices, so `apply --group` reaches many.
//!
//! ```toml
//! [group.line-1]
//! devices = ["pi-001", "pi-002"]
//! ```
//! Unknown fields are refused and every device id is validated on load.

use serde::Deserialize;
use skiff_common::protocol::DeviceId;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FleetError {
    #[error("{0}")]
    Syntax(String),
    #[error("group {group:?}: {source}")]
    Device { group: String, source: skiff_common::protocol::ProtocolError },
    #[error("no group {0:?} in the fleet file (it has: {1})")]
    NoGroup(String, String),
    #[error("group {0:?} has no devices")]
    Empty(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    #[serde(default)]
    group: BTreeMap<String, RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    devices: Vec<String>,
}

/// The devices of `group` in `text`, sorted and without duplicates.
pub fn group_devices(text: &str, group: &str) -> Result<Vec<DeviceId>, FleetError> {
    let raw: RawFleet = toml::from_str(text).map_err(|e| FleetError::Syntax(e.to_string()))?;
    let Some(g) = raw.group.get(group) else {
        let names: Vec<_> = raw.group.keys().map(String::as_str).collect();
        let names = if names.is_empty() { "none".to_string() } else { names.join(", ") };
        return Err(FleetError::NoGroup(group.to_string(), names));
    };
    let mut out = g
        .devices
        .iter()
        .map(|d| DeviceId::try_from(d.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| FleetError::Device { group: group.to_string(), source })?;
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(FleetError::Empty(group.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str =
        "[group.line-1]\ndevices = [\"pi-2\", \"pi-1\", \"pi-2\"]\n\n[group.empty]\ndevices = []\n";

    #[test]
    fn groups_resolve_sorted_and_unique() {
        let d = group_devices(FLEET, "line-1").unwrap();
        assert_eq!(d.iter().map(|d| d.as_str()).collect::<Vec<_>>(), ["pi-1", "pi-2"]);
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(group_devices(FLEET, "empty"), Err(FleetError::Empty("empty".into())));
        let e = group_devices(FLEET, "line-2").unwrap_err().to_string();
        assert!(e.contains("\"line-2\"") && e.contains("empty, line-1"), "{e}");
        let e = group_devices("[group.g]\ndevices = [\"Pi/1\"]\n", "g").unwrap_err().to_string();
        assert!(e.contains("group \"g\"") && e.contains("Pi/1"), "{e}");
        assert!(matches!(group_devices("[group.g]\nhosts = []\n", "g"), Err(FleetError::Syntax(_))));
        assert!(matches!(group_devices("[groups]\n", "g"), Err(FleetError::Syntax(_))));
    }
}
