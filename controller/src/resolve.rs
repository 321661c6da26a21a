//! `skiffctl apply --resolve`: pin each app's image tag to the digest the registry
//! gives for it now, so that the signed state names `name@sha256:...`: the
//! controller's signature then covers the exact bits every device runs, and a tag
//! moved (or a registry changed) later cannot change what runs.
//!
//! Which images: those whose reference names a registry (`host[:port]/...`, also
//! `docker.io/...`) and pins no digest yet. Short names such as `busybox:1` are
//! also how sideloaded images are named, so they are left as written unless
//! `--resolve` is given explicitly (then they are Docker Hub names).
//!
//! Failures: with an explicit `--resolve` every failure stops the apply (nothing
//! is published). By default, a registry that cannot be reached leaves that
//! image's tag as written, with a warning (devices then resolve the tag when they
//! pull); any other failure (unknown tag, refused credentials, a manifest that
//! does not match its digest) stops the apply. `--no-resolve` publishes every
//! reference as written.

use anyhow::{bail, Result};
use clap::Args;
use skiff_common::{DesiredState, ImageRef};
use skiff_registry::{Client, ClientOptions, Error, RegistriesConfig, RetryPolicy};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ResolveArgs {
    /// Pin every app's image tag to its current digest, also Docker Hub short names
    /// (`busybox:1`); fail when a registry cannot be asked. Default: pin images
    /// whose reference names a registry, keep a tag whose registry is unreachable.
    #[arg(long, conflicts_with = "no_resolve")]
    resolve: bool,
    /// Publish image references exactly as written.
    #[arg(long = "no-resolve")]
    no_resolve: bool,
    /// Registry settings and credentials for resolving (registries.toml, the
    /// agent's format).
    #[arg(long, value_name = "FILE")]
    registries: Option<PathBuf>,
    /// Talk plain HTTP to this registry (host[:port]); repeat for several.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure: Vec<String>,
    /// How long to keep retrying a registry that does not answer.
    #[arg(long = "resolve-timeout", value_name = "SECONDS", default_value_t = 10)]
    resolve_timeout: u64,
}

#[cfg(test)]
impl Default for ResolveArgs {
    fn default() -> Self {
        ResolveArgs {
            resolve: false,
            no_resolve: false,
            registries: None,
            insecure: Vec::new(),
            resolve_timeout: 1,
        }
    }
}

/// One image pinned.
#[derive(Debug, PartialEq, Eq)]
pub struct Pinned {
    pub app: String,
    pub from: String,
    pub to: String,
}

/// Pins the images of `state` as `args` says; returns what changed, and prints a
/// warning for each tag kept because its registry was unreachable.
pub async fn pin_images(args: &ResolveArgs, state: &mut DesiredState) -> Result<Vec<Pinned>> {
    if args.no_resolve {
        return Ok(Vec::new());
    }
    let mut registries = match &args.registries {
        Some(p) => RegistriesConfig::load(p)?,
        None => RegistriesConfig::default(),
    };
    for h in &args.insecure {
        registries.set_insecure(h);
    }
    let client = Client::new(ClientOptions {
        registries,
        stall_timeout: Duration::from_secs(15),
        connect_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            budget: Duration::from_secs(args.resolve_timeout),
        },
        ..ClientOptions::default()
    });
    let mut pinned = Vec::new();
    let mut down: Vec<String> = Vec::new();
    for app in &mut state.apps {
        let image = &app.image;
        if image.digest().is_some() || !(args.resolve || image.names_registry()) {
            continue;
        }
        if down.iter().any(|h| h == image.registry()) {
            eprintln!(
                "skiffctl: warning: app {}: publishing {image} unpinned (registry unreachable)",
                app.name
            );
            continue;
        }
        let digest = match client.resolve_digest(image).await {
            Ok(d) => d,
            Err(e) if !args.resolve && unreachable(&e) => {
                eprintln!(
                    "skiffctl: warning: app {}: {e}; publishing {image} unpinned (devices resolve the tag)",
                    app.name
                );
                down.push(image.registry().to_string());
                continue;
            }
            Err(e) => {
                bail!("app {}: cannot pin {image}: {e} (--no-resolve publishes tags as written)", app.name)
            }
        };
        let to: ImageRef = image.with_digest(&digest)?;
        pinned.push(Pinned { app: app.name.to_string(), from: image.to_string(), to: to.to_string() });
        app.image = to;
    }
    Ok(pinned)
}

/// The registry could not be reached at all (as opposed to answering no).
fn unreachable(e: &Error) -> bool {
    match e {
        Error::Connect { .. } => true,
        Error::RetriesExhausted { last, .. } => unreachable(last),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_tests::registry::{busybox_layout, Registry};

    fn state(images: &[&str]) -> DesiredState {
        let mut toml = String::new();
        for (i, im) in images.iter().enumerate() {
            toml.push_str(&format!("[[app]]\nname = \"a{i}\"\nimage = \"{im}\"\n\n"));
        }
        skiff_common::toml_file::parse(&toml).expect("test apps.toml")
    }

    fn index_digest() -> String {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(busybox_layout().join("index.json")).unwrap()).unwrap();
        index["manifests"][0]["digest"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn pins_tags_that_name_a_registry() {
        let reg = Registry::start().unwrap();
        reg.push(&busybox_layout(), "1", "busybox:1", &[]).unwrap();
        let host = reg.host();
        let pinned_already = format!("{host}/busybox@{}", index_digest());
        let mut s = state(&[&format!("{host}/busybox:1"), "busybox:1", &pinned_already]);
        let args = ResolveArgs { insecure: vec![host.clone()], ..ResolveArgs::default() };
        let pins = pin_images(&args, &mut s).await.unwrap();
        let want = format!("{host}/busybox@{}", index_digest());
        assert_eq!(
            pins,
            vec![Pinned { app: "a0".into(), from: format!("{host}/busybox:1"), to: want.clone() }]
        );
        assert_eq!(s.apps[0].image.to_string(), want);
        assert_eq!(s.apps[1].image.to_string(), "busybox:1", "short names stay by default");
        assert_eq!(s.apps[2].image.to_string(), pinned_already);

        // An unknown tag stops the apply, naming the app, the registry and the reference.
        let mut s = state(&[&format!("{host}/busybox:2")]);
        let e = pin_images(&args, &mut s).await.unwrap_err().to_string();
        assert!(e.starts_with(&format!("app a0: cannot pin {host}/busybox:2: registry {host}: {host}/busybox:2: manifest 2 not found")), "{e}");

        // --no-resolve leaves everything.
        let mut s = state(&[&format!("{host}/busybox:1")]);
        let none = ResolveArgs { no_resolve: true, ..ResolveArgs::default() };
        assert!(pin_images(&none, &mut s).await.unwrap().is_empty());
        assert_eq!(s.apps[0].image.to_string(), format!("{host}/busybox:1"));
    }

    #[tokio::test]
    async fn unreachable_registry_keeps_the_tag_by_default_and_fails_with_resolve() {
        let port = skiff_tests::registry::free_port().unwrap();
        let image = format!("127.0.0.1:{port}/app:v1");
        let mut s = state(&[&image]);
        let args = ResolveArgs { insecure: vec![format!("127.0.0.1:{port}")], ..ResolveArgs::default() };
        assert!(pin_images(&args, &mut s).await.unwrap().is_empty());
        assert_eq!(s.apps[0].image.to_string(), image);
        let strict = ResolveArgs {
            resolve: true,
            insecure: vec![format!("127.0.0.1:{port}")],
            ..ResolveArgs::default()
        };
        let e = pin_images(&strict, &mut s).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "app a0: cannot pin {image}: registry 127.0.0.1:{port}: {image}: cannot connect"
            )),
            "{e}"
        );
    }
}
