//! Integration tests for `ecowatt-core`.

mod control;
mod link;
mod ota;
mod samplelog;
mod session;
mod virtual_time;
