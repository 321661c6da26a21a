//! The binary envelope for everything skiff stores on flash or sends on the wire.
//!
//! ```text
//! offset size field
//!      0    4 magic   b"SKF1"
//!      4    1 kind    what the payload is (see `Kind`)
//!      5    1 schema  payload schema version for that kind
//!      6    2 reserved, zero
//!      8    4 length  payload length, little endian
//!     12    4 crc32   of the payload (IEEE), little endian
//!     16    n payload postcard
//! ```
//! Decoding checks every field before it touches the payload, and refuses a
//! length over the caller's limit, so a corrupt or hostile header cannot make
//! it allocate. A torn write (short file) fails the length or CRC check.
//!
//! Schemas evolve: postcard is not self-describing, so a payload is only read
//! with the structs of its schema. A reader knows a range of schemas per kind
//! (the newest and the ones before it, kept frozen in `crate::v1` and so on,
//! each converted into today's types); a schema above its range is refused
//! with a message that says to upgrade.

use serde::{de::DeserializeOwned, Serialize};

pub const MAGIC: [u8; 4] = *b"SKF1";
pub const HEADER_LEN: usize = 16;

/// What an envelope holds. The numbers are part of the format: never reuse one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The desired-state file on the device (`DesiredState`).
    StateFile = 1,
    /// Reserved for the MQTT protocol (signed desired state, reported, events).
    SignedDesired = 2,
    Reported = 3,
    Event = 4,
    /// The device's rollout record (`rollout.skf`: last good generation, the one on test).
    RolloutRecord = 5,
}

impl Kind {
    /// Who reads this kind, for "upgrade ..." messages.
    pub fn reader(self) -> &'static str {
        match self {
            Kind::StateFile | Kind::SignedDesired | Kind::RolloutRecord => "the agent",
            Kind::Reported | Kind::Event => "skiffctl",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("too short for a skiff envelope ({0} bytes, the header alone is 16)")]
    Short(usize),
    #[error("not a skiff envelope (bad magic)")]
    Magic,
    #[error("envelope holds kind {found}, expected {expected}")]
    Kind { found: u8, expected: u8 },
    #[error("schema version {found} is not supported (this build reads {supported})")]
    Schema { found: u8, supported: u8 },
    #[error(
        "schema version {found} is newer than this build reads ({oldest}..={newest}); upgrade {}",
        .kind.reader()
    )]
    Newer { kind: Kind, found: u8, oldest: u8, newest: u8 },
    #[error("payload of {len} bytes is over the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("payload is {found} bytes but the header says {expected} (torn write?)")]
    Length { found: usize, expected: usize },
    #[error("CRC mismatch: header {expected:08x}, payload {found:08x}")]
    Crc { expected: u32, found: u32 },
    #[error("payload does not decode: {0}")]
    Payload(String),
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("invalid desired state: {0}")]
    Invalid(crate::ValidationError),
}

/// Encodes `value` into an envelope of `kind` and `schema`.
pub fn encode<T: Serialize>(kind: Kind, schema: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let payload = postcard::to_allocvec(value).map_err(|e| CodecError::Encode(e.to_string()))?;
    let len = u32::try_from(payload.len()).map_err(|_| CodecError::Encode("payload over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(kind as u8);
    out.push(schema);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes an envelope of `kind` and `schema` holding at most `limit` payload bytes.
pub fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    kind: Kind,
    schema: u8,
    limit: usize,
) -> Result<T, CodecError> {
    let (_, payload) = open(bytes, kind, schema..=schema, limit)?;
    decode_payload(payload)
}

/// Checks an envelope of `kind` holding at most `limit` payload bytes whose
/// schema is in `schemas`, and returns that schema and the payload.
pub fn open(
    bytes: &[u8],
    kind: Kind,
    schemas: std::ops::RangeInclusive<u8>,
    limit: usize,
) -> Result<(u8, &[u8]), CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::Short(bytes.len()));
    }
    if bytes[0..4] != MAGIC {
        return Err(CodecError::Magic);
    }
    if bytes[4] != kind as u8 {
        return Err(CodecError::Kind { found: bytes[4], expected: kind as u8 });
    }
    let found = bytes[5];
    if found > *schemas.end() {
        let (oldest, newest) = (*schemas.start(), *schemas.end());
        return Err(CodecError::Newer { kind, found, oldest, newest });
    }
    if found < *schemas.start() {
        return Err(CodecError::Schema { found, supported: *schemas.start() });
    }
    let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if len > limit {
        return Err(CodecError::TooLarge { len, limit });
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() != len {
        return Err(CodecError::Length { found: payload.len(), expected: len });
    }
    let expected = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let found = crc32fast::hash(payload);
    if expected != found {
        return Err(CodecError::Crc { expected, found });
    }
    Ok((bytes[5], payload))
}

/// Reads one postcard value that must fill `payload` exactly.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (value, rest) = postcard::take_from_bytes(payload).map_err(|e| CodecError::Payload(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::Payload(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

/// The state file: a `DesiredState` in a `Kind::StateFile` envelope.
pub mod state_file {
    use super::*;
    use crate::{v1, v2, DesiredState};

    /// Written by this build. 2: `AppSpec.pull`, `AppSpec.security`. 3: `DesiredState.rollout`.
    pub const SCHEMA: u8 = 3;
    /// The oldest schema this build still reads (and converts).
    pub const OLDEST: u8 = 1;
    /// Far above any real desired state; bounds what a corrupt file can cost.
    pub const LIMIT: usize = 1 << 20;

    /// Refuses a state that `decode` would refuse (`DesiredState::validate`).
    pub fn encode(state: &DesiredState) -> Result<Vec<u8>, CodecError> {
        state.validate().map_err(CodecError::Invalid)?;
        super::encode(Kind::StateFile, SCHEMA, state)
    }

    /// Reads a state file of any schema from `OLDEST` to `SCHEMA`, and
    /// validates the state: a file that breaks an invariant is as unusable
    /// as one that fails its CRC.
    pub fn decode(bytes: &[u8]) -> Result<DesiredState, CodecError> {
        let (schema, payload) = open(bytes, Kind::StateFile, OLDEST..=SCHEMA, LIMIT)?;
        let state = match schema {
            1 => decode_payload::<v1::DesiredState>(payload)?.into(),
            2 => decode_payload::<v2::DesiredState>(payload)?.into(),
            _ => decode_payload::<DesiredState>(payload)?,
        };
        state.validate().map_err(CodecError::Invalid)?;
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let v: (u64, String) = (42, "hello".into());
        let bytes = encode(Kind::Event, 1, &v).unwrap();
        assert_eq!(decode::<(u64, String)>(&bytes, Kind::Event, 1, 1024).unwrap(), v);
        // Every truncation fails.
        for n in 0..bytes.len() {
            assert!(decode::<(u64, String)>(&bytes[..n], Kind::Event, 1, 1024).is_err(), "len {n}");
        }
        // Every single-bit flip fails (header or payload).
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if i == 6 || i == 7 {
                    continue; // reserved bytes are not checked
                }
                assert!(decode::<(u64, String)>(&b, Kind::Event, 1, 1024).is_err(), "byte {i} bit {bit}");
            }
        }
        assert_eq!(
            decode::<(u64, String)>(&bytes, Kind::Event, 2, 1024),
            Err(CodecError::Schema { found: 1, supported: 2 })
        );
        assert!(matches!(
            decode::<(u64, String)>(&bytes, Kind::Event, 1, 3),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(matches!(
            decode::<(u64, String)>(&bytes, Kind::Reported, 1, 1024),
            Err(CodecError::Kind { .. })
        ));
    }

    #[test]
    fn a_newer_schema_is_refused_with_a_reason_to_upgrade() {
        let bytes = encode(Kind::StateFile, state_file::SCHEMA + 1, &crate::DesiredState::empty()).unwrap();
        let e = state_file::decode(&bytes).unwrap_err();
        assert_eq!(
            e,
            CodecError::Newer {
                kind: Kind::StateFile,
                found: state_file::SCHEMA + 1,
                oldest: state_file::OLDEST,
                newest: state_file::SCHEMA
            }
        );
        assert_eq!(
            e.to_string(),
            format!(
                "schema version {} is newer than this build reads (1..={}); upgrade the agent",
                state_file::SCHEMA + 1,
                state_file::SCHEMA
            )
        );
        let bytes = encode(Kind::StateFile, 0, &crate::DesiredState::empty()).unwrap();
        assert_eq!(state_file::decode(&bytes), Err(CodecError::Schema { found: 0, supported: 1 }));
    }
}
