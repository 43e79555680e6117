//! Byte ranges (`Range: bytes=...`) for resumable image downloads.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The bytes of an image, whole or the range asked for.
pub fn serve_bytes(headers: &HeaderMap, data: &[u8]) -> Response {
    serve_stream(headers, data.len() as u64, |start, end| {
        data[start as usize..=end as usize].to_vec()
    })
}

/// A body of `len` bytes, whole or the range asked for, made by `bytes(first, last)`
/// (inclusive) for just the part sent.
pub fn serve_stream(
    headers: &HeaderMap,
    len: u64,
    bytes: impl FnOnce(u64, u64) -> Vec<u8>,
) -> Response {
    match byte_range(headers.get(header::RANGE).and_then(|v| v.to_str().ok()), len) {
        Ok(None) => (
            [(header::CONTENT_TYPE, "application/octet-stream"), (header::ACCEPT_RANGES, "bytes")],
            if len == 0 { Vec::new() } else { bytes(0, len - 1) },
        )
            .into_response(),
        Ok(Some((start, end))) => (
            StatusCode::PARTIAL_CONTENT,
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (header::ACCEPT_RANGES, "bytes".to_owned()),
                (header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}")),
            ],
            bytes(start, end),
        )
            .into_response(),
        Err(_) => {
            (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))])
                .into_response()
        }
    }
}

/// A `Range` header that cannot be served (answered with 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A byte range asked for with `Range: bytes=...`, resolved against `len`:
/// `Ok(None)` for the whole body.
pub fn byte_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(h) = header else { return Ok(None) };
    let spec = h.trim().strip_prefix("bytes=").ok_or(Unsatisfiable)?;
    if spec.contains(',') {
        return Err(Unsatisfiable); // one range at a time
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| Unsatisfiable)?;
            if n == 0 {
                return Err(Unsatisfiable);
            }
            (len.saturating_sub(n), len.checked_sub(1).ok_or(Unsatisfiable)?)
        }
        (s, "") => {
            (s.parse().map_err(|_| Unsatisfiable)?, len.checked_sub(1).ok_or(Unsatisfiable)?)
        }
        (s, e) => {
            let (s, e): (u64, u64) =
                (s.parse().map_err(|_| Unsatisfiable)?, e.parse().map_err(|_| Unsatisfiable)?);
            (s, e.min(len.saturating_sub(1)))
        }
    };
    if start > end || start >= len {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::{Unsatisfiable, byte_range};

    #[test]
    fn ranges() {
        assert_eq!(byte_range(None, 100), Ok(None));
        assert_eq!(byte_range(Some("bytes=0-9"), 100), Ok(Some((0, 9))));
        assert_eq!(byte_range(Some("bytes=90-"), 100), Ok(Some((90, 99))));
        assert_eq!(byte_range(Some("bytes=-10"), 100), Ok(Some((90, 99))));
        assert_eq!(byte_range(Some("bytes=50-500"), 100), Ok(Some((50, 99))));
        for bad in
            ["bytes=100-", "bytes=5-1", "items=0-1", "bytes=0-1,5-6", "bytes=-0", "bytes=a-b"]
        {
            assert_eq!(byte_range(Some(bad), 100), Err(Unsatisfiable), "{bad}");
        }
    }
}
