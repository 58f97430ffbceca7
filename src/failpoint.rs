//! Named places where tests make apply crash or fail, to prove that running apply again
//! repairs whatever state that leaves.
//!
//! `PGCONVERGE_FAILPOINTS="backup:dumped=crash,after:4=error"` arms them: `crash` ends
//! the process at once (exit status 137, as if killed: no destructor runs, the lock stays
//! behind), `error` makes the step fail. Unset, a failpoint costs one environment lookup.
//! They are compiled into every build, so the binary the tests break is the one users run.

/// Places inside actions, besides `before:N` and `after:N` around the Nth action and
/// `acted:N` between its work and the record of it (`crate::ledger`).
pub const INSIDE: &[&str] = &[
    "provision:started",
    "backup:dumped",
    "copy:backed_up",
    "restore:roles",
    "restore:restored",
    "deploy:env_written",
    "delete:record_removed",
    "delete:stopped",
];

/// Places inside the logical strategy's actions (`tests/logical.rs` trips them).
pub const LOGICAL: &[&str] =
    &["replicate:subscribed", "replicate:copying", "replicate:streaming", "catch_up:caught_up", "catch_up:recorded"];

/// Passes, fails or crashes, as `PGCONVERGE_FAILPOINTS` says for `name`.
pub fn hit(name: &str) -> Result<(), String> {
    let Ok(spec) = std::env::var("PGCONVERGE_FAILPOINTS") else { return Ok(()) };
    for entry in spec.split(',') {
        match entry.split_once('=') {
            Some((n, "crash")) if n == name => {
                eprintln!("failpoint {name}: crashing");
                std::process::exit(137);
            }
            Some((n, "error")) if n == name => return Err(format!("failpoint {name} tripped")),
            _ => {}
        }
    }
    Ok(())
}
