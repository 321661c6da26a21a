//! A layer tar as the unpacker applies it (inside a valid layout whose
//! digests the harness computes): any tar applies or fails cleanly, never a
//! panic, and nothing lands outside the store (`..`, absolute names,
//! symlinked parents, hardlinks out).
#![no_main]
use libfuzzer_sys::fuzz_target;
use skiff_fuzz::{config, load_and_check, write_layout, Scratch, INDEX, MANIFEST};

fuzz_target!(|data: &[u8]| {
    let s = Scratch::new("layer");
    let layout = write_layout(&s.0, INDEX.as_bytes(), MANIFEST.as_bytes(), config().as_bytes(), data, false);
    load_and_check(&s.0, &layout);
});
