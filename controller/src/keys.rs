//! The controller's key pair on disk. The secret key never leaves the
//! controller machine; the public key is provisioned on every device.

use anyhow::{Context, Result};
use clap::Args;
use skiff_common::protocol::{parse_secret_key, public_key_text, secret_key_text, KeyId, SigningKey};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const SECRET_FILE: &str = "controller.key";
pub const PUBLIC_FILE: &str = "controller.pub";

#[derive(Args)]
pub struct KeygenArgs {
    /// Directory to write controller.key and controller.pub into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace existing key files (devices trusting the old key will refuse new states).
    #[arg(long)]
    force: bool,
}

pub fn keygen(args: &KeygenArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let secret = args.out.join(SECRET_FILE);
    let public = args.out.join(PUBLIC_FILE);
    write_new(&secret, &secret_key_text(&key), 0o600, args.force)?;
    write_new(&public, &public_key_text(&key.verifying_key()), 0o644, args.force)?;
    println!("key id {}", KeyId::of(&key.verifying_key()));
    println!("secret key: {} (keep it on this machine)", secret.display());
    println!("public key: {} (install it on every device)", public.display());
    Ok(())
}

fn write_new(path: &Path, text: &str, mode: u32, force: bool) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).with_context(|| {
        if path.exists() && !force {
            format!("{} exists; use --force to replace it", path.display())
        } else {
            format!("cannot write {}", path.display())
        }
    })?;
    // An existing file keeps its mode when replaced: set it.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Reads the secret key `skiffctl keygen` wrote.
pub fn read_secret(path: &Path) -> Result<SigningKey> {
    let text = crate::localfile::read_to_string(path, crate::localfile::KEY_LIMIT)?;
    parse_secret_key(&text).map_err(|e| crate::ConfigError(format!("{}: {e}", path.display())).into())
}
