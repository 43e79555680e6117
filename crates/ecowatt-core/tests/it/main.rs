//! Integration tests for `ecowatt-core`.

mod link;
mod session;
