//! `/api/openapi.json` and `/api/docs`: the API described, readable offline.

use axum::Json;
use axum::response::Html;
use serde_json::{Value, json};

/// `/api/openapi.json`: the OpenAPI 3.1 document generated from the
/// handlers' annotations and types ([`super::openapi`]).
pub async fn openapi() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(super::openapi())
}

/// Who may call an operation, from its OpenAPI entry.
fn needs(path: &str, op: &Value) -> &'static str {
    let bearer: Vec<&Value> =
        op["security"].as_array().into_iter().flatten().filter_map(|r| r.get("bearer")).collect();
    if bearer.iter().any(|scopes| scopes.as_array().is_some_and(|s| s.contains(&json!("admin")))) {
        "admin token"
    } else if !bearer.is_empty() {
        "any token"
    } else if path.ends_with("{token}") {
        "download token in the path"
    } else if path.starts_with("/api/v1/device/") {
        "sealed envelope"
    } else {
        "nothing (no token)"
    }
}

/// `/api/docs`: a self-contained page (no CDN, no script) listing every
/// endpoint of the generated OpenAPI document.
pub async fn page() -> Html<String> {
    let doc = serde_json::to_value(super::openapi()).expect("the document serialises");
    let mut rows = String::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            let Some(summary) = op["summary"].as_str() else { continue };
            let params: Vec<String> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "query")
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect();
            rows.push_str(&format!(
                "<tr><td><code>{}</code></td><td><code>{}</code>{}</td><td>{}</td><td>{}</td></tr>\n",
                method.to_uppercase(),
                esc(path),
                if params.is_empty() {
                    String::new()
                } else {
                    format!("<br><small>?{}</small>", esc(&params.join(", ")))
                },
                esc(summary),
                needs(path, op)
            ));
        }
    }
    Html(format!(
        "<!doctype html><html lang=en><meta charset=utf-8><title>EcoWatt API</title>\
         <link rel=icon href=/favicon.svg type=image/svg+xml>\
         <style>body{{font-family:system-ui,sans-serif;max-width:64rem;margin:2rem auto;padding:0 1rem}}\
         table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:.4rem;text-align:left;vertical-align:top}}</style>\
         <h1>EcoWatt server API</h1><p>Send <code>Authorization: Bearer &lt;token&gt;</code> to every \
         operator endpoint under <code>/api/v1</code> (<code>/healthz</code> and <code>/metrics</code> need none; \
         device endpoints are sealed envelopes). Errors are <code>{{\"error\": {{\"code\", \"message\", \"field\"}}}}</code>. \
         Machine-readable, with every schema: <a href=\"/api/openapi.json\">/api/openapi.json</a> \
         (generated from the server's own handlers and types).</p>\
         <table><tr><th>method</th><th>path</th><th>what</th><th>needs</th></tr>{rows}</table></html>"
    ))
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The web dashboard: one self-contained page (no CDN), talking to `/api/v1`
/// with the operator's token.
pub async fn dashboard() -> impl axum::response::IntoResponse {
    use axum::http::header;
    // Everything the page needs is in it or from this server: nothing else
    // may be loaded, framed around it, or told where the operator came from.
    const POLICY: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; \
        style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; \
        frame-ancestors 'none'; base-uri 'none'; form-action 'self'";
    (
        [
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(include_str!("dashboard.html")),
    )
}

/// The version of the charting library the dashboard uses (vendor/uplot).
pub const UPLOT_VERSION: &str = "1.6.32";

/// The vendored uPlot script (`/dashboard/uplot-1.6.32.min.js`): the
/// dashboard's charts, served from here, cached for a year (its name
/// changes with its version).
pub async fn uplot_js() -> impl axum::response::IntoResponse {
    vendored("text/javascript; charset=utf-8", include_str!("vendor/uplot/uPlot.iife.min.js"))
}

/// The vendored uPlot style sheet (`/dashboard/uplot-1.6.32.min.css`).
pub async fn uplot_css() -> impl axum::response::IntoResponse {
    vendored("text/css; charset=utf-8", include_str!("vendor/uplot/uPlot.min.css"))
}

fn vendored(kind: &'static str, body: &'static str) -> impl axum::response::IntoResponse {
    use axum::http::header;
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// The dashboard's icon (a sun over a panel), for `/favicon.svg` and the
/// `/favicon.ico` browsers ask for on their own: a page load logs no error.
pub async fn favicon() -> impl axum::response::IntoResponse {
    const ICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 32 32\">\
<circle cx=\"16\" cy=\"12\" r=\"6\" fill=\"#f5c211\"/>\
<path d=\"M4 30 L9 20 H23 L28 30 Z\" fill=\"#1a5fb4\"/>\
<path d=\"M11 20 L9 30 M21 20 L23 30 M6.5 25 H25.5\" stroke=\"#fff\" stroke-width=\"1.2\"/></svg>";
    (
        [
            (axum::http::header::CONTENT_TYPE, "image/svg+xml"),
            (axum::http::header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        ICON,
    )
}
