//! systemd's notify protocol, spoken directly (no libsystemd): one datagram
//! per message to the socket in `$NOTIFY_SOCKET`. The daemon sends `READY=1`
//! once it has restored its state and adopted or started its apps, and
//! `WATCHDOG=1` from its event loop (not from a timer thread), so a loop that
//! hangs stops the pings and systemd restarts the agent even though the
//! process lives. `STOPPING=1` on the way out.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier systemd asked for through the environment, if any. The
    /// variables are removed so that shims and anything else this process
    /// starts do not inherit them. Call before other threads start.
    pub fn from_env() -> Option<Notifier> {
        let socket = std::env::var("NOTIFY_SOCKET").ok()?;
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for v in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(v);
        }
        let watchdog = watchdog_from(usec.as_deref(), pid.as_deref(), std::process::id());
        match Notifier::new(&socket, watchdog) {
            Ok(n) => Some(n),
            Err(err) => {
                tracing::warn!(%err, socket, "NOTIFY_SOCKET is set but unusable; not notifying systemd");
                None
            }
        }
    }

    /// A notifier for the socket at `path` (`@name` for an abstract socket).
    pub fn new(path: &str, watchdog: Option<Duration>) -> io::Result<Notifier> {
        let addr = match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None if path.starts_with('/') => SocketAddr::from_pathname(path)?,
            None => return Err(io::Error::new(io::ErrorKind::InvalidInput, "not an absolute path or @name")),
        };
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Notifier { sock, addr, watchdog })
    }

    /// How often the loop must ping: half the watchdog timeout, as systemd advises.
    pub fn ping_every(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn ping(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// Best effort, never blocks: a full or missing socket loses the message,
    /// which systemd's own timeouts then account for.
    fn send(&self, msg: &str) {
        if let Err(err) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::debug!(%err, "systemd notify");
        }
    }
}

/// The watchdog timeout systemd set for this process: `WATCHDOG_USEC` when
/// `WATCHDOG_PID` is absent or names `me`; none when zero or unparsable.
fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_ours_only_when_systemd_says_so() {
        let s = Some(Duration::from_secs(30));
        assert_eq!(watchdog_from(Some("30000000"), None, 7), s);
        assert_eq!(watchdog_from(Some("30000000"), Some("7"), 7), s);
        assert_eq!(watchdog_from(Some("30000000"), Some("8"), 7), None, "another process's watchdog");
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_from(None, Some("7"), 7), None);
    }

    #[test]
    fn messages_reach_the_socket_as_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap(), Some(Duration::from_secs(10))).unwrap();
        assert_eq!(n.ping_every(), Some(Duration::from_secs(5)));
        n.ready("3 apps");
        n.ping();
        n.stopping();
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        for _ in 0..3 {
            let len = rx.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert_eq!(got, ["READY=1\nSTATUS=3 apps", "WATCHDOG=1", "STOPPING=1"]);
    }

    #[test]
    fn abstract_sockets_and_bad_paths() {
        let name = format!("skiff-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        Notifier::new(&format!("@{name}"), None).unwrap().ping();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        assert!(Notifier::new("relative/path", None).is_err());
    }
}
