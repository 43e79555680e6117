//! The `ecowatt` binary as a user runs it.

mod commands;
mod server_cli;
