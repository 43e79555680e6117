//! The little HTTP/1.1 a device needs, without I/O: a request's bytes for a
//! sealed POST or a ranged GET, and the reading of an answer (status,
//! `Content-Length`, body), with limits. The firmware's TCP driver sends the
//! one and feeds the other.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// A server URL taken apart: `http://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Host name or address.
    pub host: String,
    /// Port (80 when not given).
    pub port: u16,
}

impl Origin {
    /// Parses `http://host[:port][/]`.
    pub fn parse(url: &str) -> Result<Origin, HttpError> {
        let rest = url.strip_prefix("http://").ok_or(HttpError::Url)?;
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            return Err(HttpError::Url);
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| HttpError::Url)?),
            None => (rest, 80),
        };
        Ok(Origin { host: String::from(host), port })
    }
}

/// Why an answer could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// Not an `http://host[:port]` URL.
    Url,
    /// The status line or headers are not HTTP/1.x.
    Malformed,
    /// The headers or body are larger than allowed.
    TooLarge,
    /// The connection ended before the body did.
    Truncated,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpError::Url => "not an http://host[:port] URL",
            HttpError::Malformed => "malformed HTTP answer",
            HttpError::TooLarge => "HTTP answer too large",
            HttpError::Truncated => "HTTP answer cut short",
        })
    }
}

/// `POST path` with an octet-stream body; the connection closes after the answer.
pub fn post(origin: &Origin, path: &str, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        origin.host,
        origin.port,
        body.len()
    );
    [head.as_bytes(), body].concat()
}

/// `GET path` of bytes `first..=last`.
pub fn get_range(origin: &Origin, path: &str, first: u64, last: u64) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nRange: bytes={first}-{last}\r\nConnection: close\r\n\r\n",
        origin.host, origin.port
    )
    .into_bytes()
}

/// An answer being read: feed it what the connection brings until it says done.
#[derive(Debug)]
pub struct Answer {
    buf: Vec<u8>,
    limit: usize,
    head: Option<(u16, usize, Option<usize>)>,
}

impl Answer {
    /// Reads an answer whose body is at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Answer { buf: Vec::new(), limit, head: None }
    }

    /// Takes more bytes; `Ok(true)` once the whole answer is in.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<bool, HttpError> {
        self.buf.extend_from_slice(bytes);
        if self.head.is_none() {
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                return if self.buf.len() > 4096 { Err(HttpError::TooLarge) } else { Ok(false) };
            };
            let text = core::str::from_utf8(&self.buf[..end]).map_err(|_| HttpError::Malformed)?;
            let mut lines = text.split("\r\n");
            let status = lines
                .next()
                .filter(|l| l.starts_with("HTTP/1."))
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse::<u16>().ok())
                .ok_or(HttpError::Malformed)?;
            let mut length = None;
            for line in lines {
                let (name, value) = line.split_once(':').ok_or(HttpError::Malformed)?;
                if name.trim().eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>().map_err(|_| HttpError::Malformed)?);
                }
            }
            if length.is_some_and(|l| l > self.limit) {
                return Err(HttpError::TooLarge);
            }
            self.head = Some((status, end + 4, length));
        }
        let (_, start, length) = self.head.expect("set above");
        let body = self.buf.len() - start;
        if body > self.limit {
            return Err(HttpError::TooLarge);
        }
        Ok(length.is_some_and(|l| body >= l))
    }

    /// The connection closed: the status and body, if the answer is whole.
    pub fn finish(mut self) -> Result<(u16, Vec<u8>), HttpError> {
        let (status, start, length) = self.head.ok_or(HttpError::Truncated)?;
        let body = self.buf.split_off(start);
        match length {
            Some(l) if body.len() < l => Err(HttpError::Truncated),
            Some(l) => Ok((status, body[..l].to_vec())),
            None => Ok((status, body)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse() {
        let o = Origin::parse("http://192.0.2.1:8000/").unwrap();
        assert_eq!((o.host.as_str(), o.port), ("192.0.2.1", 8000));
        assert_eq!(Origin::parse("http://cloud.example").unwrap().port, 80);
        for bad in ["https://x", "http://", "http://x:y", "http://x/api"] {
            assert_eq!(Origin::parse(bad), Err(HttpError::Url), "{bad}");
        }
    }

    #[test]
    fn an_answer_is_read_in_pieces_and_held_to_its_length() {
        let o = Origin::parse("http://h:1").unwrap();
        let req = post(&o, "/api/v1/device/sync", b"\x01\x02");
        assert!(req.starts_with(b"POST /api/v1/device/sync HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(req.ends_with(b"Content-Length: 2\r\nConnection: close\r\n\r\n\x01\x02"));
        let whole = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        for cut in 1..whole.len() {
            let mut a = Answer::new(100);
            assert!(!a.feed(&whole[..cut]).unwrap(), "not done at {cut}");
            assert!(a.feed(&whole[cut..]).unwrap());
            assert_eq!(a.finish().unwrap(), (200, b"hello".to_vec()));
        }
        let mut a = Answer::new(100);
        a.feed(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 9\r\n\r\nabc").unwrap();
        assert_eq!(a.finish(), Err(HttpError::Truncated));
        let mut a = Answer::new(4);
        assert_eq!(
            a.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            Err(HttpError::TooLarge)
        );
        let mut a = Answer::new(4);
        assert_eq!(a.feed(b"SSH-2.0\r\n\r\n"), Err(HttpError::Malformed));
        let get = get_range(&o, "/f", 10, 19);
        assert!(String::from_utf8(get).unwrap().contains("Range: bytes=10-19\r\n"));
    }
}
