//! Integration tests for `ecowatt-core`.

mod link;
mod samplelog;
mod session;
