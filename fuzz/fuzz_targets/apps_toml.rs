//! The desired-state file people write: any text parses or yields errors with
//! positions inside the text, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use skiff_common::toml_file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(errs) = toml_file::parse(text) {
        let lines = text.lines().count().max(1);
        for e in errs {
            assert!(e.line >= 1 && e.line <= lines + 1, "{e} outside {lines} lines");
        }
    }
});
