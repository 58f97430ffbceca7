//! The local provider: real PostgreSQL servers on this machine, one per service.

pub mod binaries;
pub mod server;
