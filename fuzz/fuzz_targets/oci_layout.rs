//! An OCI image layout as `skiff image load` reads it, directory or tar: the
//! input is four texts (index.json, manifest, config, layer tar) separated by
//! "\n--\n", with digests and sizes filled in by the harness (see
//! skiff_fuzz). Any layout loads or fails cleanly, never a panic, and what
//! loads is listed and resolves.
#![no_main]
use libfuzzer_sys::fuzz_target;
use skiff_fuzz::{load_and_check, write_layout, Scratch};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut rest = rest;
    while parts.len() < 3 {
        match rest.windows(4).position(|w| w == b"\n--\n") {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 4..];
            }
            None => break,
        }
    }
    parts.push(rest);
    let default_config = skiff_fuzz::config();
    let get = |i: usize, d: &'static [u8]| parts.get(i).copied().unwrap_or(d);
    let index = get(0, skiff_fuzz::INDEX.as_bytes());
    let manifest = get(1, skiff_fuzz::MANIFEST.as_bytes());
    let config = parts.get(2).copied().unwrap_or(default_config.as_bytes());
    let layer = get(3, b"");
    let s = Scratch::new("oci");
    let layout = write_layout(&s.0, index, manifest, config, layer, mode & 1 == 1);
    load_and_check(&s.0, &layout);
});
