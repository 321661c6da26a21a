use std::path::PathBuf;

/// Everything that can go wrong talking to a registry. Messages name the registry
/// and the reference (or the file); they never hold a credential or a token.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("registry {registry}: {reference}: cannot connect: {msg}")]
    Connect { registry: String, reference: String, msg: String },
    #[error("registry {registry}: {reference}: {msg}")]
    Transfer { registry: String, reference: String, msg: String },
    #[error("registry {registry}: {reference}: {what}: no bytes for {ms} ms (stalled)")]
    Stalled { registry: String, reference: String, what: String, ms: u64 },
    #[error("registry {registry}: {reference}: HTTP {status} for {what}")]
    Status { registry: String, reference: String, status: u16, what: String },
    #[error("registry {registry}: {reference}: {what} not found")]
    NotFound { registry: String, reference: String, what: String },
    #[error("registry {registry}: {reference}: authentication failed ({detail})")]
    Unauthorized { registry: String, reference: String, detail: String },
    #[error("registry {registry}: {reference}: {what} has digest {actual}, expected {expected}")]
    DigestMismatch { registry: String, reference: String, what: String, expected: String, actual: String },
    #[error("registry {registry}: {reference}: no image for {platform} (index has: {available})")]
    NoPlatform { registry: String, reference: String, platform: String, available: String },
    #[error("registry {registry}: {reference}: {msg}")]
    Protocol { registry: String, reference: String, msg: String },
    #[error("registry {registry}: plain HTTP refused: the registry is not marked insecure")]
    NotInsecure { registry: String },
    #[error("{last} (gave up after {attempts} attempts)")]
    RetriesExhausted { attempts: u32, last: Box<Error> },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }

    /// Whether trying again later may succeed: link cuts, stalls, 5xx, 429.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Transfer { .. } | Error::Stalled { .. } => true,
            Error::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            Error::RetriesExhausted { last, .. } => last.is_transient(),
            _ => false,
        }
    }
}
