//! The `ecowatt` binary as a user runs it.

mod broker;
mod cli;
mod commands;
mod firmware;
mod server_cli;
mod tls;
mod two_servers;
