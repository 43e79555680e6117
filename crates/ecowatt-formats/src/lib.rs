//! Formats the EcoWatt CLI and server both read or write, so that neither
//! borrows the other's internals: signed firmware manifests as JSON
//! ([`manifest`]), times ([`time`]), secret files ([`secret`]) and what is
//! published to MQTT ([`mqtt`]).

pub mod broker;
pub mod manifest;
pub mod mqtt;
pub mod secret;
pub mod time;
