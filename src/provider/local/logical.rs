//! Logical replication from one local server into another, for the logical strategy:
//! a publication of every table on the source, a subscription on the copy, and the checks
//! that say when the copy holds every committed change. Each function is one step, safe
//! to run again after a crash (leftovers of an earlier attempt are dropped first).

use std::time::{Duration, Instant};

use super::error::{Error, Result};
use super::quote::{ident, literal};
use super::server::{Server, SUPERUSER};
use super::APP_DB;
use crate::model::ServiceId;

/// How often the catalogs are asked while waiting for a catch-up (inside the outage).
const POLL: Duration = Duration::from_millis(20);

/// How often while the initial copy runs: each look starts programs, and the copy needs
/// the CPU.
const COPY_POLL: Duration = Duration::from_millis(250);

/// How long the catch-up may take with the source quiet: the changes still in flight when
/// writes stopped, which a healthy subscription applies in milliseconds.
pub const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

/// How long the copy may take to stream what the source wrote during its initial copy.
pub const STREAM_LIMIT: Duration = Duration::from_secs(3600);

/// The name of the publication, the subscription and the slot that copy into `id`.
pub fn name(id: &ServiceId) -> String {
    let tail: String =
        id.as_str().chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    format!("pgconverge_{tail}").chars().take(63).collect()
}

fn count(server: &Server, db: &str, sql: &str) -> Result<i64> {
    let out = server.sql(db, sql)?;
    out.trim().parse().map_err(|_| Error::Server(format!("unexpected answer `{out}` to `{sql}`")))
}

/// Whether the server runs with `wal_level = logical` (servers pgconverge starts do;
/// older ones need a restart).
pub fn wal_level_is_logical(server: &Server) -> Result<bool> {
    Ok(server.sql("postgres", "SHOW wal_level")?.trim() == "logical")
}

/// Tables the subscription could not update or delete rows of (no primary key, default
/// replica identity) are given `REPLICA IDENTITY FULL`; returns their names.
pub fn replica_identity_full(source: &Server) -> Result<Vec<String>> {
    let list = source.sql(
        APP_DB,
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND c.relreplident = 'd' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
         AND n.nspname NOT LIKE 'pg_toast%' \
         AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) ORDER BY 1",
    )?;
    let tables: Vec<String> = list.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect();
    if !tables.is_empty() {
        let sql: String = tables.iter().map(|t| format!("ALTER TABLE {t} REPLICA IDENTITY FULL;")).collect();
        source.sql(APP_DB, &sql)?;
    }
    Ok(tables)
}

/// Drops what an earlier replication into the copy named `name` left: the subscription
/// on the copy (without reaching for the source), then the slot and the publication on
/// the source. Either server may be missing.
pub fn drop_replication(source: Option<&Server>, target: Option<&Server>, name: &str) -> Result<()> {
    if let Some(target) = target {
        if subscribed(target, name)? {
            // Three statements, each in its own transaction (psql without -1).
            let sub = ident(name);
            target.sql(
                APP_DB,
                &format!(
                    "ALTER SUBSCRIPTION {sub} DISABLE; ALTER SUBSCRIPTION {sub} SET (slot_name = NONE); DROP SUBSCRIPTION {sub};"
                ),
            )?;
        }
    }
    if let Some(source) = source {
        drop_slot(source, name)?;
        source.sql(APP_DB, &format!("DROP PUBLICATION IF EXISTS {}", ident(name)))?;
        source.sql("postgres", "ALTER SYSTEM RESET max_slot_wal_keep_size; SELECT pg_reload_conf();")?;
    }
    Ok(())
}

/// Drops a replication slot, ending the walsender that holds it first. A slot left behind
/// keeps every later WAL segment on disk: it must never outlive its copy.
pub fn drop_slot(source: &Server, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let slot = literal(name);
    loop {
        let sql = format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = {slot} AND active_pid IS NOT NULL; \
             SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE slot_name = {slot} AND NOT active;"
        );
        source.sql("postgres", &sql)?;
        let left =
            count(source, "postgres", &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = {slot}"))?;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Server(format!("the replication slot {name} stays in use")));
        }
        std::thread::sleep(POLL);
    }
}

/// Publishes every table of the source and subscribes the copy to it; the subscription
/// starts with a copy of every table.
pub fn subscribe(source: &Server, target: &Server, name: &str, wal_bound_mb: u64) -> Result<()> {
    // The slot may keep at most this much WAL on the source: past it the slot is given
    // up (and the copy with it), never the source's disk and its application's writes.
    source.sql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET max_slot_wal_keep_size = {}; SELECT pg_reload_conf();",
            literal(&format!("{wal_bound_mb}MB"))
        ),
    )?;
    source.sql(APP_DB, &format!("CREATE PUBLICATION {} FOR ALL TABLES", ident(name)))?;
    // Over the source's socket, as its superuser: trusted locally, no password to keep.
    let conn = format!(
        "host={} port={} user={SUPERUSER} dbname={APP_DB} application_name={name}",
        source.socket_dir.display(),
        source.port
    );
    // Each applied transaction is flushed before the copy reports it: otherwise the
    // report waits for the WAL writer's next round, up to 200 ms inside the outage.
    // Changes are applied as each table's owner, never as the subscription's superuser
    // owner: the application's check constraints and triggers run with its own rights.
    // A subscription that fails stops (pgconverge then gives the copy up) rather than
    // retrying against a live source whose slot keeps WAL meanwhile.
    target.sql(
        APP_DB,
        &format!(
            "CREATE SUBSCRIPTION {0} CONNECTION {1} PUBLICATION {0} \
             WITH (synchronous_commit = on, run_as_owner = false, disable_on_error = true)",
            ident(name),
            literal(&conn)
        ),
    )?;
    Ok(())
}

/// Errors the subscription's workers have met so far (PostgreSQL 15 and later count
/// them; older copies report none).
fn errors(target: &Server, name: &str) -> Result<i64> {
    if target.bin.major < 15 {
        return Ok(0);
    }
    count(
        target,
        APP_DB,
        &format!(
            "SELECT coalesce(sum(apply_error_count + sync_error_count), 0) FROM pg_stat_subscription_stats WHERE subname = {}",
            literal(name)
        ),
    )
}

fn failing(target: &Server, name: &str, what: &str) -> Error {
    let log = std::fs::read_to_string(&target.log_file).unwrap_or_default();
    let last: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    let tail = last.iter().rev().take(2).rev().copied().collect::<Vec<_>>().join(" | ");
    Error::Server(format!("the replication {name} failed {what}: {tail}"))
}

/// How long the subscription may go without a worker before the copy is given up:
/// a copy of any size keeps its workers running, one that cannot connect does not.
const NO_WORKER_LIMIT: Duration = Duration::from_secs(60);

/// The tables of the subscription whose initial copy has not finished: any state but
/// ready (`r`) or synchronized (`s`, ready once the stream passes the copy's end).
pub fn unsynchronized_tables(target: &Server, name: &str) -> Result<Vec<String>> {
    let out = target.sql(
        APP_DB,
        &format!(
            "SELECT r.srrelid::regclass::text || ' (' || r.srsubstate::text || ')' FROM pg_subscription_rel r \
             JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = {} AND r.srsubstate NOT IN ('r', 's') ORDER BY 1",
            literal(name)
        ),
    )?;
    Ok(out.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

/// Waits until the subscription has copied every table and streams.
pub fn wait_initial_copy(target: &Server, name: &str) -> Result<()> {
    let sql = format!(
        "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid \
         WHERE s.subname = {} AND r.srsubstate <> 'r'",
        literal(name)
    );
    let workers =
        format!("SELECT count(*) FROM pg_stat_subscription WHERE subname = {} AND pid IS NOT NULL", literal(name));
    let mut working = Instant::now();
    let mut first = true;
    loop {
        if count(target, APP_DB, &sql)? == 0 {
            return Ok(());
        }
        if std::mem::take(&mut first) {
            crate::failpoint::hit("replicate:copying")?;
        }
        crate::interrupt::check()?;
        if errors(target, name)? > 0 {
            return Err(failing(target, name, "during its initial copy"));
        }
        if count(target, APP_DB, &workers)? > 0 {
            working = Instant::now();
        } else if working.elapsed() > NO_WORKER_LIMIT {
            return Err(failing(target, name, &format!("to start: no worker ran for {} s", NO_WORKER_LIMIT.as_secs())));
        }
        std::thread::sleep(COPY_POLL);
    }
}

/// The source's WAL flushed so far, after a transaction of our own whose synchronous
/// commit flushes every commit before it (asynchronous ones included): with writes
/// fenced, every change the copy needs is at or before it. The transaction must write
/// WAL (a logical message, which the publication does not send): PostgreSQL flushes at
/// the commit of one that wrote none only on the WAL writer's next round, up to 200 ms
/// on, and the flush position before that misses the application's asynchronous
/// commits of those last moments.
pub fn flushed_lsn(source: &Server) -> Result<String> {
    let sql = "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_logical_emit_message(true, 'pgconverge', 'catch-up');                COMMIT; SELECT pg_current_wal_flush_lsn();";
    let out = source.sql("postgres", sql)?;
    Ok(out.lines().last().unwrap_or_default().trim().to_owned())
}

/// Waits until the copy has applied and flushed everything up to `lsn` of the source.
pub fn wait_caught_up(source: &Server, target: &Server, name: &str, lsn: &str, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let sql = format!(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = {} AND replay_lsn >= {}::pg_lsn",
        literal(name),
        literal(lsn)
    );
    loop {
        if count(source, "postgres", &sql)? > 0 {
            return Ok(started.elapsed());
        }
        if errors(target, name)? > 0 {
            return Err(failing(target, name, "while catching up"));
        }
        if started.elapsed() > limit {
            return Err(Error::Server(format!(
                "the copy did not catch up with {lsn} within {} s; is the subscription {name} running?",
                limit.as_secs()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// Whether the copy still has its subscription.
pub fn subscribed(target: &Server, name: &str) -> Result<bool> {
    Ok(count(target, APP_DB, &format!("SELECT count(*) FROM pg_subscription WHERE subname = {}", literal(name)))? > 0)
}

/// The tables and columns of the application database, one line each: logical
/// replication carries rows, not schema changes, so the two must still agree.
fn columns(server: &Server) -> Result<Vec<String>> {
    let out = server.sql(
        APP_DB,
        "SELECT n.nspname || '.' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm') \
         AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1",
    )?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// What the source has that the copy does not, and the reverse, in their schemas.
pub fn schema_differences(source: &Server, target: &Server) -> Result<Vec<String>> {
    let (a, b) = (columns(source)?, columns(target)?);
    let mut out: Vec<String> = a.iter().filter(|c| !b.contains(c)).map(|c| format!("source has {c}")).collect();
    out.extend(b.iter().filter(|c| !a.contains(c)).map(|c| format!("copy has {c}")));
    Ok(out)
}

/// Sets every sequence of the copy to the source's value (logical replication does not
/// carry sequences before PostgreSQL 18); returns how many.
pub fn sync_sequences(source: &Server, target: &Server) -> Result<usize> {
    let statements = source.sql(
        APP_DB,
        "SELECT format('SELECT setval(%L, %s, %L);', format('%I.%I', schemaname, sequencename), \
         coalesce(last_value, start_value), last_value IS NOT NULL) FROM pg_sequences ORDER BY 1",
    )?;
    let n = statements.lines().filter(|l| !l.is_empty()).count();
    if n > 0 {
        target.sql(APP_DB, &statements)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_identifiers_postgres_accepts() {
        let id = ServiceId::observed("pg17-3fA9").expect("id");
        assert_eq!(name(&id), "pgconverge_pg17_3fa9");
        let long = ServiceId::observed(&"x".repeat(100)).expect("id");
        assert_eq!(name(&long).len(), 63);
    }
}
