//! Formats the EcoWatt CLI and server both read or write, so that neither
//! borrows the other's internals: signed firmware manifests as JSON
//! ([`manifest`]), times ([`time`]) and secret files ([`secret`]).

pub mod manifest;
pub mod secret;
pub mod time;
