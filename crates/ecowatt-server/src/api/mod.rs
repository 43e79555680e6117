//! The HTTP API: `app(state) -> Router`.

mod auth;
mod commands;
mod config;
mod control;
pub(crate) mod device;
mod devices;
mod docs;
mod energy;
mod export;
pub mod firmware;
pub(crate) mod json;
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
use axum::routing::get;
use ecowatt_edge::BodyGuardLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
    /// Devices running the original firmware, and their uploads.
    pub legacy: crate::legacy::Legacy,
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
            legacy: crate::legacy::Legacy::new(store.db().clone()),
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

/// The OpenAPI document's frame: what the handlers' own annotations do not say.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "EcoWatt server API",
        description = "Operator endpoints take `Authorization: Bearer <token>` (admin or viewer); \
            `/healthz` and `/metrics` need none; device endpoints carry sealed envelopes \
            (docs/protocol.md). Errors are `{\"error\": {\"code\", \"message\", \"field\"}}`. \
            Generated from the handlers' own annotations and types."
    ),
    components(schemas(crate::error::ErrorBody)),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

/// The `bearer` security scheme the operator endpoints name (`admin`: the
/// endpoint needs an admin token; none: any token).
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi.components.get_or_insert_with(Default::default).add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every documented endpoint, each registered from its handler's
/// `#[utoipa::path]` (method and path included), so that the router and the
/// OpenAPI document are one list and cannot drift. Request bodies are read
/// at the edge ([`BodyGuardLayer`]): each group of routes has its limit,
/// refused from the declared length, and the body timeout.
fn routes(body_limit: usize, timeout: std::time::Duration) -> OpenApiRouter<AppState> {
    let device = OpenApiRouter::new()
        .routes(routes!(device::sync))
        .routes(routes!(device::telemetry))
        .route_layer(BodyGuardLayer::new(ecowatt_proto::seal::MAX_LEN, timeout));
    let images = OpenApiRouter::new()
        .routes(routes!(firmware::list, firmware::upload))
        .route_layer(BodyGuardLayer::new(firmware::MAX_IMAGE, timeout));
    let operator = OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::metrics))
        .routes(routes!(devices::list, devices::add))
        .routes(routes!(devices::show, devices::remove))
        .routes(routes!(devices::disable))
        .routes(routes!(devices::enable))
        .routes(routes!(devices::legacy_on, devices::legacy_off))
        .routes(routes!(devices::rotate_key))
        .routes(routes!(devices::broker_accounts))
        .routes(routes!(energy::device_energy))
        .routes(routes!(energy::device_rollups))
        .routes(routes!(export::export))
        .routes(routes!(energy::set_timezone))
        .routes(routes!(energy::fleet_energy))
        .routes(routes!(energy::fleet_overview))
        .routes(routes!(config::show, config::update))
        .routes(routes!(config::history))
        .routes(routes!(commands::list_for_device, commands::queue))
        .routes(routes!(control::set_failsafe))
        .routes(routes!(control::set_tags))
        .routes(routes!(control::set_ramp))
        .routes(routes!(control::show))
        .routes(routes!(control::schedule, control::set_schedule, control::clear_schedule))
        .routes(routes!(control::resume_schedule))
        .routes(routes!(control::set_group_schedule, control::clear_group_schedule))
        .routes(routes!(control::list, control::curtail))
        .routes(routes!(control::get))
        .routes(routes!(control::release))
        .routes(routes!(commands::list))
        .routes(routes!(commands::statistics))
        .routes(routes!(commands::export))
        .routes(routes!(commands::show))
        .routes(routes!(commands::cancel))
        .routes(routes!(tokens::list, tokens::create))
        .routes(routes!(tokens::revoke))
        .routes(routes!(tokens::audit))
        .routes(routes!(tokens::security_events))
        .routes(routes!(firmware::image))
        .routes(routes!(firmware::device_image))
        .routes(routes!(firmware::rollouts, firmware::start_rollout))
        .routes(routes!(firmware::rollout))
        .routes(routes!(firmware::act))
        .routes(routes!(telemetry::query))
        .routes(routes!(telemetry::latest))
        .routes(routes!(telemetry::completeness))
        .route_layer(BodyGuardLayer::new(body_limit, timeout));
    operator.merge(device).merge(images)
}

/// The OpenAPI document of this server (`/api/openapi.json`), from [`routes`].
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOC: std::sync::LazyLock<utoipa::openapi::OpenApi> =
        std::sync::LazyLock::new(|| routes(0, std::time::Duration::ZERO).into_openapi());
    &DOC
}

/// The whole API over `state`: the documented endpoints, the dashboard and
/// the API's own docs, and the seed's legacy API when enabled.
pub fn app(state: AppState) -> Router {
    let timeout = state.settings.body_timeout;
    let (api, _) = routes(state.settings.body_limit, timeout).split_for_parts();
    let pages = Router::new()
        .route("/", get(docs::dashboard))
        .route("/dashboard", get(docs::dashboard))
        .route(&format!("/dashboard/uplot-{}.min.js", docs::UPLOT_VERSION), get(docs::uplot_js))
        .route(&format!("/dashboard/uplot-{}.min.css", docs::UPLOT_VERSION), get(docs::uplot_css))
        .route("/favicon.svg", get(docs::favicon))
        .route("/favicon.ico", get(docs::favicon))
        .route("/api/openapi.json", get(docs::openapi))
        .route("/api/docs", get(docs::page));
    let mut app = api.merge(pages);
    if state.settings.legacy_api {
        app = app.merge(
            legacy::routes().route_layer(BodyGuardLayer::new(state.settings.body_limit, timeout)),
        );
    }
    app.fallback(ops::not_found)
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
