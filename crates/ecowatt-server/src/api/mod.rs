//! The HTTP API: `app(state) -> Router`.

mod auth;
mod commands;
mod config;
mod control;
mod device;
mod devices;
mod docs;
pub mod firmware;
mod json;
mod legacy;
mod ops;
mod ranges;
mod telemetry;
mod tokens;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use ecowatt_edge::BodyGuardLayer;

pub use auth::Operator;
pub use commands::MAX_WAIT_MS as MAX_COMMAND_WAIT_MS;

use crate::metrics::Metrics;
use crate::security::Refusals;
use crate::settings::Settings;
use crate::store::Store;

/// What every handler shares, behind one `Arc`: every request clones it, and
/// a long poll holds its clone while it waits (10,000 of them), so a clone is
/// one counter, not one per aggregate.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// A handle on each aggregate, and the server's own counters and settings.
pub struct Shared {
    /// The store as a whole: its health and its closing (handlers use the
    /// aggregates below).
    pub store: Store,
    /// Operators' tokens and the audit log.
    pub operators: crate::operators::Operators,
    /// Devices and their keys.
    pub devices: crate::devices::Devices,
    /// The config shadows.
    pub configs: crate::config::Configs,
    /// The commands.
    pub commands: crate::commands::Commands,
    /// Export control: fail-safes, tags, curtailments.
    pub control: crate::control::Control,
    /// Stored firmware images.
    pub firmware: crate::firmware::Firmwares,
    /// Firmware rollouts.
    pub rollouts: crate::firmware::Rollouts,
    /// Stored telemetry.
    pub telemetry: crate::telemetry::Telemetry,
    /// The device protocol's transactions.
    pub protocol: crate::protocol::Protocol,
    /// Security events as stored.
    pub security_events: crate::security::SecurityEvents,
    /// Refusals tallied and budgeted per source address (written to
    /// `security_events`).
    pub refusals: Arc<Refusals>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Settings in force.
    pub settings: Arc<Settings>,
    /// Wakes long-polling devices (and ends their waits at shutdown).
    pub news: Arc<crate::news::News>,
    /// The listener's connection counters.
    pub edge: Arc<ecowatt_edge::Stats>,
}

impl AppState {
    /// The state of a server over `store` with `settings`; `news` is the one
    /// the store announces to.
    pub fn new(store: Store, settings: Settings, news: Arc<crate::news::News>) -> Self {
        AppState(Arc::new(Shared {
            operators: store.operators(),
            devices: store.devices(),
            configs: store.configs(),
            commands: store.commands(),
            control: crate::control::Control::new(store.db().clone()),
            firmware: store.firmwares(),
            rollouts: store.rollouts(),
            telemetry: store.telemetry(),
            protocol: store.protocol(),
            security_events: store.security_events(),
            refusals: Arc::new(Refusals::new(settings.refusals_per_minute)),
            metrics: Arc::new(Metrics::default()),
            settings: Arc::new(settings),
            news,
            edge: Arc::new(ecowatt_edge::Stats::default()),
            store,
        }))
    }
}

/// The peer's address, when the request came over a socket (requests driven
/// in-process, as some tests do, have none).
#[derive(Debug, Clone, Copy)]
pub struct Source(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Source(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())))
    }
}

/// The whole API over `state`. Request bodies are read at the edge
/// ([`BodyGuardLayer`]): each group of routes has its limit, refused from the
/// declared length, and the settings' body timeout.
pub fn app(state: AppState) -> Router {
    let timeout = state.settings.body_timeout;
    let device = Router::new()
        .route("/api/v1/device/sync", post(device::sync))
        .route("/api/v1/device/telemetry", post(device::telemetry))
        .route_layer(BodyGuardLayer::new(ecowatt_proto::seal::MAX_LEN, timeout));
    let images = Router::new()
        .route("/api/v1/firmware", get(firmware::list).post(firmware::upload))
        .route_layer(BodyGuardLayer::new(firmware::MAX_IMAGE, timeout));
    let mut operator = Router::new()
        .route("/", get(docs::dashboard))
        .route("/dashboard", get(docs::dashboard))
        .route("/favicon.svg", get(docs::favicon))
        .route("/favicon.ico", get(docs::favicon))
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .route("/api/openapi.json", get(docs::openapi))
        .route("/api/docs", get(docs::page))
        .route("/api/v1/devices", get(devices::list).post(devices::add))
        .route("/api/v1/devices/{name}", get(devices::show).delete(devices::remove))
        .route("/api/v1/devices/{name}/disable", post(devices::disable))
        .route("/api/v1/devices/{name}/enable", post(devices::enable))
        .route("/api/v1/devices/{name}/rotate-key", post(devices::rotate_key))
        .route("/api/v1/devices/{name}/config", get(config::show).patch(config::update))
        .route("/api/v1/devices/{name}/config/history", get(config::history))
        .route(
            "/api/v1/devices/{name}/commands",
            get(commands::list_for_device).post(commands::queue),
        )
        .route("/api/v1/devices/{name}/failsafe", axum::routing::put(control::set_failsafe))
        .route("/api/v1/devices/{name}/tags", axum::routing::put(control::set_tags))
        .route("/api/v1/devices/{name}/ramp", axum::routing::put(control::set_ramp))
        .route("/api/v1/devices/{name}/control", get(control::show))
        .route(
            "/api/v1/devices/{name}/schedule",
            get(control::schedule).put(control::set_schedule).delete(control::clear_schedule),
        )
        .route("/api/v1/devices/{name}/schedule/resume", post(control::resume_schedule))
        .route(
            "/api/v1/groups/{group}/schedule",
            axum::routing::put(control::set_group_schedule).delete(control::clear_group_schedule),
        )
        .route("/api/v1/curtailments", get(control::list).post(control::curtail))
        .route("/api/v1/curtailments/{id}", get(control::get))
        .route("/api/v1/curtailments/{id}/release", post(control::release))
        .route("/api/v1/commands", get(commands::list))
        .route("/api/v1/commands/statistics", get(commands::statistics))
        .route("/api/v1/commands/export", get(commands::export))
        .route("/api/v1/commands/{id}", get(commands::show))
        .route("/api/v1/commands/{id}/cancel", post(commands::cancel))
        .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/api/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route("/api/v1/audit", get(tokens::audit))
        .route("/api/v1/security-events", get(tokens::security_events))
        .route("/api/v1/firmware/{id}/image", get(firmware::image))
        .route("/api/v1/device/firmware/{token}", get(firmware::device_image))
        .route("/api/v1/rollouts", get(firmware::rollouts).post(firmware::start_rollout))
        .route("/api/v1/rollouts/{id}", get(firmware::rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(firmware::act))
        .route("/api/v1/devices/{name}/telemetry", get(telemetry::query))
        .route("/api/v1/devices/{name}/latest", get(telemetry::latest))
        .route("/api/v1/devices/{name}/completeness", get(telemetry::completeness));
    if state.settings.legacy_api {
        operator = operator.merge(legacy::routes());
    }
    let operator = operator.route_layer(BodyGuardLayer::new(state.settings.body_limit, timeout));
    operator
        .merge(device)
        .merge(images)
        .fallback(ops::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        // The guards above enforce every limit; the extractors' own default
        // (2 MB) would refuse a firmware image the guard allowed.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().clone();
    let response = next.run(request).await;
    state.metrics.inc(
        "ecowatt_http_requests_total",
        format!("method=\"{method}\",route=\"{route}\",status=\"{}\"", response.status().as_u16()),
    );
    response
}
