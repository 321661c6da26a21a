//! The validity dates doctor reads from the device certificate on disk: any
//! bytes (as DER, and wrapped in PEM) give dates or None, never a panic, and
//! the dates read are in order of the input (no overflow wraps).
#![no_main]
use libfuzzer_sys::fuzz_target;
use skiff_agent::doctor::link::{certificate, validity};
use std::time::{Duration, UNIX_EPOCH};

fuzz_target!(|data: &[u8]| {
    let _ = validity(data);
    let mut pem = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    for chunk in data.chunks(48) {
        pem.extend(chunk.iter().map(|b| b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[(*b & 63) as usize]));
        pem.push(b'\n');
    }
    pem.extend(b"-----END CERTIFICATE-----\n");
    let _ = certificate("fuzz.crt", &pem, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
});
