//! The inverter transports against the simulator (SIM HTTP API, Modbus TCP)
//! and against a simulated inverter on a pseudo-terminal (serial RTU).

mod agent;
mod mqtt;
mod serial;
mod sim_http;
mod slots;
mod tcp;
mod update;

use ecowatt_core::link::{Client, RetryPolicy, Transport};

/// A client with fast retries, so tests that exercise them stay quick.
pub fn client<T: Transport>(transport: T) -> Client<T, ecowatt_device::ThreadDelay> {
    Client::new(transport, ecowatt_device::ThreadDelay).with_policy(RetryPolicy {
        attempts: 3,
        initial_backoff_ms: 1,
        max_backoff_ms: 5,
    })
}
