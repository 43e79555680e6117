//! The Linux shell around `ecowatt-core`.
//!
//! For now it holds the inverter transports ([`transport`]): the course's
//! Inverter SIM HTTP API, Modbus TCP, and Modbus RTU over a serial line (an
//! RS485 adapter on USB), each carrying the core's RTU frames, plus
//! [`transport::open`] which picks one from a URL.

pub mod transport;

/// Waits by sleeping the thread: the real-time [`ecowatt_core::link::Delay`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadDelay;

impl ecowatt_core::link::Delay for ThreadDelay {
    fn delay_ms(&mut self, ms: u32) {
        std::thread::sleep(std::time::Duration::from_millis(u64::from(ms)));
    }
}
