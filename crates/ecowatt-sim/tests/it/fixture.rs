use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ecowatt_sim::clock::ManualClock;
use ecowatt_sim::{RunningSim, SimState, fleet, http};
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// 2026-06-21 12:00:00 UTC.
pub const NOON_MS: u64 = 1_782_043_200_000;

pub struct Fixture {
    pub sim: RunningSim,
    pub clock: Arc<ManualClock>,
}

impl Fixture {
    pub async fn start(count: u8, api_key: Option<&str>) -> Fixture {
        let clock = Arc::new(ManualClock::new(NOON_MS));
        let sim = ecowatt_sim::spawn(
            &fleet(count, 1, 10_000, 0),
            clock.clone(),
            api_key.map(str::to_owned),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        )
        .unwrap();
        Fixture { sim, clock }
    }

    pub fn state(&self) -> Arc<SimState> {
        self.sim.state.clone()
    }

    /// POSTs `body` to `path` through the router; returns status and body text.
    pub async fn post(&self, path: &str, body: &str, auth: Option<&str>) -> (StatusCode, String) {
        let mut req = Request::post(path).header("content-type", "application/json");
        if let Some(key) = auth {
            req = req.header("authorization", key);
        }
        let resp = http::app(self.state())
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// POSTs a frame to `/api/inverter/{read|write}` and returns the answer frame.
    pub async fn frame(&self, endpoint: &str, hex: &str) -> String {
        let (status, body) = self
            .post(&format!("/api/inverter/{endpoint}"), &format!(r#"{{"frame":"{hex}"}}"#), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{endpoint} {hex} -> {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["frame"].as_str().unwrap_or_else(|| panic!("no frame in {body}")).to_owned()
    }
}
