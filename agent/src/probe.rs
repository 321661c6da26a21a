//! Carries out one probe attempt; the reconciler decides when and what it means.
//! http and tcp probes connect to 127.0.0.1 (apps with probes on ports share
//! the host network, which the validator enforces). exec probes run through
//! `skiff probe-exec`, a separate process, because entering a container forks.

use skiff_common::{Probe, ProbeAction};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

/// Runs the probe within its timeout: `(passed, detail)`.
pub async fn run(probe: &Probe, exe: &Path, container_root: &Path, container_id: &str) -> (bool, String) {
    let attempt = async {
        match &probe.action {
            ProbeAction::Tcp { port } => match TcpStream::connect(("127.0.0.1", *port)).await {
                Ok(_) => (true, format!("tcp {port}: connected")),
                Err(e) => (false, format!("tcp {port}: {e}")),
            },
            ProbeAction::Http { port, path } => http(*port, path).await,
            ProbeAction::Exec(args) => exec(args, probe.timeout, exe, container_root, container_id).await,
        }
    };
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

async fn exec(args: &[String], timeout: Duration, exe: &Path, root: &Path, id: &str) -> (bool, String) {
    let child = Command::new(exe)
        .arg("probe-exec")
        .arg("--root")
        .arg(root)
        .arg("--id")
        .arg(id)
        .arg("--timeout-ms")
        .arg(timeout.as_millis().to_string())
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("exec: cannot spawn probe helper: {e}")),
    };
    match child.wait_with_output().await {
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stdout));
            let text: String = text.trim().chars().take(200).collect();
            let code = out.status.code().unwrap_or(-1);
            (
                code == 0,
                format!("exec {:?}: exit {code}{}{text}", args[0], if text.is_empty() { "" } else { ": " }),
            )
        }
        Err(e) => (false, format!("exec: {e}")),
    }
}
