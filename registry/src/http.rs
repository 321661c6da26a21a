//! A small HTTP/1.1 client: one request per connection (`Connection: close`),
//! plain TCP or rustls, bodies by Content-Length, chunked, or until close.
//! Just what the distribution API needs; kept small for the agent binary.

use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::TcpStream;

const MAX_HEAD: usize = 64 * 1024;

/// An `http://` or `https://` URL, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Url {
    pub https: bool,
    /// Host name or IP (an IPv6 literal without its brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Option<Url> {
        let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return None;
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') || authority.is_empty() {
            return None;
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => default_port,
                None => return None,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().ok()?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace()) {
            return None;
        }
        Some(Url { https, host, port, path })
    }

    /// `host[:port]` as the Host header writes it (the port only when not the default).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == if self.https { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Resolves a `Location` header against this URL.
    pub fn join(&self, location: &str) -> Option<Url> {
        if location.starts_with("http://") || location.starts_with("https://") {
            return Url::parse(location);
        }
        if location.starts_with("//") {
            return Url::parse(&format!("{}:{location}", if self.https { "https" } else { "http" }));
        }
        let path = if location.starts_with('/') {
            location.to_string()
        } else {
            let base = self.path.split('?').next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{location}")
        };
        Some(Url { path, ..self.clone() })
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The path only: a query may hold a signed URL's credentials.
        let path = self.path.split('?').next().unwrap_or("");
        write!(f, "{}://{}{path}", if self.https { "https" } else { "http" }, self.authority())
    }
}

/// Percent-encodes a query value.
pub(crate) fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// A response whose body has not been read yet.
pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    body: Body,
}

enum Framing {
    Length(u64),
    /// Bytes left in the current chunk; `None` before a chunk-size line.
    Chunked {
        left: Option<u64>,
        done: bool,
    },
    UntilClose {
        done: bool,
    },
}

struct Body {
    reader: BufReader<Box<dyn Conn>>,
    framing: Framing,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Reads body bytes into `buf`: 0 at the end. A body cut short is an
    /// `UnexpectedEof` error.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.body.read(buf).await
    }

    /// The whole body, refused past `limit` bytes, each read within `stall`.
    pub async fn bytes(&mut self, limit: usize, stall: Duration) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::time::timeout(stall, self.read(&mut buf))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "stalled"))??;
            if n == 0 {
                return Ok(out);
            }
            if out.len().saturating_add(n) > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("body longer than {limit} bytes"),
                ));
            }
            out.extend_from_slice(&buf[..n]);
        }
    }
}

impl Body {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match &mut self.framing {
            Framing::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let want = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                let n = self.reader.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(eof());
                }
                *left -= n as u64;
                Ok(n)
            }
            Framing::UntilClose { done } => {
                if *done {
                    return Ok(0);
                }
                let n = self.reader.read(buf).await?;
                *done = n == 0;
                Ok(n)
            }
            Framing::Chunked { left, done } => loop {
                if *done {
                    return Ok(0);
                }
                match left {
                    None => {
                        let line = read_line(&mut self.reader).await?;
                        let size = line.split(';').next().unwrap_or("").trim();
                        let size = u64::from_str_radix(size, 16)
                            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                        if size == 0 {
                            // Trailers, up to the empty line.
                            while !read_line(&mut self.reader).await?.is_empty() {}
                            *done = true;
                        } else {
                            *left = Some(size);
                        }
                    }
                    Some(0) => {
                        if !read_line(&mut self.reader).await?.is_empty() {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "chunk not followed by CRLF",
                            ));
                        }
                        *left = None;
                    }
                    Some(l) => {
                        let want = usize::try_from(*l).unwrap_or(usize::MAX).min(buf.len());
                        let n = self.reader.read(&mut buf[..want]).await?;
                        if n == 0 {
                            return Err(eof());
                        }
                        *l -= n as u64;
                        return Ok(n);
                    }
                }
            },
        }
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the end of the body")
}

/// One CRLF- (or LF-) terminated line, without the terminator, at most 4 KiB.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(eof());
        }
        let (take, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if line.len() > 4096 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        if end {
            while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                line.pop();
            }
            return String::from_utf8(line)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "line not UTF-8"));
        }
    }
}

/// Sends one request and reads the response head. `timeout` bounds the connect
/// and each wait for bytes of the head.
pub(crate) async fn send(
    tls: Option<Arc<rustls::ClientConfig>>,
    url: &Url,
    method: &str,
    headers: &[(&str, String)],
    timeout: Duration,
) -> io::Result<Response> {
    let timed = |what: &'static str| move |_| io::Error::new(io::ErrorKind::TimedOut, what);
    let tcp = tokio::time::timeout(timeout, TcpStream::connect((url.host.as_str(), url.port)))
        .await
        .map_err(timed("connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    let conn: Box<dyn Conn> = if url.https {
        let config = tls.ok_or_else(|| io::Error::other("no TLS configuration"))?;
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad TLS server name"))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        Box::new(
            tokio::time::timeout(timeout, connector.connect(name, tcp))
                .await
                .map_err(timed("TLS handshake timed out"))??,
        )
    } else {
        Box::new(tcp)
    };
    let mut reader = BufReader::with_capacity(32 * 1024, conn);
    let mut req =
        format!("{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", url.path, url.authority());
    for (k, v) in headers {
        if v.contains(['\r', '\n']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("header {k} holds a line break"),
            ));
        }
        req.push_str(k);
        req.push_str(": ");
        req.push_str(v);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let w = reader.get_mut();
    tokio::time::timeout(timeout, async {
        w.write_all(req.as_bytes()).await?;
        w.flush().await
    })
    .await
    .map_err(timed("sending the request timed out"))??;

    // The head, up to the blank line; the rest stays buffered for the body.
    let mut head = Vec::new();
    loop {
        let buf = tokio::time::timeout(timeout, reader.fill_buf())
            .await
            .map_err(timed("no response (stalled)"))??;
        if buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"));
        }
        let n = buf.len();
        let start = head.len().saturating_sub(3);
        head.extend_from_slice(buf);
        if let Some(i) = head[start..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = start + i + 4;
            reader.consume(n - (head.len() - end));
            head.truncate(end);
            break;
        }
        reader.consume(n);
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "response head too long"));
        }
    }
    let mut hs = [httparse::EMPTY_HEADER; 96];
    let mut parsed = httparse::Response::new(&mut hs);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP response")),
    }
    let status = parsed.code.unwrap_or(0);
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string()))
        .collect();
    let get =
        |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    let framing = if method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        Framing::Chunked { left: None, done: false }
    } else if let Some(len) = get("content-length") {
        Framing::Length(
            len.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?,
        )
    } else {
        Framing::UntilClose { done: false }
    };
    Ok(Response { status, headers, body: Body { reader, framing } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn urls() {
        let u = Url::parse("https://auth.example.com/token?service=x").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (true, "auth.example.com", 443, "/token?service=x")
        );
        let u = Url::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!((u.port, u.path.as_str(), u.authority()), (5000, "/", "127.0.0.1:5000".to_string()));
        let u = Url::parse("http://[::1]:8080/v2/").unwrap();
        assert_eq!((u.host.as_str(), u.authority()), ("::1", "[::1]:8080".to_string()));
        assert_eq!(u.join("/x?y").unwrap().path, "/x?y");
        assert_eq!(u.join("z").unwrap().path, "/v2/z");
        assert_eq!(u.join("https://h/p").unwrap().host, "h");
        assert!(Url::parse("ftp://x").is_none());
        assert!(Url::parse("http://user:pw@x/").is_none());
        assert_eq!(Url::parse("https://h/p?sig=secret").unwrap().to_string(), "https://h/p");
        assert_eq!(encode_query("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }

    async fn serve_once(reply: &'static [u8]) -> Url {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(reply).await.unwrap();
        });
        Url::parse(&format!("http://127.0.0.1:{port}/p")).unwrap()
    }

    #[tokio::test]
    async fn bodies_by_length_chunked_and_close() {
        let t = Duration::from_secs(5);
        let u = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello-extra").await;
        let mut r = send(None, &u, "GET", &[], t).await.unwrap();
        assert_eq!((r.status, r.header("x-a")), (200, Some("b")));
        assert_eq!(r.bytes(100, t).await.unwrap(), b"hello");

        let u = serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n").await;
        let mut r = send(None, &u, "GET", &[], t).await.unwrap();
        assert_eq!(r.bytes(100, t).await.unwrap(), b"abcde");

        let u = serve_once(b"HTTP/1.0 200 OK\r\n\r\nuntil close").await;
        let mut r = send(None, &u, "GET", &[], t).await.unwrap();
        assert_eq!(r.bytes(100, t).await.unwrap(), b"until close");

        let u = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort").await;
        let mut r = send(None, &u, "GET", &[], t).await.unwrap();
        assert_eq!(r.bytes(100, t).await.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);

        let u = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789").await;
        let mut r = send(None, &u, "GET", &[], t).await.unwrap();
        assert!(r.bytes(4, t).await.is_err(), "limit holds");
    }
}
