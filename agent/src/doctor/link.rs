//! The doctor's checks of the controller link, when one is configured: the
//! broker answers a TCP connect and a TLS handshake (with the device's CA and
//! client certificate) within a short timeout, and the device certificate's
//! validity dates hold the clock. Both only warn: the agent runs its apps
//! offline.
//!
//! The settings come as the agent under systemd gets them: `agent.env`
//! (systemd's `EnvironmentFile=` syntax, the subset skiff's files use), with the
//! process environment winning, as it does for `skiff agent` run by hand.
//! Reading the certificate's dates is pure ([`validity`]); only [`probe`]
//! touches the network, and it never sends an MQTT byte.

use super::{check, Check, Level};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
// Monotonic; outside a runtime it is the std clock.
use tokio::time::Instant;

/// A certificate that expires sooner than this warns.
const EXPIRY_WARNING: u64 = 30 * 86_400;

/// The link settings doctor checks (the agent's `--mqtt-*` options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSettings {
    pub broker: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// `KEY=value` lines of an environment file: `#` and `;` comments, blank
/// lines, optional `export `, values in single or double quotes.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
                return None;
            }
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = ['"', '\'']
                .iter()
                .find_map(|q| v.strip_prefix(*q).and_then(|x| x.strip_suffix(*q)))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// The link settings from the environment (`env`) over the file's lines, or
/// None when no broker is set.
pub fn settings(file: &[(String, String)], env: impl Fn(&str) -> Option<String>) -> Option<LinkSettings> {
    let get = |k: &str| {
        env(k)
            .or_else(|| file.iter().rev().find(|(fk, _)| fk == k).map(|(_, v)| v.clone()))
            .filter(|v| !v.is_empty())
    };
    Some(LinkSettings {
        broker: get("SKIFF_MQTT_BROKER")?,
        ca: get("SKIFF_MQTT_CA").map(PathBuf::from),
        cert: get("SKIFF_MQTT_CERT").map(PathBuf::from),
        key: get("SKIFF_MQTT_KEY").map(PathBuf::from),
    })
}

/// The checks of a configured link: the certificate's dates against `now`,
/// then the broker within `timeout`.
pub fn checks(s: &LinkSettings, now: SystemTime, timeout: Duration) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(cert) = &s.cert {
        out.push(match std::fs::read(cert) {
            Err(e) => check(
                "certificate",
                Level::Warn,
                format!("cannot read {}: {e}", cert.display()),
                Some("check SKIFF_MQTT_CERT in /etc/skiff/agent.env"),
            ),
            Ok(pem) => certificate(&cert.display().to_string(), &pem, now),
        });
    }
    out.push(probe(s, timeout));
    out
}

/// The device certificate's validity against the clock.
pub fn certificate(name: &str, pem: &[u8], now: SystemTime) -> Check {
    let now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let der = match CertificateDer::pem_slice_iter(pem).next() {
        Some(Ok(d)) => d,
        _ => {
            return check("certificate", Level::Warn, format!("{name} holds no PEM certificate"), None);
        }
    };
    let Some((from, until)) = validity(der.as_ref()) else {
        return check("certificate", Level::Warn, format!("{name}: cannot read its validity dates"), None);
    };
    let span = format!("valid {} to {}", super::civil_date(from), super::civil_date(until));
    if now < from {
        check(
            "certificate",
            Level::Warn,
            format!("{name} is not valid yet ({span}; the clock reads {}): TLS to the broker fails", super::civil_date(now)),
            Some("set the clock (time sync or a real-time clock); if the clock is right, reissue the certificate"),
        )
    } else if now > until {
        check(
            "certificate",
            Level::Warn,
            format!("{name} has expired ({span}): the broker refuses this device"),
            Some("issue a new certificate (CN = device id) from the fleet CA and replace the file"),
        )
    } else if until - now < EXPIRY_WARNING {
        check(
            "certificate",
            Level::Warn,
            format!("{name} expires in {} days ({span})", (until - now) / 86_400),
            Some("issue a new certificate (CN = device id) from the fleet CA before then"),
        )
    } else {
        check("certificate", Level::Ok, format!("{name} {span}, {} days left", (until - now) / 86_400), None)
    }
}

/// notBefore and notAfter (Unix seconds) of a DER X.509 certificate:
/// Certificate ::= SEQUENCE { tbs SEQUENCE { [0] version OPTIONAL, serial,
/// signature, issuer, validity SEQUENCE { Time, Time }, ... }, ... }.
pub fn validity(der: &[u8]) -> Option<(u64, u64)> {
    let (tag, cert, _) = tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after; // the version
    }
    for _ in 0..3 {
        // serial, signature algorithm, issuer
        rest = tlv(rest)?.2;
    }
    let (tag, validity, _) = tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (t1, not_before, rest) = tlv(validity)?;
    let (t2, not_after, _) = tlv(rest)?;
    Some((time(t1, not_before)?, time(t2, not_after)?))
}

/// One DER tag-length-value: (tag, value, what follows). Single-byte tags,
/// definite lengths of up to 4 bytes, nothing past the input.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, head) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    Some((tag, b.get(head..end)?, b.get(end..)?))
}

/// UTCTime (tag 0x17, `YYMMDDHHMMSSZ`, 50-99 = 19xx) or GeneralizedTime
/// (0x18, `YYYYMMDDHHMMSSZ`) to Unix seconds.
fn time(tag: u8, v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    let s = s.strip_suffix('Z')?;
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, s.len()) {
        (0x17, 12) => {
            let yy: u64 = s[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (0x18, 14) => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let n = |i: usize| -> Option<u64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, hour, min, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if year < 1970
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || min > 59
        || sec > 60
    {
        return None;
    }
    // Days from civil (Howard Hinnant), the inverse of doctor's civil_date.
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + hour * 3600 + min * 60 + sec)
}

/// A TCP connect to the broker and, for `mqtts://`, a TLS handshake with the
/// device's CA and client certificate, within `timeout` in all.
pub fn probe(s: &LinkSettings, timeout: Duration) -> Check {
    let url = match skiff_common::protocol::BrokerUrl::try_from(s.broker.as_str()) {
        Ok(u) => u,
        Err(e) => {
            return check(
                "broker",
                Level::Fail,
                e.to_string(),
                Some("fix SKIFF_MQTT_BROKER in /etc/skiff/agent.env"),
            )
        }
    };
    let start = Instant::now();
    let fix = "check the network, the broker's address and port, and that the broker runs";
    let addrs: Vec<_> = match (url.host.as_str(), url.port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            return check(
                "broker",
                Level::Warn,
                format!("{url}: cannot resolve {}: {e}", url.host),
                Some(fix),
            )
        }
    };
    let mut last = None;
    let mut sock = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(mut sock) = sock else {
        let why = last.map(|e| e.to_string()).unwrap_or_else(|| "no address".into());
        return check("broker", Level::Warn, format!("{url}: cannot connect: {why}"), Some(fix));
    };
    if !url.tls {
        return check(
            "broker",
            Level::Ok,
            format!("{url}: TCP connect in {} ms (plain MQTT)", ms(start)),
            None,
        );
    }
    let left = timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(100));
    let _ = sock.set_read_timeout(Some(left));
    let _ = sock.set_write_timeout(Some(left));
    match handshake(s, &url.host, &mut sock) {
        Ok(()) => check(
            "broker",
            Level::Ok,
            format!("{url}: TCP and TLS handshake in {} ms (the broker accepted this device's certificate)", ms(start)),
            None,
        ),
        Err(e) => check(
            "broker",
            Level::Warn,
            format!("{url}: TLS handshake failed: {e}"),
            Some("check the clock, SKIFF_MQTT_CA (the CA of the broker's certificate) and the device certificate and key"),
        ),
    }
}

fn ms(start: Instant) -> u128 {
    start.elapsed().as_millis()
}

fn handshake(s: &LinkSettings, host: &str, sock: &mut TcpStream) -> Result<(), String> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let ca = s.ca.as_ref().ok_or("no SKIFF_MQTT_CA for an mqtts:// broker")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(ca)?) {
        let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match (&s.cert, &s.key) {
        (Some(c), Some(k)) => {
            let chain = CertificateDer::pem_slice_iter(&read(c)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", c.display()))?;
            let key =
                PrivateKeyDer::from_pem_slice(&read(k)?).map_err(|e| format!("{}: {e}", k.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(sock).map_err(|e| e.to_string())?;
    }
    // With TLS 1.3 the server checks the client certificate after the client's
    // handshake ends: a refusal comes as an alert on the first read. Wait a
    // moment for one (an MQTT broker sends nothing before CONNECT).
    let _ = sock.set_read_timeout(Some(Duration::from_millis(300)));
    match conn.complete_io(sock) {
        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut => {
            return Err(format!("the broker refused this device: {e}"));
        }
        _ => {}
    }
    let mut buf = [0u8; 1];
    if let Err(e) = conn.reader().read(&mut buf) {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(format!("the broker closed the connection: {e}"));
        }
    }
    conn.send_close_notify();
    let _ = conn.write_tls(sock);
    let _ = sock.flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::path::Path;
    use std::process::Command;

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Two CAs (`ca`, `other-ca`), a server certificate for 127.0.0.1 and a
    /// client certificate `device` from `ca`, and `stranger` from `other-ca`.
    fn pki(dir: &Path) {
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let mut a = vec!["req", "-x509"];
            a.extend(ec);
            let (k, c, subj) = (format!("{ca}.key"), format!("{ca}.crt"), format!("/CN={ca}"));
            a.extend(["-keyout", &k, "-out", &c, "-days", "2", "-subj", &subj]);
            a.extend([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ]);
            openssl(dir, &a);
        }
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
            .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, ext, ca) in [
            ("server", "server.ext", "ca"),
            ("device", "client.ext", "ca"),
            ("stranger", "client.ext", "other-ca"),
        ] {
            let (k, csr, c, subj) =
                (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("/CN={name}"));
            let mut a = vec!["req"];
            a.extend(ec);
            a.extend(["-keyout", &k, "-out", &csr, "-subj", &subj]);
            openssl(dir, &a);
            let (cac, cak) = (format!("{ca}.crt"), format!("{ca}.key"));
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &cac,
                    "-CAkey",
                    &cak,
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    ext,
                    "-out",
                    &c,
                ],
            );
        }
    }

    /// A TLS listener on 127.0.0.1 that requires a client certificate from
    /// `ca.crt` and then holds each connection open (as a broker waiting for
    /// CONNECT). Returns its port; the thread ends with the test process.
    fn tls_listener(dir: &Path) -> u16 {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("server.crt")).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(dir.join("ca.crt")).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(mut sock) = sock else { continue };
                let config = config.clone();
                std::thread::spawn(move || {
                    let mut conn = rustls::ServerConnection::new(config).unwrap();
                    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
                    while conn.is_handshaking() {
                        if conn.complete_io(&mut sock).is_err() {
                            return;
                        }
                    }
                    // Wait for the client to go (or 5 s).
                    let mut buf = [0u8; 64];
                    let _ = conn.complete_io(&mut sock);
                    let _ = conn.reader().read(&mut buf);
                });
            }
        });
        port
    }

    fn link(dir: &Path, port: u16, client: &str, ca: &str) -> LinkSettings {
        LinkSettings {
            broker: format!("mqtts://127.0.0.1:{port}"),
            ca: Some(dir.join(format!("{ca}.crt"))),
            cert: Some(dir.join(format!("{client}.crt"))),
            key: Some(dir.join(format!("{client}.key"))),
        }
    }

    #[test]
    fn a_reachable_broker_that_accepts_the_device_passes_and_others_warn_saying_why() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        pki(dir);
        let port = tls_listener(dir);
        let timeout = Duration::from_secs(3);

        let ok = probe(&link(dir, port, "device", "ca"), timeout);
        assert_eq!(ok.level, Level::Ok, "{ok:?}");
        assert!(ok.detail.contains("TCP and TLS handshake in"), "{}", ok.detail);

        // The broker refuses a certificate from another CA.
        let refused = probe(&link(dir, port, "stranger", "ca"), timeout);
        assert_eq!(refused.level, Level::Warn, "{refused:?}");
        assert!(refused.detail.contains("TLS handshake failed"), "{}", refused.detail);

        // The device does not trust the broker's certificate.
        let untrusted = probe(&link(dir, port, "device", "other-ca"), timeout);
        assert_eq!(untrusted.level, Level::Warn, "{untrusted:?}");
        assert!(untrusted.detail.contains("UnknownIssuer"), "{}", untrusted.detail);

        // Nobody listens: a closed port answers at once.
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let start = Instant::now();
        let down = probe(&link(dir, closed_port, "device", "ca"), timeout);
        assert_eq!(down.level, Level::Warn, "{down:?}");
        assert!(down.detail.contains("cannot connect"), "{}", down.detail);
        assert!(start.elapsed() < timeout);

        // A bad URL is a configuration error.
        let bad =
            probe(&LinkSettings { broker: "http://x".into(), ca: None, cert: None, key: None }, timeout);
        assert_eq!(bad.level, Level::Fail);
    }

    #[test]
    fn the_certificate_dates_are_read_and_held_against_the_clock() {
        let t = tempfile::tempdir().unwrap();
        pki(t.path());
        let pem = std::fs::read(t.path().join("device.crt")).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (from, until) = validity(der.as_ref()).unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(from <= now + 5 && from + 60 >= now, "notBefore {from} is about now {now}");
        assert_eq!(until - from, 2 * 86_400, "-days 2");
        let at = |secs: u64| certificate("device.crt", &pem, UNIX_EPOCH + Duration::from_secs(secs));

        let soon = at(now);
        assert_eq!(soon.level, Level::Warn, "2 days left warns: {soon:?}");
        assert!(
            soon.detail.starts_with("device.crt expires in 1 days")
                || soon.detail.starts_with("device.crt expires in 2 days"),
            "{}",
            soon.detail
        );
        let in_1970 = at(42);
        assert_eq!(in_1970.level, Level::Warn);
        assert!(
            in_1970.detail.contains("is not valid yet")
                && in_1970.detail.contains("the clock reads 1970-01-01"),
            "{}",
            in_1970.detail
        );
        let expired = at(until + 1);
        assert!(expired.detail.contains("has expired"), "{}", expired.detail);
        assert_eq!(certificate("x", b"junk", UNIX_EPOCH).level, Level::Warn);
    }

    #[test]
    fn der_times_and_lengths() {
        assert_eq!(time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(time(0x18, b"20260101000000Z"), Some(1_767_225_600));
        assert_eq!(time(0x18, b"20000229120000Z"), Some(951_825_600));
        for bad in [&b"700101000000"[..], b"7001010000Z", b"701301000000Z", b"70010100000aZ"] {
            assert_eq!(time(0x17, bad), None, "{bad:?}");
        }
        assert_eq!(tlv(&[0x30, 0x82, 0x00, 0x01, 0xff, 0x01]), Some((0x30, &[0xff][..], &[0x01][..])));
        assert_eq!(tlv(&[0x30, 0x05, 0x00]), None, "a length past the input");
        assert_eq!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]), None, "lengths over 4 bytes");
        assert_eq!(validity(&[]), None);
        assert_eq!(validity(&[0x30, 0x02, 0x30, 0x00]), None);
    }

    #[test]
    fn settings_come_from_the_env_file_with_the_environment_winning() {
        let file = parse_env_file(
            "# comment\n; also\n\nSKIFF_MQTT_BROKER=mqtts://a:8883\nexport SKIFF_MQTT_CA=\"/etc/skiff/ca.crt\"\nSKIFF_MQTT_CERT='/c'\nSKIFF_MQTT_KEY = /k\nJUNK\n",
        );
        let s = settings(&file, |_| None).unwrap();
        assert_eq!(
            s,
            LinkSettings {
                broker: "mqtts://a:8883".into(),
                ca: Some("/etc/skiff/ca.crt".into()),
                cert: Some("/c".into()),
                key: Some("/k".into())
            }
        );
        let s = settings(&file, |k| (k == "SKIFF_MQTT_BROKER").then(|| "mqtts://b:1".to_string())).unwrap();
        assert_eq!(s.broker, "mqtts://b:1");
        assert_eq!(settings(&parse_env_file("#SKIFF_MQTT_BROKER=mqtts://a:8883\n"), |_| None), None);
        assert_eq!(settings(&parse_env_file("SKIFF_MQTT_BROKER=\n"), |_| None), None);
    }
}
