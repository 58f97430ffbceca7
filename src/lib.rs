//! pgconverge: a declarative reconciler for PostgreSQL service versions.
//!
//! The pure core (`config`, `model`, `plan`, `render`) never touches the file system, a
//! process or the network; `cli` is where effects live.

pub mod apply;
pub mod atomic;
pub mod binaries;
pub mod cli;
pub mod config;
pub mod failpoint;
pub mod init;
pub mod interrupt;
pub mod ledger;
pub mod localdev;
pub mod model;
pub mod plan;
pub mod process;
pub mod progress;
pub mod provider;
pub mod render;
pub mod state;
