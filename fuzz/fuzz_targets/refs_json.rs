//! The image store's refs.json as read from flash: any bytes are refused as
//! corrupt or read, never a panic; every listed image resolves or fails
//! cleanly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use skiff_agent::image::ImageStore;
use skiff_fuzz::Scratch;

fuzz_target!(|data: &[u8]| {
    let s = Scratch::new("refs");
    let dir = s.0.join("store");
    let store = ImageStore::open(&dir).expect("store");
    std::fs::write(dir.join("refs.json"), data).expect("refs.json");
    if let Ok(list) = store.list() {
        for i in list {
            if let Ok(r) = skiff_common::ImageRef::try_from(i.reference.as_str()) {
                let _ = store.resolve(&r);
            }
        }
    }
    if let Ok(r) = skiff_common::ImageRef::try_from("busybox:1") {
        let _ = store.resolve(&r);
    }
});
