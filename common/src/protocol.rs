//! The MQTT protocol between devices and the controller, version 1.
//!
//! Owns the topic names, the payloads and their limits, the broker URL and the
//! signature scheme; the agent's link and `skiffctl` both speak it from here.
//! Pure functions on bytes and text: no sockets, no files, no clock.
//!
//! ```text
//! skiff/v1/<device>/desired   controller -> device  retained QoS1  SignedDesired
//! skiff/v1/<device>/reported  device -> controller  retained QoS1  Reported
//! skiff/v1/<device>/events    device -> controller  QoS1           Event
//! skiff/v1/<device>/online    device -> controller  retained QoS1  "1", will "0"
//! ```
//!
//! Every binary payload is a `codec` envelope (kind, schema, length, CRC,
//! postcard) decoded with a size limit. The desired state is signed with
//! ed25519 over `context || body`, where `body` is the exact postcard
//! bytes of a `DesiredBody` naming the device, so a state signed for one device
//! is refused by every other and a signature can never be confused with one
//! made for another purpose. The context names the body's schema
//! (`SIGN_CONTEXT`, `SIGN_CONTEXT_V1`), so body bytes signed as one schema
//! cannot be re-wrapped in an envelope of another and read differently.
//! Payloads of the previous schema (1) are still read, through `crate::v1`. Verification is strict (`verify_strict`): no
//! malleable or small-order signatures. Generations are not judged here (that
//! needs memory of what was applied): the link does it.

use crate::codec::{self, CodecError, Kind, HEADER_LEN};
use crate::desired::{DesiredState, Origin};
use crate::name::{AppName, NameError};
use crate::status::{AppStatus, PullStatus, RolloutStatus};
use crate::validate::ValidationError;
use ed25519_dalek::{Signature, Signer};
/// The key types, so users of this module need no direct ed25519 dependency.
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt;

/// First levels of every topic; a new incompatible protocol gets `skiff/v2`.
pub const TOPIC_PREFIX: &str = "skiff/v1";
/// Envelope payload limit of a signed desired state (the signed body is inside it).
pub const DESIRED_LIMIT: usize = 256 * 1024;
/// Envelope payload limit of a reported state.
pub const REPORTED_LIMIT: usize = 256 * 1024;
/// Envelope payload limit of one event.
pub const EVENT_LIMIT: usize = 4 * 1024;
/// An event's `detail` is cut to this many bytes (on a character boundary).
pub const EVENT_DETAIL_MAX: usize = 1024;
/// A `Rejection`'s reason is cut to this many bytes.
pub const REASON_MAX: usize = 1024;
/// The largest MQTT packet a skiff client accepts. Well above the payload
/// limits, so an oversized payload still reaches the decoder and is refused
/// (and acknowledged) instead of breaking the connection, which would make the
/// broker redeliver it forever. A broker must cap packets at or below this
/// (the shipped mosquitto config caps them at 260 KiB); it is also above the
/// 1,100,000 bytes that config allowed before, so a message an older broker
/// config let in is still read and refused.
pub const PACKET_LIMIT: usize = 2 * 1024 * 1024;
/// Domain separation for desired-state signatures of schema `DESIRED_SCHEMA`.
pub const SIGN_CONTEXT: &[u8] = b"skiff/v1 desired-state schema 3\0";
/// The same for schema 2 bodies (read, never written).
pub const SIGN_CONTEXT_V2: &[u8] = b"skiff/v1 desired-state schema 2\0";
/// The same for schema 1 bodies (read, never written).
pub const SIGN_CONTEXT_V1: &[u8] = b"skiff/v1 desired-state\0";
/// Envelope schema versions of this protocol's payloads, as written.
/// 2: `AppSpec.pull`, `DesiredBody.replaces`, `Reported.pulls`.
/// 3: `DesiredState.rollout`, `Reported.rollout` (events 2: kinds `committed`, `rolled-back`).
pub const DESIRED_SCHEMA: u8 = 3;
pub const REPORTED_SCHEMA: u8 = 3;
pub const EVENT_SCHEMA: u8 = 2;
/// The oldest schema of `desired` and `reported` payloads still read.
pub const OLDEST_SCHEMA: u8 = 1;
/// `online` payloads (plain bytes so any MQTT tool can read them).
pub const ONLINE: &[u8] = b"1";
pub const OFFLINE: &[u8] = b"0";
/// First words of the key files `skiffctl keygen` writes.
pub const SECRET_KEY_PREFIX: &str = "skiff-ed25519-secret:";
pub const PUBLIC_KEY_PREFIX: &str = "skiff-ed25519-public:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("device id is empty")]
    DeviceEmpty,
    #[error("device id {0:?} is longer than 63 characters")]
    DeviceTooLong(String),
    #[error("device id {0:?} may only hold a-z, 0-9 and '-', and must start and end with a letter or digit")]
    DeviceChars(String),
    #[error("topic {0:?} is not skiff/v1/<device>/desired|reported|events|online")]
    Topic(String),
    #[error("envelope: {0}")]
    Codec(#[from] CodecError),
    #[error("signed body of the desired state does not decode: {0}")]
    Body(String),
    #[error("desired state is signed with key {found}, this device trusts key {trusted}")]
    UnknownKey { found: KeyId, trusted: KeyId },
    #[error("signature is {0} bytes long, an ed25519 signature is 64")]
    SignatureLength(usize),
    #[error("signature does not verify: the desired state was not signed by the trusted controller key, or was altered")]
    BadSignature,
    #[error("desired state is addressed to device {found:?}, this is {expected:?}")]
    WrongDevice { found: String, expected: String },
    #[error("desired state has origin {0:?}; only a controller state can be signed and sent")]
    Origin(Origin),
    #[error("key: {0}")]
    Key(String),
    #[error("invalid desired state: {0}")]
    Invalid(#[from] ValidationError),
    #[error("broker URL {url:?}: {reason}")]
    BrokerUrl { url: String, reason: &'static str },
}

/// A device's id: 1-63 of `[a-z0-9-]`, starting and ending with a letter or
/// digit. It is a topic level, the CN of the device's certificate (the broker's
/// username, hence the ACL key) and the MQTT client id, so it never holds `/`,
/// `+`, `#` or anything a path or an ACL pattern could trip over.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for DeviceId {
    type Error = ProtocolError;
    fn try_from(s: &str) -> Result<Self, ProtocolError> {
        // The same rule as an app name (a DNS label); only the messages differ.
        match AppName::try_from(s) {
            Ok(_) => Ok(DeviceId(s.to_string())),
            Err(NameError::Empty) => Err(ProtocolError::DeviceEmpty),
            Err(NameError::TooLong(_)) => Err(ProtocolError::DeviceTooLong(s.to_string())),
            Err(_) => Err(ProtocolError::DeviceChars(s.to_string())),
        }
    }
}

impl TryFrom<String> for DeviceId {
    type Error = ProtocolError;
    fn try_from(s: String) -> Result<Self, ProtocolError> {
        DeviceId::try_from(s.as_str())
    }
}

impl From<DeviceId> for String {
    fn from(d: DeviceId) -> String {
        d.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// The last level of a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    Desired,
    Reported,
    Events,
    Online,
}

impl Channel {
    pub const ALL: [Channel; 4] = [Channel::Desired, Channel::Reported, Channel::Events, Channel::Online];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Desired => "desired",
            Channel::Reported => "reported",
            Channel::Events => "events",
            Channel::Online => "online",
        }
    }
}

/// `skiff/v1/<device>/<channel>`.
pub fn topic(device: &DeviceId, channel: Channel) -> String {
    format!("{TOPIC_PREFIX}/{device}/{}", channel.as_str())
}

/// `skiff/v1/+/<channel>`: that channel of every device.
pub fn filter_all(channel: Channel) -> String {
    format!("{TOPIC_PREFIX}/+/{}", channel.as_str())
}

/// Splits a topic into its device and channel; refuses anything else.
pub fn parse_topic(topic: &str) -> Result<(DeviceId, Channel), ProtocolError> {
    let bad = || ProtocolError::Topic(topic.to_string());
    let rest = topic.strip_prefix(TOPIC_PREFIX).and_then(|r| r.strip_prefix('/')).ok_or_else(bad)?;
    let (device, channel) = rest.split_once('/').ok_or_else(bad)?;
    let channel = Channel::ALL.into_iter().find(|c| c.as_str() == channel).ok_or_else(bad)?;
    let device = DeviceId::try_from(device).map_err(|_| bad())?;
    Ok((device, channel))
}

/// Where the broker is: `mqtts://host[:port]` (TLS, default 8883) or
/// `mqtt://host[:port]` (plain, default 1883). IPv6 hosts go in brackets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
}

impl TryFrom<&str> for BrokerUrl {
    type Error = ProtocolError;
    fn try_from(url: &str) -> Result<Self, ProtocolError> {
        let bad = |reason| ProtocolError::BrokerUrl { url: url.to_string(), reason };
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(bad("must start with mqtts:// (TLS) or mqtt:// (plain)"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(|| bad("unclosed '[' in host"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("expected :port after ']'"))?),
            };
            (h, port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("host is empty"));
        }
        if host.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad("host may not hold '/', '?', '#', '@' or spaces (no paths or credentials)"));
        }
        let port = match port {
            None => {
                if tls {
                    8883
                } else {
                    1883
                }
            }
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("port is not 1-65535"))?,
        };
        Ok(BrokerUrl { tls, host: host.to_string(), port })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Names a public key: its first 8 bytes. Lets a device say which key signed a
/// state it refuses, and lets keys be rotated later.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let mut id = [0u8; 8];
        id.copy_from_slice(&key.as_bytes()[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// What is signed: the device it is for and its whole desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredBody {
    pub device: DeviceId,
    pub state: DesiredState,
    /// A controller reset: set to the generation the device has now, it lets
    /// `state` replace it even with a lower generation (see the README, MQTT
    /// protocol). `None` for every ordinary state.
    pub replaces: Option<u64>,
}

/// The `desired` payload. `body` is kept as bytes so the signature covers
/// exactly what was signed, whatever a later decoder would make of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDesired {
    pub key_id: KeyId,
    /// postcard of a `DesiredBody`.
    pub body: Vec<u8>,
    /// ed25519 over `SIGN_CONTEXT || body`; a `Vec` because serde has no `[u8; 64]`.
    pub signature: Vec<u8>,
}

/// Signs `state` for `device` and returns the `desired` payload.
pub fn seal_desired(
    key: &SigningKey,
    device: &DeviceId,
    state: &DesiredState,
) -> Result<Vec<u8>, ProtocolError> {
    seal_desired_body(key, &DesiredBody { device: device.clone(), state: state.clone(), replaces: None })
}

/// Signs a whole body (a reset sets `replaces`) and returns the `desired` payload.
pub fn seal_desired_body(key: &SigningKey, body: &DesiredBody) -> Result<Vec<u8>, ProtocolError> {
    if body.state.origin != Origin::Controller {
        return Err(ProtocolError::Origin(body.state.origin));
    }
    body.state.validate()?;
    seal_desired_unvalidated(key, body)
}

/// Signs a body without checking the state. Only for tests of the receiving
/// side (what a buggy or compromised controller could send); `seal_desired`
/// never signs what a device would refuse.
#[doc(hidden)]
pub fn seal_desired_unvalidated(key: &SigningKey, body: &DesiredBody) -> Result<Vec<u8>, ProtocolError> {
    let body = postcard::to_allocvec(body).map_err(|e| CodecError::Encode(e.to_string()))?;
    let signature = key.sign(&signed_message(DESIRED_SCHEMA, &body)).to_bytes().to_vec();
    let signed = SignedDesired { key_id: KeyId::of(&key.verifying_key()), body, signature };
    encode_limited(Kind::SignedDesired, DESIRED_SCHEMA, &signed, DESIRED_LIMIT)
}

/// Checks a `desired` payload: envelope and size, key id, signature over the
/// exact body bytes, the device it is addressed to, the origin, and the state
/// itself (`DesiredState::validate`). Returns the state only when all of them
/// hold.
pub fn open_desired(
    bytes: &[u8],
    device: &DeviceId,
    key: &VerifyingKey,
) -> Result<DesiredState, ProtocolError> {
    open_desired_body(bytes, device, key).map(|b| b.state)
}

/// `open_desired`, returning the whole signed body.
pub fn open_desired_body(
    bytes: &[u8],
    device: &DeviceId,
    key: &VerifyingKey,
) -> Result<DesiredBody, ProtocolError> {
    let (schema, payload) =
        codec::open(bytes, Kind::SignedDesired, OLDEST_SCHEMA..=DESIRED_SCHEMA, DESIRED_LIMIT)?;
    let signed: SignedDesired = codec::decode_payload(payload)?;
    let trusted = KeyId::of(key);
    if signed.key_id != trusted {
        return Err(ProtocolError::UnknownKey { found: signed.key_id, trusted });
    }
    let sig: [u8; 64] = signed
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| ProtocolError::SignatureLength(signed.signature.len()))?;
    key.verify_strict(&signed_message(schema, &signed.body), &Signature::from_bytes(&sig))
        .map_err(|_| ProtocolError::BadSignature)?;
    let body = decode_body(schema, &signed.body)?;
    if &body.device != device {
        return Err(ProtocolError::WrongDevice {
            found: body.device.to_string(),
            expected: device.to_string(),
        });
    }
    if body.state.origin != Origin::Controller {
        return Err(ProtocolError::Origin(body.state.origin));
    }
    body.state.validate()?;
    Ok(body)
}

/// Reads a `desired` payload WITHOUT checking its signature: for display and
/// for choosing the next generation on the controller side, never for acting.
pub fn peek_desired(bytes: &[u8]) -> Result<(KeyId, DesiredBody), ProtocolError> {
    let (schema, payload) =
        codec::open(bytes, Kind::SignedDesired, OLDEST_SCHEMA..=DESIRED_SCHEMA, DESIRED_LIMIT)?;
    let signed: SignedDesired = codec::decode_payload(payload)?;
    Ok((signed.key_id, decode_body(schema, &signed.body)?))
}

/// The body's bytes, read with the structs of the envelope's schema.
fn decode_body(schema: u8, body: &[u8]) -> Result<DesiredBody, ProtocolError> {
    match schema {
        1 => Ok(decode_exact::<crate::v1::DesiredBody>(body)?.into()),
        2 => Ok(decode_exact::<crate::v2::DesiredBody>(body)?.into()),
        _ => decode_exact(body),
    }
}

fn signed_message(schema: u8, body: &[u8]) -> Vec<u8> {
    let context = match schema {
        1 => SIGN_CONTEXT_V1,
        2 => SIGN_CONTEXT_V2,
        _ => SIGN_CONTEXT,
    };
    let mut m = Vec::with_capacity(context.len() + body.len());
    m.extend_from_slice(context);
    m.extend_from_slice(body);
    m
}

fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtocolError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| ProtocolError::Body(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Body(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

/// `codec::encode`, refusing to produce what the other side would refuse to read.
fn encode_limited<T: Serialize>(
    kind: Kind,
    schema: u8,
    value: &T,
    limit: usize,
) -> Result<Vec<u8>, ProtocolError> {
    let bytes = codec::encode(kind, schema, value)?;
    let len = bytes.len() - HEADER_LEN;
    if len > limit {
        return Err(CodecError::TooLarge { len, limit }.into());
    }
    Ok(bytes)
}

/// A desired state the device refused, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// `None` when the payload was too broken to tell.
    pub generation: Option<u64>,
    /// At most `REASON_MAX` bytes.
    pub reason: String,
}

impl Rejection {
    pub fn new(generation: Option<u64>, reason: impl Into<String>) -> Rejection {
        Rejection { generation, reason: clip(reason.into(), REASON_MAX) }
    }
}

/// The `reported` payload: everything the device observes, level-triggered
/// (each one replaces the last, so a lost one costs nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    pub device: DeviceId,
    /// The generation of the desired state the agent runs.
    pub generation_applied: u64,
    /// Where that state came from (a local `skiff apply` or the controller).
    pub origin: Origin,
    pub apps: Vec<AppStatus>,
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub agent_version: String,
    /// The last desired state the device refused. Filled in by the link.
    pub last_rejection: Option<Rejection>,
    /// Device wall clock at sending, seconds since the epoch; 0 when the device
    /// has no trustworthy clock. Filled in by the link. Informational only.
    pub sent_unix: u64,
    /// Image pulls in progress or failed (empty when nothing is pulled).
    pub pulls: Vec<PullStatus>,
    /// The last good generation, the one on test, the last failed one.
    pub rollout: RolloutStatus,
}

pub fn encode_reported(r: &Reported) -> Result<Vec<u8>, ProtocolError> {
    encode_limited(Kind::Reported, REPORTED_SCHEMA, r, REPORTED_LIMIT)
}

/// Reads a `reported` payload of any schema from `OLDEST_SCHEMA` on.
pub fn decode_reported(bytes: &[u8]) -> Result<Reported, ProtocolError> {
    let (schema, payload) =
        codec::open(bytes, Kind::Reported, OLDEST_SCHEMA..=REPORTED_SCHEMA, REPORTED_LIMIT)?;
    Ok(match schema {
        1 => codec::decode_payload::<crate::v1::Reported>(payload)?.into(),
        2 => codec::decode_payload::<crate::v2::Reported>(payload)?.into(),
        _ => codec::decode_payload(payload)?,
    })
}

/// What an event is about. Append only: postcard numbers the variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Started,
    StartFailed,
    Exited,
    OomKilled,
    Restarting,
    ProbeFailed,
    Unhealthy,
    ReadyChanged,
    Replacing,
    Removed,
    /// A desired state from the controller was verified and persisted.
    Accepted,
    /// A desired state was refused (signature, generation, size, format).
    Rejected,
    /// Anything else that went wrong and a person should hear about.
    Error,
    /// A generation passed its test and is now the last good one (schema 2).
    Committed,
    /// A generation failed its test; the device went back to the last good one (schema 2).
    RolledBack,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::StartFailed => "start-failed",
            EventKind::Exited => "exited",
            EventKind::OomKilled => "oom-killed",
            EventKind::Restarting => "restarting",
            EventKind::ProbeFailed => "probe-failed",
            EventKind::Unhealthy => "unhealthy",
            EventKind::ReadyChanged => "ready-changed",
            EventKind::Replacing => "replacing",
            EventKind::Removed => "removed",
            EventKind::Accepted => "accepted",
            EventKind::Rejected => "rejected",
            EventKind::Error => "error",
            EventKind::Committed => "committed",
            EventKind::RolledBack => "rolled-back",
        }
    }
}

/// One `events` payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Random per agent run; `seq` starts at 1 in each session.
    pub session: u64,
    /// Grows by one per event within a session.
    pub seq: u64,
    /// Events dropped just before this one (the offline ring overflowed; the
    /// oldest go first). `seq - dropped_before - 1` is the previous event kept.
    /// Counted on the safe side: an event whose PUBACK was lost counts too.
    pub dropped_before: u64,
    pub kind: EventKind,
    pub app: Option<AppName>,
    /// At most `EVENT_DETAIL_MAX` bytes.
    pub detail: String,
    /// Device wall clock when it happened; 0 when unknown.
    pub unix: u64,
}

pub fn encode_event(e: &Event) -> Result<Vec<u8>, ProtocolError> {
    encode_limited(Kind::Event, EVENT_SCHEMA, e, EVENT_LIMIT)
}

/// Reads an `events` payload of schema 1 (the same struct, fewer kinds) or 2.
pub fn decode_event(bytes: &[u8]) -> Result<Event, ProtocolError> {
    let (_, payload) = codec::open(bytes, Kind::Event, 1..=EVENT_SCHEMA, EVENT_LIMIT)?;
    Ok(codec::decode_payload(payload)?)
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The text of a secret key file: the prefix and 64 hex digits (the seed).
pub fn secret_key_text(key: &SigningKey) -> String {
    format!("{SECRET_KEY_PREFIX}{}\n", hex::encode(key.to_bytes()))
}

/// The text of a public key file: the prefix and 64 hex digits.
pub fn public_key_text(key: &VerifyingKey) -> String {
    format!("{PUBLIC_KEY_PREFIX}{}\n", hex::encode(key.as_bytes()))
}

pub fn parse_secret_key(text: &str) -> Result<SigningKey, ProtocolError> {
    Ok(SigningKey::from_bytes(&key_bytes(text, SECRET_KEY_PREFIX, PUBLIC_KEY_PREFIX)?))
}

pub fn parse_public_key(text: &str) -> Result<VerifyingKey, ProtocolError> {
    let bytes = key_bytes(text, PUBLIC_KEY_PREFIX, SECRET_KEY_PREFIX)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| ProtocolError::Key("not a valid ed25519 public key".into()))
}

fn key_bytes(text: &str, want: &str, other: &str) -> Result<[u8; 32], ProtocolError> {
    let text = text.trim();
    let Some(hex_part) = text.strip_prefix(want) else {
        return Err(ProtocolError::Key(if text.starts_with(other) {
            format!("this is a {} key file, expected one starting with {want:?}", kind_of(other))
        } else {
            format!("expected a line starting with {want:?} (written by `skiffctl keygen`)")
        }));
    };
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .map_err(|_| ProtocolError::Key(format!("expected 64 hex digits after {want:?}")))?;
    Ok(out)
}

fn kind_of(prefix: &str) -> &'static str {
    if prefix == SECRET_KEY_PREFIX {
        "secret"
    } else {
        "public"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::AppSpec;
    use crate::name::ImageRef;
    use crate::status::{Health, Phase, PullStatus};
    use crate::{NetworkMode, PullPolicy, Resources, RestartPolicy};
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn dev(s: &str) -> DeviceId {
        DeviceId::try_from(s).unwrap()
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn state(generation: u64) -> DesiredState {
        let app = AppSpec {
            name: AppName::try_from("web").unwrap(),
            image: ImageRef::try_from("busybox:1").unwrap(),
            pull: PullPolicy::Always,
            command: Some(vec!["httpd".into(), "-f".into()]),
            env: BTreeMap::from([("A".into(), "b".into())]),
            workdir: None,
            restart: RestartPolicy::Always,
            network: NetworkMode::Host,
            mounts: vec![],
            devices: vec![],
            resources: Resources { cpu_millis: Some(500), memory_bytes: Some(1 << 25), pids: None },
            liveness: None,
            readiness: None,
            startup: None,
            stop_grace: Duration::from_secs(3),
            security: crate::Security {
                user: Some(crate::User { uid: 1000, gid: Some(100) }),
                cap_add: vec![crate::Capability::NetAdmin],
                seccomp: crate::Seccomp::Unconfined,
                ..Default::default()
            },
        };
        DesiredState { generation, origin: Origin::Controller, apps: vec![app], rollout: Default::default() }
    }

    #[test]
    fn device_ids() {
        for ok in ["pi-001", "a", "0", &"d".repeat(63)] {
            assert!(DeviceId::try_from(ok).is_ok(), "{ok}");
        }
        assert_eq!(DeviceId::try_from(""), Err(ProtocolError::DeviceEmpty));
        assert!(matches!(DeviceId::try_from("a".repeat(64).as_str()), Err(ProtocolError::DeviceTooLong(_))));
        for bad in ["Pi", "-a", "a-", "a/b", "+", "#", "a b", "a.b", "ä"] {
            assert!(matches!(DeviceId::try_from(bad), Err(ProtocolError::DeviceChars(_))), "{bad}");
        }
        // Serde goes through the same check.
        let bytes = postcard::to_allocvec(&"a/b".to_string()).unwrap();
        assert!(postcard::from_bytes::<DeviceId>(&bytes).is_err());
    }

    #[test]
    fn topics_round_trip_and_junk_is_refused() {
        let d = dev("pi-7");
        for ch in Channel::ALL {
            let t = topic(&d, ch);
            assert_eq!(parse_topic(&t), Ok((d.clone(), ch)));
        }
        assert_eq!(topic(&d, Channel::Desired), "skiff/v1/pi-7/desired");
        assert_eq!(filter_all(Channel::Reported), "skiff/v1/+/reported");
        for bad in [
            "",
            "skiff/v1",
            "skiff/v1/pi-7",
            "skiff/v1/pi-7/",
            "skiff/v1/pi-7/status",
            "skiff/v1/pi-7/desired/x",
            "skiff/v2/pi-7/desired",
            "skiff/v1/+/desired",
            "skiff/v1//desired",
            "xskiff/v1/pi-7/desired",
        ] {
            assert!(parse_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn broker_urls() {
        let u = BrokerUrl::try_from("mqtts://broker.example:8884").unwrap();
        assert_eq!(u, BrokerUrl { tls: true, host: "broker.example".into(), port: 8884 });
        assert_eq!(BrokerUrl::try_from("mqtt://10.0.0.1").unwrap().port, 1883);
        assert_eq!(BrokerUrl::try_from("mqtts://h/").unwrap().port, 8883);
        let v6 = BrokerUrl::try_from("mqtts://[::1]:9000").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
        assert_eq!(v6.to_string(), "mqtts://[::1]:9000");
        assert_eq!(BrokerUrl::try_from(u.to_string().as_str()).unwrap(), u);
        for bad in [
            "",
            "tcp://h:1",
            "mqtts://",
            "mqtts://:1",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://h:70000",
            "mqtt://u@h",
            "mqtts://[::1",
            "mqtt://h/path",
        ] {
            assert!(matches!(BrokerUrl::try_from(bad), Err(ProtocolError::BrokerUrl { .. })), "{bad}");
        }
    }

    #[test]
    fn sealed_desired_opens_with_the_right_key_for_the_right_device() {
        let k = key(1);
        let d = dev("pi-1");
        let s = state(7);
        let bytes = seal_desired(&k, &d, &s).unwrap();
        assert_eq!(open_desired(&bytes, &d, &k.verifying_key()).unwrap(), s);
        let (id, body) = peek_desired(&bytes).unwrap();
        assert_eq!((id, body.device, body.state), (KeyId::of(&k.verifying_key()), d.clone(), s));
    }

    #[test]
    fn forged_signature_is_refused() {
        let d = dev("pi-1");
        let real = key(1).verifying_key();
        // Signed by another key, with the real key's id claimed.
        let forged = seal_desired(&key(2), &d, &state(7)).unwrap();
        let mut signed: SignedDesired =
            codec::decode(&forged, Kind::SignedDesired, DESIRED_SCHEMA, DESIRED_LIMIT).unwrap();
        assert!(matches!(open_desired(&forged, &d, &real), Err(ProtocolError::UnknownKey { .. })));
        signed.key_id = KeyId::of(&real);
        let bytes = codec::encode(Kind::SignedDesired, DESIRED_SCHEMA, &signed).unwrap();
        assert_eq!(open_desired(&bytes, &d, &real), Err(ProtocolError::BadSignature));
        // Zero signature, short signature.
        signed.signature = vec![0; 64];
        let bytes = codec::encode(Kind::SignedDesired, DESIRED_SCHEMA, &signed).unwrap();
        assert_eq!(open_desired(&bytes, &d, &real), Err(ProtocolError::BadSignature));
        signed.signature = vec![0; 63];
        let bytes = codec::encode(Kind::SignedDesired, DESIRED_SCHEMA, &signed).unwrap();
        assert_eq!(open_desired(&bytes, &d, &real), Err(ProtocolError::SignatureLength(63)));
    }

    #[test]
    fn tampered_body_is_refused_even_with_a_fresh_crc() {
        let k = key(1);
        let d = dev("pi-1");
        let bytes = seal_desired(&k, &d, &state(7)).unwrap();
        let signed: SignedDesired =
            codec::decode(&bytes, Kind::SignedDesired, DESIRED_SCHEMA, DESIRED_LIMIT).unwrap();
        // Flip every bit of the body in turn; the envelope is rebuilt so only the signature can tell.
        for i in 0..signed.body.len() {
            let mut t = signed.clone();
            t.body[i] ^= 0x01;
            let b = codec::encode(Kind::SignedDesired, DESIRED_SCHEMA, &t).unwrap();
            assert!(open_desired(&b, &d, &k.verifying_key()).is_err(), "byte {i}");
        }
        // Bits flipped in the raw payload fail the CRC before anything else.
        let mut raw = bytes.clone();
        let last = raw.len() - 1;
        raw[last] ^= 0x80;
        assert!(matches!(
            open_desired(&raw, &d, &k.verifying_key()),
            Err(ProtocolError::Codec(CodecError::Crc { .. }))
        ));
    }

    #[test]
    fn a_body_rewrapped_in_another_schema_does_not_verify() {
        let k = key(1);
        let d = dev("pi-1");
        let bytes = seal_desired(&k, &d, &state(7)).unwrap();
        let signed: SignedDesired =
            codec::decode(&bytes, Kind::SignedDesired, DESIRED_SCHEMA, DESIRED_LIMIT).unwrap();
        let old = codec::encode(Kind::SignedDesired, 1, &signed).unwrap();
        assert_eq!(open_desired(&old, &d, &k.verifying_key()), Err(ProtocolError::BadSignature));
        let newer = codec::encode(Kind::SignedDesired, DESIRED_SCHEMA + 1, &signed).unwrap();
        let e = open_desired(&newer, &d, &k.verifying_key()).unwrap_err();
        assert!(matches!(e, ProtocolError::Codec(CodecError::Newer { .. })), "{e}");
        assert!(e.to_string().ends_with("; upgrade the agent"), "{e}");
    }

    #[test]
    fn a_reset_carries_what_it_replaces() {
        let k = key(1);
        let d = dev("pi-1");
        let body = DesiredBody { device: d.clone(), state: state(3), replaces: Some(9) };
        let bytes = seal_desired_body(&k, &body).unwrap();
        assert_eq!(open_desired_body(&bytes, &d, &k.verifying_key()).unwrap(), body);
    }

    #[test]
    fn a_state_for_another_device_is_refused() {
        let k = key(1);
        let bytes = seal_desired(&k, &dev("pi-1"), &state(7)).unwrap();
        assert!(matches!(
            open_desired(&bytes, &dev("pi-2"), &k.verifying_key()),
            Err(ProtocolError::WrongDevice { .. })
        ));
    }

    #[test]
    fn local_origin_is_neither_sealed_nor_accepted() {
        let k = key(1);
        let d = dev("pi-1");
        let mut s = state(7);
        s.origin = Origin::Local;
        assert_eq!(seal_desired(&k, &d, &s), Err(ProtocolError::Origin(Origin::Local)));
        // Correctly signed, but Local: refused by the device.
        let body =
            postcard::to_allocvec(&DesiredBody { device: d.clone(), state: s, replaces: None }).unwrap();
        let signature = k.sign(&signed_message(DESIRED_SCHEMA, &body)).to_bytes().to_vec();
        let signed = SignedDesired { key_id: KeyId::of(&k.verifying_key()), body, signature };
        let bytes = codec::encode(Kind::SignedDesired, DESIRED_SCHEMA, &signed).unwrap();
        assert_eq!(open_desired(&bytes, &d, &k.verifying_key()), Err(ProtocolError::Origin(Origin::Local)));
    }

    #[test]
    fn oversized_is_refused_on_both_sides() {
        let k = key(1);
        let d = dev("pi-1");
        let mut s = state(7);
        s.apps[0].env.insert("BIG".into(), "x".repeat(DESIRED_LIMIT));
        assert!(matches!(seal_desired(&k, &d, &s), Err(ProtocolError::Codec(CodecError::TooLarge { .. }))));
        // A peer that ignores the limit: the device refuses before looking inside.
        let body =
            postcard::to_allocvec(&DesiredBody { device: d.clone(), state: s, replaces: None }).unwrap();
        let signature = k.sign(&signed_message(DESIRED_SCHEMA, &body)).to_bytes().to_vec();
        let signed = SignedDesired { key_id: KeyId::of(&k.verifying_key()), body, signature };
        let bytes = codec::encode(Kind::SignedDesired, DESIRED_SCHEMA, &signed).unwrap();
        assert!(matches!(
            open_desired(&bytes, &d, &k.verifying_key()),
            Err(ProtocolError::Codec(CodecError::TooLarge { .. }))
        ));
    }

    #[test]
    fn garbage_never_panics_and_is_refused() {
        let k = key(1).verifying_key();
        let d = dev("pi-1");
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for n in 0..2000usize {
            let len = (next() % 300) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if n % 2 == 0 && b.len() >= 16 {
                // A valid header over random payload gets past the envelope checks.
                let payload = b[16..].to_vec();
                b = codec::MAGIC.to_vec();
                b.extend_from_slice(&[Kind::SignedDesired as u8, 1 + (n % 4) as u8 / 2, 0, 0]);
                b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                b.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
                b.extend_from_slice(&payload);
            }
            assert!(open_desired(&b, &d, &k).is_err());
            let _ = peek_desired(&b);
            let _ = decode_reported(&b);
            let _ = decode_event(&b);
        }
        assert!(open_desired(b"1", &d, &k).is_err());
        assert!(open_desired(b"", &d, &k).is_err());
    }

    #[test]
    fn reported_and_events_round_trip_and_respect_limits() {
        let r = Reported {
            device: dev("pi-1"),
            generation_applied: 3,
            origin: Origin::Controller,
            apps: vec![AppStatus {
                name: AppName::try_from("web").unwrap(),
                phase: Phase::Running,
                pid: Some(42),
                restarts: 1,
                last_exit: None,
                live: Health::Passing,
                ready: Health::Unknown,
                image: "busybox:1".into(),
                image_digest: None,
                error: None,
            }],
            agent_version: "0.1.0".into(),
            last_rejection: Some(Rejection::new(Some(2), "bad")),
            sent_unix: 1_700_000_000,
            pulls: vec![PullStatus {
                image: "busybox:2".into(),
                done: 10,
                total: 20,
                error: Some("x".into()),
            }],
            rollout: RolloutStatus {
                committed: 2,
                testing: None,
                failed: Some(crate::status::RolloutFailure {
                    generation: 3,
                    app: Some(AppName::try_from("web").unwrap()),
                    reason: "exited with code 1".into(),
                    rolled_back: true,
                }),
            },
        };
        assert_eq!(decode_reported(&encode_reported(&r).unwrap()).unwrap(), r);
        let e = Event {
            session: 9,
            seq: 1,
            dropped_before: 0,
            kind: EventKind::OomKilled,
            app: Some(AppName::try_from("web").unwrap()),
            detail: clip("é".repeat(EVENT_DETAIL_MAX), EVENT_DETAIL_MAX),
            unix: 0,
        };
        assert!(e.detail.len() <= EVENT_DETAIL_MAX && e.detail.len() >= EVENT_DETAIL_MAX - 1);
        assert_eq!(decode_event(&encode_event(&e).unwrap()).unwrap(), e);
        let mut big = e.clone();
        big.detail = "x".repeat(EVENT_LIMIT);
        assert!(encode_event(&big).is_err());
        // A reported payload is not an event, and the other way round.
        assert!(decode_event(&encode_reported(&r).unwrap()).is_err());
        assert!(decode_reported(&encode_event(&e).unwrap()).is_err());
    }

    #[test]
    fn key_files_round_trip_and_mixups_are_named() {
        let k = key(5);
        assert_eq!(parse_secret_key(&secret_key_text(&k)).unwrap().to_bytes(), k.to_bytes());
        assert_eq!(parse_public_key(&public_key_text(&k.verifying_key())).unwrap(), k.verifying_key());
        let e = parse_public_key(&secret_key_text(&k)).unwrap_err().to_string();
        assert!(e.contains("secret key file"), "{e}");
        let e = parse_secret_key(&public_key_text(&k.verifying_key())).unwrap_err().to_string();
        assert!(e.contains("public key file"), "{e}");
        assert!(parse_public_key("skiff-ed25519-public:abcd").is_err());
        assert!(parse_public_key("hello").unwrap_err().to_string().contains("skiffctl keygen"));
    }

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("abc".into(), 5), "abc");
        assert_eq!(clip("abc".into(), 2), "ab");
        assert_eq!(clip("aé".into(), 2), "a");
    }
}
