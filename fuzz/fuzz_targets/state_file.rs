//! The desired-state file as read from flash: any bytes decode or fail cleanly,
//! and whatever decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use skiff_common::codec::state_file;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = state_file::decode(data) {
        let again = state_file::encode(&state).expect("a decoded state encodes");
        assert_eq!(state_file::decode(&again).expect("round trip"), state);
    }
});
