//! The local API: one JSON request and one JSON response per line over a Unix
//! socket (`<run>/skiff.sock`, mode 0600: root only). `skiff ps` and
//! `skiff apply` talk to the running agent through it.

use serde::{Deserialize, Serialize};
use skiff_common::AppStatus;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    /// Observed state of every app.
    Ps,
    /// Re-read the desired-state file now.
    Reload,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "response", rename_all = "kebab-case")]
pub enum Response {
    Ps(Box<PsReply>),
    /// The desired state the agent now runs.
    Reloaded {
        generation: u64,
    },
    Error {
        message: String,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PsReply {
    /// Generation of the desired state being applied.
    pub generation: u64,
    pub apps: Vec<AppStatus>,
    /// What each running app uses, read from its cgroup when asked.
    pub usage: Vec<Usage>,
    /// The controller link, when the agent has one.
    pub link: Option<LinkState>,
    /// Image pulls under way or failed (the state that needs them waits).
    #[serde(default)]
    pub pulls: Vec<skiff_common::PullStatus>,
    /// What the board keeps for the OS and the agent, and what apps get.
    #[serde(default)]
    pub headroom: Option<crate::headroom::Headroom>,
    /// The last good generation, the one on test, the last failed one.
    #[serde(default)]
    pub rollout: Option<skiff_common::RolloutStatus>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LinkState {
    pub connected: bool,
    /// Connections made since the agent started.
    pub connects: u64,
    pub last_error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Usage {
    pub name: String,
    /// CPU time used since the container started, in seconds.
    pub cpu_seconds: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// Largest request or response line accepted.
pub const MAX_LINE: usize = 1 << 20;

/// Sends one request to the agent at `socket`.
pub async fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!("cannot reach the agent at {} ({e}); is `skiff agent` running?", socket.display())
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    let mut reply = String::new();
    let mut r = BufReader::new(r).take(MAX_LINE as u64);
    tokio::io::AsyncBufReadExt::read_line(&mut r, &mut reply).await?;
    if reply.is_empty() {
        anyhow::bail!("the agent closed the connection without answering");
    }
    Ok(serde_json::from_str(&reply)?)
}

/// Reads one request line from a connection.
pub async fn read_request(r: &mut (impl AsyncBufReadExt + Unpin)) -> Result<Request, String> {
    let mut line = String::new();
    let mut limited = r.take(MAX_LINE as u64);
    match tokio::io::AsyncBufReadExt::read_line(&mut limited, &mut line).await {
        Ok(0) => Err("empty request".into()),
        Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad request: {e}")),
        Err(e) => Err(e.to_string()),
    }
}

use tokio::io::AsyncReadExt;
