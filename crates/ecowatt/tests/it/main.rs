//! The `ecowatt` binary as a user runs it.

mod commands;
mod firmware;
mod server_cli;
mod tls;
mod two_servers;
