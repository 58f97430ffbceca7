//! Logical replication from one local server into another, for the logical strategy:
//! a publication of every table on the source, a subscription on the copy, and the checks
//! that say when the copy holds every committed change. Each function is one step, safe
//! to run again after a crash (leftovers of an earlier attempt are dropped first).

use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::error::{Error, Result};
use super::quote::{ident, literal};
use super::server::{Server, SUPERUSER};
use super::APP_DB;
use crate::model::ServiceId;

/// How often the catalogs are asked while waiting for a catch-up (inside the outage).
const POLL: Duration = Duration::from_millis(20);

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
        // One session (each statement in its own transaction): this runs inside the
        // outage, where every program started costs milliseconds.
        let sub = ident(name);
        target.sql(
            APP_DB,
            &format!(
                "SELECT count(*) > 0 AS subscribed FROM pg_subscription WHERE subname = {} \\gset\n\
                 \\if :subscribed\n\
                 ALTER SUBSCRIPTION {sub} DISABLE;\nALTER SUBSCRIPTION {sub} SET (slot_name = NONE);\nDROP SUBSCRIPTION {sub};\n\
                 \\endif\n\
                 ALTER SYSTEM RESET wal_writer_delay;\nSELECT pg_reload_conf() \\g /dev/null\n",
                literal(name)
            ),
        )?;
    }
    if let Some(source) = source {
        drop_slot(source, name)?;
        source.sql(
            APP_DB,
            &format!(
                "DROP PUBLICATION IF EXISTS {};\nALTER SYSTEM RESET max_slot_wal_keep_size;\nSELECT pg_reload_conf() \\g /dev/null\n",
                ident(name)
            ),
        )?;
    }
    Ok(())
}

/// Drops a replication slot, ending the walsender that holds it first. A slot left behind
/// keeps every later WAL segment on disk: it must never outlive its copy.
pub fn drop_slot(source: &Server, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let slot = literal(name);
    // From 14 on, the termination can be waited for, and the slot dropped in the same go.
    let terminate = if source.bin.major >= 14 {
        "pg_terminate_backend(active_pid, 5000)"
    } else {
        "pg_terminate_backend(active_pid)"
    };
    loop {
        let sql = format!(
            "SELECT {terminate} FROM pg_replication_slots WHERE slot_name = {slot} AND active_pid IS NOT NULL \\g /dev/null\n\
             SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE slot_name = {slot} AND NOT active \\g /dev/null\n\
             SELECT count(*) FROM pg_replication_slots WHERE slot_name = {slot};"
        );
        if count(source, "postgres", &sql)? == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Server(format!("the replication slot {name} stays in use")));
        }
        std::thread::sleep(POLL);
    }
}

/// Publishes every table of the source, its slot bounded to `wal_bound_mb` of WAL.
pub fn publish(source: &Server, name: &str, wal_bound_mb: u64) -> Result<()> {
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
    Ok(())
}

/// The replication connection that created the copy's slot. Until it is dropped it holds
/// the snapshot the slot starts from, which others can take up with
/// `SET TRANSACTION SNAPSHOT`: the source exactly as it was at `lsn`.
pub struct Slot {
    psql: Child,
    /// Where the slot's stream starts: every transaction that committed before it is in
    /// the snapshot, every later one in the stream.
    pub lsn: String,
    /// The exported snapshot's name.
    pub snapshot: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = self.psql.kill();
        let _ = self.psql.wait();
    }
}

/// How long the slot may wait for the transactions open when it was asked for.
const SLOT_LIMIT: Duration = Duration::from_secs(120);

/// Creates the logical slot `name` in the application database of `source`, keeping its
/// exported snapshot open (`Slot`). The slot waits for every transaction open at that
/// moment to end; one held open past `SLOT_LIMIT` is named in the error.
pub fn create_slot(source: &Server, name: &str) -> Result<Slot> {
    let conn = format!("dbname={APP_DB} replication=database");
    let mut args = source.conn_args(APP_DB);
    *args.last_mut().expect("conn_args ends with the database") = conn;
    let mut c = Command::new(source.bin.program("psql"));
    c.current_dir("/")
        .env("PGCONNECT_TIMEOUT", "10")
        .args(args)
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(Error::spawn("psql"))?;
    let (stdout, mut stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let mut slot = Slot { psql: child, lsn: String::new(), snapshot: String::new() };
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The old spelling of the options, which every release since 10 takes.
    let ask = format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT;\n", ident(name));
    let stdin = slot.psql.stdin.as_mut().expect("piped");
    stdin.write_all(ask.as_bytes()).and_then(|()| stdin.flush()).map_err(Error::spawn("psql"))?;
    let asked = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let fields: Vec<&str> = line.split('|').collect();
                if let [_, lsn, snapshot, _] = fields[..] {
                    slot.lsn = lsn.to_owned();
                    slot.snapshot = snapshot.to_owned();
                    return Ok(slot);
                }
                return Err(Error::Server(format!("unexpected answer `{line}` to CREATE_REPLICATION_SLOT")));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = slot.psql.wait();
                let text = errors.join().unwrap_or_default();
                return Err(Error::Server(format!(
                    "the replication slot {name} could not be made: {}",
                    crate::process::last_lines(&text, 4)
                )));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        crate::interrupt::check()?;
        if asked.elapsed() > SLOT_LIMIT {
            let holders = source
                .sql(
                    "postgres",
                    "SELECT format('pid %s (%s, %s since %s)', pid, coalesce(nullif(application_name, ''), 'no application_name'), \
                     state, xact_start) FROM pg_stat_activity WHERE backend_type = 'client backend' AND xact_start IS NOT NULL \
                     AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL ORDER BY xact_start",
                )
                .unwrap_or_default();
            return Err(Error::Server(format!(
                "the replication slot {name} waited {} s for transactions open when it was asked for: {}; end them and apply again",
                SLOT_LIMIT.as_secs(),
                if holders.is_empty() { "none is named".to_owned() } else { holders.lines().collect::<Vec<_>>().join(", ") }
            )));
        }
    }
}

/// Subscribes the copy to the publication, from the slot `create_slot` made: the copy
/// holds the source as it was at the slot's start, and streams every change after it.
pub fn subscribe(source: &Server, target: &Server, name: &str) -> Result<()> {
    // Over the source's socket, as its superuser: trusted locally, no password to keep.
    let conn = format!(
        "host={} port={} user={SUPERUSER} dbname={APP_DB} application_name={name}",
        source.socket_dir.display(),
        source.port
    );
    // Applied transactions commit asynchronously, so that one apply worker keeps up with
    // many writers on the source (a flush per transaction would not). The copy reports
    // only what it has flushed, so the slot never moves past what a crash could lose; its
    // WAL writer flushes every 10 ms, so that the report the catch-up waits for does not
    // wait for the default 200 ms round. Changes are applied as each table's owner, never
    // as the subscription's superuser owner: the application's check constraints and
    // triggers run with its own rights.
    // A subscription that fails stops (pgconverge then gives the copy up) rather than
    // retrying against a live source whose slot keeps WAL meanwhile.
    target.sql("postgres", "ALTER SYSTEM SET wal_writer_delay = '10ms'; SELECT pg_reload_conf();")?;
    target.sql(
        APP_DB,
        &format!(
            "CREATE SUBSCRIPTION {0} CONNECTION {1} PUBLICATION {0} \
             WITH (create_slot = false, slot_name = {2}, copy_data = false, synchronous_commit = off, \
             run_as_owner = false, disable_on_error = true)",
            ident(name),
            literal(&conn),
            literal(name)
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

/// How long a wait for the copy may go on before a subscription without a worker (one
/// that cannot connect) is given up: a healthy one keeps its worker running.
const NO_WORKER_LIMIT: Duration = Duration::from_secs(60);

/// Whether the subscription's apply worker runs.
fn working(target: &Server, name: &str) -> Result<bool> {
    let sql =
        format!("SELECT count(*) FROM pg_stat_subscription WHERE subname = {} AND pid IS NOT NULL", literal(name));
    Ok(count(target, APP_DB, &sql)? > 0)
}

/// The copy's subscription exists. (It copies no data itself, `copy_data = false`: its
/// tables are ready from the start.)
pub fn subscribed(target: &Server, name: &str) -> Result<bool> {
    let sql = format!("SELECT count(*) FROM pg_subscription WHERE subname = {}", literal(name));
    Ok(count(target, APP_DB, &sql)? > 0)
}

/// The source's WAL flushed so far, after a transaction of our own whose synchronous
/// commit flushes every commit before it (asynchronous ones included): with writes
/// fenced, every change the copy needs is at or before it. The transaction must write
/// WAL (a logical message, which the publication does not send): PostgreSQL flushes at
/// the commit of one that wrote none only on the WAL writer's next round, up to 200 ms
/// on, and the flush position before that misses the application's asynchronous
/// commits of those last moments.
pub fn flushed_lsn(source: &Server) -> Result<String> {
    let sql = "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_logical_emit_message(true, 'pgconverge', 'catch-up'); COMMIT; SELECT pg_current_wal_flush_lsn();";
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
        if started.elapsed() > NO_WORKER_LIMIT && !working(target, name)? {
            return Err(failing(target, name, &format!("to run: no worker for {} s", NO_WORKER_LIMIT.as_secs())));
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
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| columns(source));
        (super::error::joined(a, "schema"), columns(target))
    });
    let (a, b) = (a?, b?);
    let mut out: Vec<String> = a.iter().filter(|c| !b.contains(c)).map(|c| format!("source has {c}")).collect();
    out.extend(b.iter().filter(|c| !a.contains(c)).map(|c| format!("copy has {c}")));
    Ok(out)
}

/// The statements that set every sequence of a copy to the source's value now (logical
/// replication does not carry sequences before PostgreSQL 18), one per line.
pub fn sequence_statements(source: &Server) -> Result<String> {
    source.sql(
        APP_DB,
        "SELECT format('SELECT setval(%L, %s, %L) \\g /dev/null', format('%I.%I', schemaname, sequencename), \
         coalesce(last_value, start_value), last_value IS NOT NULL) FROM pg_sequences ORDER BY 1",
    )
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
