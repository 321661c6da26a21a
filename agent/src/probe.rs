//! Carries out one probe attempt; the reconciler decides when and what it means.
//! http and tcp probes connect to 127.0.0.1 (apps with probes on ports share
//! the host network, which the validator enforces). exec probes run through
//! `skiff probe-exec`, a separate process, because entering a container forks;
//! it enforces the timeout and kills every process the probe started.

use skiff_common::{Probe, ProbeAction};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

/// How long past the probe's timeout `skiff probe-exec` may take to kill the
/// probe's processes and exit before it is killed itself.
const HELPER_MARGIN: Duration = Duration::from_secs(5);

/// Output kept from an exec probe, per stream.
const OUTPUT_KEPT: usize = 1024;

/// Runs the probe within its timeout: `(passed, detail)`.
/// `seccomp`: the app's `seccomp.json`, which exec probes load too.
pub async fn run(
    probe: &Probe,
    exe: &Path,
    container_root: &Path,
    container_id: &str,
    seccomp: &Path,
) -> (bool, String) {
    let attempt = async {
        match &probe.action {
            ProbeAction::Tcp { port } => match TcpStream::connect(("127.0.0.1", *port)).await {
                Ok(_) => (true, format!("tcp {port}: connected")),
                Err(e) => (false, format!("tcp {port}: {e}")),
            },
            ProbeAction::Http { port, path } => http(*port, path).await,
            ProbeAction::Exec(args) => {
                exec(args, probe.timeout, exe, container_root, container_id, seccomp).await
            }
        }
    };
    if matches!(probe.action, ProbeAction::Exec(_)) {
        // Not cut off at the timeout from here: the helper enforces it and
        // then kills what the probe started; killing the helper first would
        // leave those processes behind. `exec` bounds itself.
        return attempt.await;
    }
    match tokio::time::timeout(probe.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => (false, format!("timed out after {:?}", probe.timeout)),
    }
}

async fn http(port: u16, path: &str) -> (bool, String) {
    let mut s = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => return (false, format!("http {port}{path}: {e}")),
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: skiff-probe\r\nConnection: close\r\n\r\n");
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return (false, format!("http {port}{path}: {e}"));
    }
    // The status line is all that matters; read a bounded amount.
    let mut buf = vec![0u8; 1024];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                if buf[..n].contains(&b'\n') {
                    break;
                }
            }
            Err(e) => return (false, format!("http {port}{path}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let line = line.lines().next().unwrap_or("");
    let code: Option<u16> = line.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    match code {
        Some(c) if (200..400).contains(&c) => (true, format!("http {port}{path}: {c}")),
        Some(c) => (false, format!("http {port}{path}: status {c}")),
        None => (false, format!("http {port}{path}: not an HTTP response")),
    }
}

async fn exec(
    args: &[String],
    timeout: Duration,
    exe: &Path,
    root: &Path,
    id: &str,
    seccomp: &Path,
) -> (bool, String) {
    let name = args.first().map(String::as_str).unwrap_or("");
    let child = Command::new(exe)
        .arg("probe-exec")
        .arg("--root")
        .arg(root)
        .arg("--id")
        .arg(id)
        .arg("--seccomp")
        .arg(seccomp)
        .arg("--timeout-ms")
        .arg(timeout.as_millis().to_string())
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("exec: cannot spawn probe helper: {e}")),
    };
    // Drained from the start (a chatty probe must not block on a full pipe).
    let out = tokio::spawn(read_some(child.stdout.take()));
    let err = tokio::spawn(read_some(child.stderr.take()));
    let limit = timeout.saturating_add(HELPER_MARGIN);
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return (false, format!("exec: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            out.abort();
            err.abort();
            return (false, format!("exec {name:?}: the probe helper did not finish within {limit:?}"));
        }
    };
    // A process that escaped into its own session may still hold the pipes:
    // take what has arrived shortly after the exit, not wait for EOF.
    let grace = Duration::from_millis(200);
    let (out_abort, err_abort) = (out.abort_handle(), err.abort_handle());
    let (stdout, stderr) =
        tokio::time::timeout(grace, async { (out.await, err.await) }).await.unwrap_or_else(|_| {
            out_abort.abort();
            err_abort.abort();
            (Ok(Vec::new()), Ok(Vec::new()))
        });
    let mut text = String::from_utf8_lossy(&stderr.unwrap_or_default()).into_owned();
    text.push_str(&String::from_utf8_lossy(&stdout.unwrap_or_default()));
    let text: String = text.trim().chars().take(200).collect();
    let code = status.code().unwrap_or(-1);
    (code == 0, format!("exec {name:?}: exit {code}{}{text}", if text.is_empty() { "" } else { ": " }))
}

/// Reads `r` to its end, keeping the first `OUTPUT_KEPT` bytes.
async fn read_some(r: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    let Some(mut r) = r else { return Vec::new() };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = OUTPUT_KEPT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}
