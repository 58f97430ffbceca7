//! Named places where tests make apply crash or fail, to prove that running apply again
//! repairs whatever state that leaves.
//!
//! `PGCONVERGE_FAILPOINTS="backup:dumped=crash,after:4=error"` arms them: `crash` ends
//! the process at once (exit status 137, as if killed: no destructor runs, the lock stays
//! behind), `error` makes the step fail, `sleep<ms>` makes it take that long. Unset, a failpoint costs one environment lookup.
//! They are compiled into every build, so the binary the tests break is the one users run.

use crate::config::Strategy;

/// Places inside the actions of every strategy.
const COMMON: &[&str] = &["provision:started", "deploy:env_written", "delete:record_removed", "delete:stopped"];

/// Places inside the dump_restore strategy's copy.
const DUMP_RESTORE: &[&str] = &["backup:dumped", "copy:backed_up", "restore:roles", "restore:restored"];

/// Places inside the logical strategy's copy.
const LOGICAL: &[&str] = &[
    "replicate:slot",
    "replicate:copied",
    "replicate:subscribed",
    "replicate:streaming",
    "catch_up:caught_up",
    "catch_up:recorded",
];

/// Places inside the pg_upgrade strategy's upgrade: with the old server stopped, after
/// pg_upgrade, after the new server's first start.
const PG_UPGRADE: &[&str] = &["upgrade:stopped", "upgrade:transferred", "upgrade:started"];

/// Places a pg_upgrade reaches only with `transfer: link`: after the old server is
/// recorded consumed, before the new one first starts.
pub const LINK: &[&str] = &["upgrade:consumed"];

/// Places a fence reaches only with a pooler in front: paused, not yet fenced.
pub const POOLER: &[&str] = &["fence:paused"];

/// Every place inside the actions of an upgrade by `strategy`.
pub fn inside(strategy: Strategy) -> Vec<&'static str> {
    let copy = match strategy {
        Strategy::DumpRestore => DUMP_RESTORE,
        Strategy::Logical => LOGICAL,
        Strategy::PgUpgrade => PG_UPGRADE,
    };
    COMMON.iter().chain(copy).copied().collect()
}

/// The places around each of a plan's `actions`: `before:N` and `after:N`.
pub fn around(actions: usize) -> Vec<String> {
    (1..=actions).flat_map(|n| [format!("before:{n}"), format!("after:{n}")]).collect()
}

/// Between each action's work and the ledger's record of it (`crate::ledger`): `acted:N`.
pub fn acted(actions: usize) -> Vec<String> {
    (1..=actions).map(|n| format!("acted:{n}")).collect()
}

/// A failpoint set to `error` was reached: the action fails as if its work had.
#[derive(Debug, thiserror::Error)]
#[error("failpoint {0} tripped")]
pub struct Tripped(pub String);

/// Passes, fails or crashes, as `PGCONVERGE_FAILPOINTS` says for `name`.
pub fn hit(name: &str) -> Result<(), Tripped> {
    let Ok(spec) = std::env::var("PGCONVERGE_FAILPOINTS") else { return Ok(()) };
    for entry in spec.split(',') {
        match entry.split_once('=') {
            Some((n, "crash")) if n == name => {
                eprintln!("failpoint {name}: crashing");
                std::process::exit(137);
            }
            Some((n, "error")) if n == name => return Err(Tripped(name.to_owned())),
            Some((n, how)) if n == name && how.starts_with("sleep") => {
                // `sleep<ms>`: a step that takes that long (a slow copy, a slow disk).
                let ms = how["sleep".len()..].parse().unwrap_or(1000);
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            _ => {}
        }
    }
    Ok(())
}
