//! The EcoWatt cloud server.
//!
//! By aggregate (`docs/design.md` has the map): a database core ([`db`]),
//! one module per part of the domain, each with its types, its rules as
//! plain functions and its SQL for both dialects ([`devices`],
//! [`operators`], [`config`], [`commands`], [`protocol`], [`telemetry`],
//! [`firmware`], [`security`]), composed by [`store`]; thin HTTP handlers
//! ([`api`]); start-up and shutdown ([`run`], [`settings`]).

pub mod acme;
pub mod api;
pub mod broker;
pub mod commands;
pub mod config;
pub mod control;
pub mod db;
pub mod devices;
pub mod domain;
pub mod error;
pub mod firmware;
pub mod legacy;
pub mod metrics;
pub mod mqtt;
pub mod news;
pub mod operators;
pub mod protocol;
pub mod registration;
pub mod run;
pub mod security;
pub mod settings;
pub mod store;
pub mod telemetry;

/// `bytes` random bytes from the OS, as lowercase hex (keys, tokens, names).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random number generator works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) use ecowatt_formats::time::{iso8601, now_ms};
