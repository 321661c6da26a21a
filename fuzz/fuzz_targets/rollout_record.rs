//! The rollout record as read from flash (`rollout.skf`): any bytes decode or
//! fail cleanly; whatever decodes holds the record's invariants, re-encodes to
//! the same record, and gives a start-up decision without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use skiff_agent::rollout::Record;
use skiff_agent::store::decode_record;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = decode_record(data) {
        record.validate().expect("a decoded record is valid");
        let again = skiff_common::codec::encode(skiff_common::codec::Kind::RolloutRecord, 1, &record).unwrap();
        assert_eq!(decode_record(&again).expect("round trip"), record);
        let top = skiff_common::validate::MAX_GENERATION;
        for stored in [0, record.committed, (record.committed + 1).min(top), top] {
            let (_, next) = Record::at_start(Some(&record), stored, true, true);
            if let Some(next) = next {
                next.validate().expect("a record written at start is valid");
            }
        }
    }
});
