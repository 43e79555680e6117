//! Integration tests for `ecowatt-core`.

mod control;
mod link;
mod samplelog;
mod session;
mod virtual_time;
