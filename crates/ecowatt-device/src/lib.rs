//! The Linux shell around `ecowatt-core`.
//!
//! - [`transport`] — the inverter transports: the course's Inverter SIM HTTP
//!   API, Modbus TCP, and Modbus RTU over a serial line (an RS485 adapter on
//!   USB), each carrying the core's RTU frames; [`transport::open`] picks one
//!   from a URL.
//! - [`filekv`] — the key-value store as a directory of atomically replaced files.
//! - [`slots`] — A/B firmware slots as two files, for `ecowatt_core::ota`.
//! - [`net`] — the device protocol over HTTP: sealed POSTs, image range fetches.
//! - [`agent`] — `ecowatt device`: the shell that drives the core's device machine.
//! - [`clock`] — the agent's clock (the system's, or a faster one in tests).
//! - [`mqtt`] — `ecowatt device --mqtt`: states, availability and Home
//!   Assistant discovery straight to a broker; the export limit from it on a
//!   device without a server.

pub mod agent;
pub mod broker;
pub mod clock;
pub mod filekv;
pub mod mqtt;
pub mod net;
pub mod slots;
pub mod transport;

/// Waits by sleeping the thread: the real-time [`ecowatt_core::link::Delay`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadDelay;

impl ecowatt_core::link::Delay for ThreadDelay {
    fn delay_ms(&mut self, ms: u32) {
        std::thread::sleep(std::time::Duration::from_millis(u64::from(ms)));
    }
}
