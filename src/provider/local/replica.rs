//! The logical strategy's copy: loaded from the replication slot's snapshot, its rows
//! compared with the source's there, subscribed from the slot; and the catch-up with the
//! source fenced.

use super::fingerprint::Part;
use super::*;

/// The source database's own properties, dumped by `replicate` for the catch-up.
const DATABASE_FILE: &str = "replica.database.sql";

/// How many times at most the copy is brought up to the source before the fence.
const PRE_FENCE_ROUNDS: u32 = 10;

/// A round of the pre-fence catch-up this short leaves the outage's catch-up about as
/// little to do.
const CLOSE_ENOUGH: std::time::Duration = std::time::Duration::from_millis(200);

/// The error of a copy that differs from its source, `when` ("at …" or empty).
pub(super) fn differ(id: &ServiceId, source: &ServiceId, when: &str, diff: &[String]) -> ProviderError {
    let shown: Vec<String> = diff.iter().take(20).cloned().collect();
    ProviderError::Failed(format!(
        "the copy {id} differs from its source {source}{}{} ({} difference{}): {}{}",
        if when.is_empty() { "" } else { " " },
        when,
        diff.len(),
        if diff.len() == 1 { "" } else { "s" },
        shown.join("; "),
        if diff.len() > 20 { "; …" } else { "" }
    ))
}

impl LocalProvider {
    /// The catch-up proper: waits until the copy has every change up to the source's
    /// WAL position now, checks the schemas still agree, sets the sequences and ends the
    /// replication.
    pub(super) fn finish_catch_up(
        &self,
        env: &EnvName,
        id: &ServiceId,
        source: &Server,
        target: &Server,
    ) -> Result<()> {
        let name = logical::name(id);
        // A copy is whole only when every change up to the fence is in it; anything less
        // is dropped (nothing is lost: the source keeps the data) and copied afresh.
        let give_up = |why: String| -> ProviderError {
            let _ = logical::drop_replication(Some(source), Some(target), &name);
            let _ = self.update(env, id, |m| {
                m.streaming_from = None;
                m.matched = None;
            });
            ProviderError::Failed(format!(
                "{why}; the upgrade stopped with nothing lost, and the next apply copies afresh"
            ))
        };
        if !logical::subscribed(target, &name)? {
            return Err(give_up(format!("the replication into {id} ended before its catch-up was recorded")));
        }
        let schema_changed = |diff: Vec<String>| format!("the schema changed during replication ({})", diff.join("; "));
        // The fenced source's sequences stand still: read while the copy catches up.
        let (caught, sequences) = std::thread::scope(|s| {
            let sequences = s.spawn(|| logical::sequence_statements(source));
            let caught = logical::flushed_lsn(source).and_then(|lsn| {
                logical::wait_caught_up(source, target, &name, &lsn, logical::CATCH_UP_LIMIT).map(|w| (lsn, w))
            });
            (caught, error::joined(sequences, "sequence"))
        });
        let (lsn, waited) = match caught {
            Ok(caught) => caught,
            Err(e) => {
                let diff = logical::schema_differences(source, target).unwrap_or_default();
                return Err(give_up(if diff.is_empty() { e.to_string() } else { schema_changed(diff) }));
            }
        };
        let diff = logical::schema_differences(source, target)?;
        if !diff.is_empty() {
            return Err(give_up(schema_changed(diff)));
        }
        crate::failpoint::hit("catch_up:caught_up")?;
        // The sequences, and the database's own properties last: a read-only default or a
        // short statement timeout among them must not stop the copy's workers. `replicate`
        // dumped them; verify's catalogs compare them, should they have changed since.
        let sequences = sequences?;
        let database = self.subdir("backups", Some(id.as_str()))?.join(DATABASE_FILE);
        if !database.exists() {
            self.dump_database(source, &self.newest_binaries(env)?, &database)?;
        }
        target.sql(APP_DB, &format!("{sequences}\n{}", database_script(&database)?))?;
        let _ = std::fs::remove_file(&database);
        let sequences = sequences.lines().filter(|l| !l.is_empty()).count();
        tracing::info!(service = %id, lsn = %lsn, ms = waited.as_millis() as u64, sequences, "copy caught up");
        self.update(env, id, |m| {
            m.streaming_from = None;
            m.matched = None;
        })?;
        crate::failpoint::hit("catch_up:recorded")?;
        logical::drop_replication(Some(source), Some(target), &name).map_err(ProviderError::from)
    }

    pub(super) fn replicate_now(
        &mut self,
        env: &EnvName,
        id: &ServiceId,
        from: &ServiceId,
        verify: Verify,
    ) -> Result<u64> {
        self.fingerprints.remove(id);
        let (_, source) = self.running_server(env, from)?;
        let (_, target) = self.running_server(env, id)?;
        let name = logical::name(id);
        let objects = source.sql(APP_DB, "SELECT count(*) FROM pg_largeobject_metadata")?;
        if target.bin.major < 16 {
            return Err(ProviderError::Refused(format!(
                "strategy logical needs PostgreSQL 16 or later on the new server ({id} runs {}): before 16 a subscription applies changes with superuser rights; use `upgrade.strategy: dump_restore`",
                target.bin.major
            )));
        }
        if objects.trim() != "0" {
            return Err(ProviderError::Refused(format!(
                "{from} holds {} large objects, which logical replication does not carry; use `upgrade.strategy: dump_restore`",
                objects.trim()
            )));
        }
        // Nor unlogged tables: the copy would hold their rows as they were when it was
        // made, and none of the writes after.
        let unlogged = source.sql(
            APP_DB,
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u' ORDER BY 1",
        )?;
        if !unlogged.trim().is_empty() {
            let tables: Vec<&str> = unlogged.lines().collect();
            return Err(ProviderError::Refused(format!(
                "{from} holds unlogged tables ({}), which logical replication does not carry; use `upgrade.strategy: dump_restore`, or make them logged (ALTER TABLE … SET LOGGED)",
                tables.join(", ")
            )));
        }
        // Servers started before pgconverge set wal_level = logical need a restart: a
        // second's break in the application's connections, before any write is blocked.
        if !logical::wal_level_is_logical(&source)? {
            tracing::warn!(service = %from, "restarting the server with wal_level = logical");
            source.stop()?;
            source.start()?;
        }
        // Until the copy is loaded and subscribed it is not streaming, and a crash
        // meanwhile leaves a slot that tidy_replication drops.
        self.update(env, id, |m| {
            m.streaming_from = None;
            m.matched = None;
        })?;
        logical::drop_replication(Some(&source), Some(&target), &name)?;
        let full = logical::replica_identity_full(&source)?;
        if !full.is_empty() {
            tracing::info!(tables = %full.join(", "), "tables without a primary key replicate with REPLICA IDENTITY FULL");
        }
        // Half of what is free now: room for what the application writes during the
        // copy, and for the copy itself.
        let bound_mb = (free_bytes(&self.root)? / 2 / (1024 * 1024)).max(64);
        logical::publish(&source, &name, bound_mb)?;
        let bin = self.newest_binaries(env)?;
        let roles = self.subdir("backups", Some(id.as_str()))?.join("replica.roles.sql");
        self.dump_roles(&source, &bin, &roles)?;
        self.prepare_restore(env, id, &target, &roles)?;
        let _ = std::fs::remove_file(&roles);
        let started = std::time::Instant::now();
        let slot = logical::create_slot(&source, &name)?;
        crate::failpoint::hit("replicate:slot")?;
        // The copy is the source exactly as the slot's snapshot shows it, and the
        // subscription streams every change after it: so its rows can be compared with
        // the source's at that one point now, before the fence, and the catch-up inside
        // the outage only has to prove that the stream got past the fence.
        let mut dump = Command::new(bin.program("pg_dump"));
        dump.env("PGOPTIONS", server::SESSION_OPTIONS).args(source.conn_args(APP_DB)).args([
            "-Fc",
            "-Z0",
            "--no-publications",
            "--no-subscriptions",
            "--snapshot",
            &slot.snapshot,
        ]);
        let (streamed, source_rows) = std::thread::scope(|s| {
            let rows = (verify != Verify::None)
                .then(|| s.spawn(|| fingerprint::take_part(&source, APP_DB, verify, Part::Rows, Some(&slot.snapshot))));
            let streamed = stream::pipe(dump, restore_command(&target));
            (streamed, rows.map(|h| error::joined(h, "fingerprint")))
        });
        let lsn = slot.lsn.clone();
        drop(slot);
        let streamed = streamed?;
        if let Some(e) = streamed.consumer_error.or(streamed.producer_error) {
            return Err(ProviderError::Failed(e));
        }
        drop_restorer(&target)?;
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), %lsn, "copy loaded at the slot's snapshot");
        let database = self.subdir("backups", Some(id.as_str()))?.join(DATABASE_FILE);
        self.dump_database(&source, &bin, &database)?;
        crate::interrupt::check()?;
        // Statistics for the application's first queries; the copy's rows counted (which
        // sets the hint bits of every copied row, which with data checksums the first
        // read would otherwise log again inside the outage) on the other core.
        let (analyzed, copy_rows) = std::thread::scope(|s| {
            let rows = (verify != Verify::None)
                .then(|| s.spawn(|| fingerprint::take_part(&target, APP_DB, verify, Part::Rows, None)));
            let analyzed = target.sql(APP_DB, "VACUUM (ANALYZE)");
            (analyzed, rows.map(|h| error::joined(h, "fingerprint")))
        });
        analyzed?;
        let matched = match (source_rows.transpose()?, copy_rows.transpose()?) {
            (Some(a), Some(b)) => {
                let diff = fingerprint::differences(&a, &b);
                if !diff.is_empty() {
                    let _ = logical::drop_replication(Some(&source), Some(&target), &name);
                    return Err(differ(id, from, &format!("at {lsn}, where its replication starts"), &diff));
                }
                tracing::info!(service = %id, against = %from, %lsn, tables = a.len(), "rows compared where the stream starts");
                Some(Matched { source: from.clone(), lsn: lsn.clone(), how: verify, rows: a })
            }
            _ => None,
        };
        self.update(env, id, |m| m.matched = matched)?;
        crate::failpoint::hit("replicate:copied")?;
        logical::subscribe(&source, &target, &name)?;
        crate::failpoint::hit("replicate:subscribed")?;
        self.update(env, id, |m| m.streaming_from = Some(from.clone()))?;
        crate::failpoint::hit("replicate:streaming")?;
        // Stream what the source wrote meanwhile, so that the catch-up inside the outage
        // has only the last moments' changes to wait for: again while a round takes long
        // (the writes it waited for came in while the one before it waited).
        for round in 1..=PRE_FENCE_ROUNDS {
            let lsn = logical::flushed_lsn(&source)?;
            let lag = logical::wait_caught_up(&source, &target, &name, &lsn, logical::STREAM_LIMIT)?;
            tracing::debug!(round, seconds = lag.as_secs_f64(), "streaming caught up before the fence");
            if lag < CLOSE_ENOUGH {
                break;
            }
            crate::interrupt::check()?;
        }
        let bytes = target.sql(APP_DB, &format!("SELECT pg_database_size('{APP_DB}')"))?;
        Ok(bytes.trim().parse().unwrap_or(0))
    }

    pub(super) fn catch_up_now(&mut self, env: &EnvName, id: &ServiceId, verify: Verify) -> Result<()> {
        self.fingerprints.remove(id);
        let meta = self.load(env, id)?;
        let Some(from) = meta.streaming_from else {
            return Err(ProviderError::Inconsistent(format!("{id} is not streaming a copy")));
        };
        let (_, source) = self.running_server(env, &from)?;
        let (_, target) = self.running_server(env, id)?;
        // Rows compared where the stream starts need no counting now: the catch-up proves
        // the stream reached the fence, and only the catalogs are taken (both at once,
        // once the copy has stopped changing), so that verify itself only compares.
        let matched = meta.matched.filter(|m| m.source == from && m.how == verify && verify != Verify::None);
        let part = if matched.is_some() { Part::Catalog } else { Part::All };
        // A fingerprint of the source kept from earlier holds its rows now, not where the
        // stream started: with rows matched there, its catalogs are taken afresh.
        if matched.is_some() {
            self.fingerprints.remove(&from);
        }
        let fingerprint_source = verify != Verify::None && !self.fingerprints.contains_key(&from);
        let (copy_fp, source_fp) = std::thread::scope(|s| {
            let source = &source;
            let source_fp = |part| {
                fingerprint_source.then(|| s.spawn(move || fingerprint::timed(source, APP_DB, verify, part, "source")))
            };
            // All of the source's, from the fence unchanging, is taken while the copy
            // catches up; its catalogs alone are quick, and taken with the copy's.
            let early = if part == Part::All { source_fp(part) } else { None };
            let caught = self.finish_catch_up(env, id, source, &target);
            let late = if part == Part::Catalog && caught.is_ok() { source_fp(part) } else { None };
            let copy_fp = caught.and_then(|()| {
                (verify != Verify::None)
                    .then(|| fingerprint::timed(&target, APP_DB, verify, part, "copy").map_err(ProviderError::from))
                    .transpose()
            });
            (copy_fp, early.or(late).and_then(|h| h.join().ok()).and_then(|r| r.ok()))
        });
        let with_rows = |mut fp: fingerprint::Fingerprint| {
            if let Some(m) = &matched {
                fp.extend(m.rows.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            fp
        };
        // Rows matched where the stream started stand only for both sides at once: with
        // one side missing, verify takes both afresh.
        match (copy_fp?, source_fp) {
            (Some(copy), Some(source)) => {
                self.fingerprints.insert(id.clone(), (verify, with_rows(copy)));
                self.fingerprints.insert(from, (verify, with_rows(source)));
            }
            (Some(copy), None) if matched.is_none() => {
                self.fingerprints.insert(id.clone(), (verify, copy));
            }
            _ => {}
        }
        Ok(())
    }
}
