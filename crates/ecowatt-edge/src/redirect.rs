//! The plain-HTTP port of a TLS server: every request is sent to HTTPS.

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// A 308 to `https://HOST[:https_port]PATH?QUERY` for `request`, or 400
/// (`host_required`) when it names no usable host.
pub(crate) fn to_https(request: &Request, https_port: u16) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(host_without_port)
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b'/'));
    let Some(host) = host else {
        return crate::error::response(
            StatusCode::BAD_REQUEST,
            "host_required",
            "this port redirects to HTTPS and needs a Host header to say where",
        );
    };
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = match https_port {
        443 => format!("https://{host}{path}"),
        port => format!("https://{host}:{port}{path}"),
    };
    (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, location)]).into_response()
}

/// `host` of `host:port`, `[v6]` of `[v6]:port`.
fn host_without_port(value: &str) -> Option<&str> {
    if value.starts_with('[') {
        let end = value.find(']')?;
        return Some(&value[..=end]);
    }
    Some(value.split(':').next().unwrap_or(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(host: Option<&str>, uri: &str, port: u16) -> (u16, Option<String>) {
        let mut request = Request::builder().uri(uri);
        if let Some(h) = host {
            request = request.header(header::HOST, h);
        }
        let response = to_https(&request.body(axum::body::Body::empty()).unwrap(), port);
        let location = response.headers().get(header::LOCATION).map(|l| l.to_str().unwrap().into());
        (response.status().as_u16(), location)
    }

    #[test]
    fn requests_go_to_the_same_host_and_path_over_https() {
        let to = |l: &str| Some(l.to_owned());
        assert_eq!(
            location(Some("example.org"), "/a?b=1", 443),
            (308, to("https://example.org/a?b=1"))
        );
        assert_eq!(
            location(Some("example.org:80"), "/", 8443),
            (308, to("https://example.org:8443/"))
        );
        assert_eq!(location(Some("[::1]:8080"), "/x", 443), (308, to("https://[::1]/x")));
        assert_eq!(location(None, "/", 443), (400, None));
        assert_eq!(location(Some("evil.org/path"), "/", 443), (400, None));
    }
}
