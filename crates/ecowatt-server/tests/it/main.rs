//! Integration tests for the server: the store suite on SQLite and (when
//! `ECOWATT_TEST_PG_URL` is set) PostgreSQL, the operator API, the legacy API,
//! restarts and concurrency.

mod api;
mod concurrency;
mod control;
mod edge;
mod energy;
mod faults;
mod legacy;
mod machine;
mod mqtt;
mod protocol;
mod rollouts;
mod store;
mod telemetry;
