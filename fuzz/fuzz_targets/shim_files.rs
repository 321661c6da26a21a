//! The files a shim and the agent hand each other (shim.json, started.json,
//! exit.json), read as the next agent reads them after a restart: any bytes
//! are refused or read, never a panic, and what is read writes back and
//! reads again to the same value. The first byte picks the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use skiff_agent::runtime::instance::{self, Exit, ShimConfig, Started, CONFIG, EXIT, STARTED};
use skiff_fuzz::Scratch;

fn round_trip<T>(dir: &std::path::Path, name: &str, data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    std::fs::write(dir.join(name), data).expect("write");
    if let Ok(Some(v)) = instance::read::<T>(dir, name) {
        let first = serde_json::to_value(&v).expect("a read value serialises");
        instance::write(dir, name, &v).expect("write back");
        let again: T = instance::read(dir, name).expect("reads back").expect("exists");
        assert_eq!(serde_json::to_value(&again).expect("serialises"), first);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let s = Scratch::new("shim");
    match which % 3 {
        0 => round_trip::<ShimConfig>(&s.0, CONFIG, rest),
        1 => round_trip::<Started>(&s.0, STARTED, rest),
        _ => round_trip::<Exit>(&s.0, EXIT, rest),
    }
});
