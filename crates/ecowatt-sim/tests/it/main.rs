//! Integration tests for the simulator: the SIM HTTP API through the router,
//! Modbus TCP through a standard client (tokio-modbus), and the physics seen
//! through both.

mod fixture;
mod http_api;
mod modbus_tcp;
