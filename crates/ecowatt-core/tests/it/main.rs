//! Integration tests for `ecowatt-core`.

mod control;
mod doubles;
mod link;
mod machine;
mod ota;
mod samplelog;
mod session;
mod virtual_time;
mod world;
