//! Providers: where the services live. Every side effect of `apply` goes through here.

pub mod local;
