//! A real mosquitto for the MQTT tests, run with the shipped config.
//!
//! `Broker::start` makes a throw-away directory with the two CAs the shipped
//! `examples/mosquitto/mosquitto.conf` expects (`ca.crt`: the server
//! certificate for 127.0.0.1 and one client certificate per device name, CN =
//! the name; `controller-ca.crt`: the controller's certificate), copies that
//! config and `skiff.acl` with only the ports and paths changed, and starts
//! mosquitto on two free loopback ports:
//! - the device listener (mTLS, `use_identity_as_username`,
//!   `use_username_as_clientid`: a device can neither pose as another nor kick
//!   it off by reusing its client id);
//! - the controller listener (mTLS with the controller CA only, identity as
//!   username, any client id, so several `skiffctl` runs can be connected at
//!   once; no device certificate is admitted).
//!
//! The ACL confines each device to its own topics; `skiffctl` may read and
//! write all of `skiff/v1/#`. The broker is stopped by its PID (SIGTERM, then
//! SIGKILL) on drop and never listens anywhere but 127.0.0.1.
//!
//! The tests drive the agent's own link module, the very code the daemon runs.

pub use skiff_agent::link;

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, Transport};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// The name on the controller's certificate.
pub const CONTROLLER: &str = "skiffctl";

pub struct Broker {
    dir: tempfile::TempDir,
    /// Port of the device listener.
    pub device_port: u16,
    /// Port of the controller listener.
    pub controller_port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Certificates for `clients` (plus `skiffctl`), config, ACL; then starts it.
    pub fn start(clients: &[&str]) -> Result<Broker> {
        let dir = tempfile::Builder::new().prefix("skiff-mqtt-").tempdir()?;
        make_certs(dir.path(), clients)?;
        let broker = Broker { device_port: free_port()?, controller_port: free_port()?, dir, child: None };
        broker.write_config()?;
        let mut broker = broker;
        broker.run()?;
        Ok(broker)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir().join("ca.crt")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir().join(format!("{name}.crt"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir().join(format!("{name}.key"))
    }

    pub fn device_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.device_port)
    }

    pub fn controller_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.controller_port)
    }

    /// The broker's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("mosquitto.log")).unwrap_or_default()
    }

    /// The shipped `examples/mosquitto/` config and ACL, with only what a
    /// test needs changed: the listeners' ports (bound to 127.0.0.1), the
    /// certificate, ACL and persistence paths (into the test directory), and
    /// a log file (plus `user root` when run as root, so mosquitto can read
    /// the directory). Every substitution must match, so a change to the
    /// shipped files that the tests no longer cover fails here.
    fn write_config(&self) -> Result<()> {
        let d = self.dir();
        let shipped = crate::agent::repo().join("examples/mosquitto");
        std::fs::copy(shipped.join("skiff.acl"), d.join("skiff.acl")).context("shipped skiff.acl")?;
        let mut conf =
            std::fs::read_to_string(shipped.join("mosquitto.conf")).context("shipped mosquitto.conf")?;
        let dir = format!("{}/", d.display());
        let subs = [
            ("listener 8883\n", format!("listener {} 127.0.0.1\n", self.device_port)),
            ("listener 8884\n", format!("listener {} 127.0.0.1\n", self.controller_port)),
            ("/etc/mosquitto/certs/", dir.clone()),
            ("/etc/mosquitto/", dir.clone()),
            ("/var/lib/mosquitto/", dir),
        ];
        for (from, to) in subs {
            if !conf.contains(from) {
                bail!("the shipped mosquitto.conf no longer holds {from:?}; update tests/src/mqtt.rs");
            }
            conf = conf.replace(from, &to);
        }
        if let Some(line) = conf.lines().find(|l| l.contains("/etc/") || l.contains("/var/")) {
            bail!("the shipped mosquitto.conf has a path the tests do not redirect: {line}");
        }
        let user = if nix::unistd::geteuid().is_root() { "user root\n" } else { "" };
        let log = format!(
            "{user}log_dest file {}\nlog_type error\nlog_type warning\nlog_type notice\n\
             log_type information\nconnection_messages true\n",
            d.join("mosquitto.log").display()
        );
        std::fs::write(d.join("mosquitto.conf"), format!("{log}{conf}"))?;
        Ok(())
    }

    /// The value of `option` in the config the broker runs (the shipped one).
    pub fn config_value(&self, option: &str) -> Option<String> {
        let conf = std::fs::read_to_string(self.dir().join("mosquitto.conf")).ok()?;
        conf.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(option)).then(|| words.collect::<Vec<_>>().join(" "))
        })
    }

    fn run(&mut self) -> Result<()> {
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let out = std::fs::File::create(self.dir().join("mosquitto.out"))?;
        let child = Command::new(exe)
            .arg("-c")
            .arg(self.dir().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {exe} (is mosquitto installed?)"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        for port in [self.device_port, self.controller_port] {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
                if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                    bail!("mosquitto exited with {status}: {}", self.startup_output());
                }
                if Instant::now() > deadline {
                    bail!("mosquitto is not listening on {port} after 5 s: {}", self.startup_output());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    fn startup_output(&self) -> String {
        let out = std::fs::read_to_string(self.dir().join("mosquitto.out")).unwrap_or_default();
        format!("{out}{}", self.log())
    }

    /// Stops the broker (SIGTERM: it saves sessions and retained messages).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) if Instant::now() > deadline => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports, with what it saved.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.run()
    }

    /// TLS options for a raw client with `name`'s certificate.
    pub fn options(&self, name: &str, client_id: &str, port: u16) -> Result<MqttOptions> {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        // Large enough to send what the broker must refuse.
        o.set_max_packet_size(4 << 20, 4 << 20);
        o.set_transport(Transport::tls(
            std::fs::read(self.ca())?,
            Some((std::fs::read(self.cert(name))?, std::fs::read(self.key(name))?)),
            None,
        ));
        Ok(o)
    }

    /// A raw client, polled in a task: every PUBLISH it receives comes out of
    /// the channel. `Connected` tells when each (re)connection is up.
    pub fn raw_client(&self, name: &str, client_id: &str, port: u16, clean: bool) -> Result<RawClient> {
        let mut o = self.options(name, client_id, port)?;
        o.set_clean_session(clean);
        let (client, eventloop) = AsyncClient::new(o, 256);
        Ok(RawClient::spawn(client, eventloop))
    }

    /// The controller's client on the controller listener.
    pub fn controller(&self, client_id: &str, clean: bool) -> Result<RawClient> {
        self.raw_client(CONTROLLER, client_id, self.controller_port, clean)
    }

    /// A link config for device `name` with its certificate and short timers.
    pub fn link_config(&self, name: &str, controller_key: [u8; 32]) -> link::LinkConfig {
        let device = skiff_common::protocol::DeviceId::try_from(name).expect("device id");
        let mut cfg = link::LinkConfig::new(self.device_url(), device, controller_key);
        cfg.ca = Some(self.ca());
        cfg.cert = Some(self.cert(name));
        cfg.key = Some(self.key(name));
        cfg.keepalive = Duration::from_secs(1);
        cfg.connect_timeout = Duration::from_secs(1);
        cfg.reconnect_min = Duration::from_millis(50);
        cfg.reconnect_max = Duration::from_millis(400);
        cfg
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A plain rumqttc client for tests, with its event loop in a task.
pub struct RawClient {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Publish>,
    /// Count of CONNACKs so far.
    pub connects: watch::Receiver<u64>,
    /// Return codes of every SUBACK (0x80 = refused).
    pub subacks: watch::Receiver<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawClient {
    fn spawn(client: AsyncClient, mut eventloop: EventLoop) -> RawClient {
        let (tx, rx) = mpsc::unbounded_channel();
        let (conn_tx, connects) = watch::channel(0u64);
        let (sub_tx, subacks) = watch::channel(Vec::new());
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => conn_tx.send_modify(|n| *n += 1),
                    Ok(Event::Incoming(Packet::SubAck(a))) => sub_tx.send_modify(|v| {
                        v.extend(a.return_codes.iter().map(|c| match c {
                            rumqttc::SubscribeReasonCode::Success(q) => *q as u8,
                            rumqttc::SubscribeReasonCode::Failure => 0x80,
                        }))
                    }),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        RawClient { client, rx, connects, subacks, task }
    }

    /// Waits for the `n`th connection.
    pub async fn connected(&mut self, n: u64) -> Result<()> {
        wait_for(&mut self.connects, |c| *c >= n, Duration::from_secs(10)).await
    }

    /// The next PUBLISH, or an error after `within`.
    pub async fn next(&mut self, within: Duration) -> Result<Publish> {
        match tokio::time::timeout(within, self.rx.recv()).await {
            Ok(Some(p)) => Ok(p),
            Ok(None) => bail!("client task ended"),
            Err(_) => bail!("no message within {within:?}"),
        }
    }

    /// The next PUBLISH on a topic ending with `suffix` (others are skipped).
    pub async fn next_on(&mut self, suffix: &str, within: Duration) -> Result<Publish> {
        let end = tokio::time::Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let p = self.next(left).await.with_context(|| format!("waiting for *{suffix}"))?;
            if p.topic.ends_with(suffix) {
                return Ok(p);
            }
        }
    }

    /// Messages arriving within `within`, all of them.
    pub async fn drain(&mut self, within: Duration) -> Vec<Publish> {
        let mut out = Vec::new();
        let end = tokio::time::Instant::now() + within;
        while let Ok(Some(p)) = tokio::time::timeout_at(end, self.rx.recv()).await {
            out.push(p);
        }
        out
    }
}

impl Drop for RawClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `f` holds for the watched value.
pub async fn wait_for<T>(
    rx: &mut watch::Receiver<T>,
    f: impl FnMut(&T) -> bool,
    within: Duration,
) -> Result<()> {
    match tokio::time::timeout(within, rx.wait_for(f)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => bail!("sender gone"),
        Err(_) => bail!("condition not met within {within:?}"),
    }
}

/// A TCP proxy that can freeze: while frozen it neither reads nor writes, but
/// keeps every socket open, like a broker whose process is stuck.
pub struct FreezingProxy {
    pub port: u16,
    frozen: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezingProxy {
    pub async fn start(target_port: u16) -> Result<FreezingProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (frozen, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pipe(ri, wo, rx.clone()), pipe(ro, wi, rx));
                });
            }
        });
        Ok(FreezingProxy { port, frozen, task })
    }

    pub fn freeze(&self, on: bool) {
        self.frozen.send_replace(on);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = frozen.wait_for(|f| *f) => continue,
        };
        // Data read just as the freeze began waits for the thaw too.
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().context("cannot run openssl")?;
    if !out.status.success() {
        bail!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Two P-256 CAs as the shipped config wants them: `ca.crt` signs the
/// server certificate (for 127.0.0.1) and one client certificate per device
/// name; `controller-ca.crt` signs the controller's. All valid for two days.
fn make_certs(dir: &Path, clients: &[&str]) -> Result<()> {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    for (name, cn) in [("ca", "skiff-test-ca"), ("controller-ca", "skiff-test-controller-ca")] {
        let (key, crt, subj) = (format!("{name}.key"), format!("{name}.crt"), format!("/CN={cn}"));
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &ca)?;
    }
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")?;
    let mut names: Vec<(&str, &str, &str)> = vec![("server", "server.ext", "ca")];
    names.extend(clients.iter().map(|c| (*c, "client.ext", "ca")));
    names.push((CONTROLLER, "client.ext", "controller-ca"));
    for (name, ext, ca) in names {
        let (key, csr, crt, subj) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("/CN={name}"));
        let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &crt,
            ],
        )?;
    }
    Ok(())
}

/// A controller state of `generation` with one app, as `skiffctl apply` makes it.
pub fn controller_state(generation: u64) -> skiff_common::DesiredState {
    let text = "[[app]]\nname = \"web\"\nimage = \"busybox:1\"\ncommand = [\"httpd\", \"-f\"]\n";
    let mut s = skiff_common::toml_file::parse(text).expect("sample apps.toml");
    s.generation = generation;
    s.origin = skiff_common::Origin::Controller;
    s
}
