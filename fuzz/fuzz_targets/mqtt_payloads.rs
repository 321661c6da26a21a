//! Everything a device or the controller reads from the broker: signed desired
//! states (opened as a device would, signature check included), reported
//! states, events. Any bytes are refused or decoded, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use skiff_common::protocol::{
    decode_event, decode_reported, open_desired, peek_desired, DeviceId, SigningKey,
};

fuzz_target!(|data: &[u8]| {
    let device = DeviceId::try_from("pi-1").expect("valid id");
    let key = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    let _ = open_desired(data, &device, &key);
    let _ = peek_desired(data);
    let _ = decode_reported(data);
    let _ = decode_event(data);
});
