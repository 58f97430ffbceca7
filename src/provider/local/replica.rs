//! The logical strategy's copy: subscribe, wait for the initial copy, and the catch-up
//! with the source fenced.

use super::*;

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
            let _ = self.update(env, id, |m| m.streaming_from = None);
            ProviderError::Failed(format!(
                "{why}; the upgrade stopped with nothing lost, and the next apply copies afresh"
            ))
        };
        if !logical::subscribed(target, &name)? {
            return Err(give_up(format!("the replication into {id} ended before its catch-up was recorded")));
        }
        let unsynced = logical::unsynchronized_tables(target, &name)?;
        if !unsynced.is_empty() {
            return Err(give_up(format!(
                "the initial copy of {} table{} into {id} never finished ({})",
                unsynced.len(),
                if unsynced.len() == 1 { "" } else { "s" },
                unsynced.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let schema_changed = |diff: Vec<String>| format!("the schema changed during replication ({})", diff.join("; "));
        let lsn = logical::flushed_lsn(source)?;
        let waited = match logical::wait_caught_up(source, target, &name, &lsn, logical::CATCH_UP_LIMIT) {
            Ok(waited) => waited,
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
        let sequences = logical::sync_sequences(source, target)?;
        // The database's own properties, last: a read-only default or a short statement
        // timeout among them must not stop the copy's workers.
        let database = self.subdir("backups", Some(id.as_str()))?.join("replica.database.sql");
        self.dump_database(source, &self.newest_binaries(env)?, &database)?;
        restore_database(target, &database)?;
        let _ = std::fs::remove_file(&database);
        tracing::info!(service = %id, lsn = %lsn, ms = waited.as_millis() as u64, sequences, "copy caught up");
        self.update(env, id, |m| m.streaming_from = None)?;
        crate::failpoint::hit("catch_up:recorded")?;
        logical::drop_replication(Some(source), Some(target), &name).map_err(ProviderError::from)
    }

    pub(super) fn replicate_now(&mut self, env: &EnvName, id: &ServiceId, from: &ServiceId) -> Result<u64> {
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
        // Servers started before pgconverge set wal_level = logical need a restart: a
        // second's break in the application's connections, before any write is blocked.
        if !logical::wal_level_is_logical(&source)? {
            tracing::warn!(service = %from, "restarting the server with wal_level = logical");
            source.stop()?;
            source.start()?;
        }
        // Until the initial copy of every table is done the copy is not streaming, and a
        // crash meanwhile leaves a subscription that tidy_replication drops.
        self.update(env, id, |m| m.streaming_from = None)?;
        logical::drop_replication(Some(&source), Some(&target), &name)?;
        // The schema first (replication carries rows only), then every row.
        let bin = self.newest_binaries(env)?;
        let work = self.subdir("backups", Some(id.as_str()))?;
        let (roles, schema) = (work.join("replica.roles.sql"), work.join("replica.schema.dump"));
        self.dump_roles(&source, &bin, &roles)?;
        let mut c = Command::new(bin.program("pg_dump"));
        c.env("PGOPTIONS", server::SESSION_OPTIONS)
            .args(source.conn_args(APP_DB))
            .args(["-Fc", "--schema-only", "--no-publications", "--no-subscriptions", "-f"])
            .arg(&schema);
        private_file(&schema)?;
        self.run_client(c, "pg_dump --schema-only")?;
        self.prepare_restore(env, id, &target, &roles)?;
        let mut c = restore_command(&target);
        c.arg(&schema);
        self.run_client(c, "pg_restore --schema-only")?;
        drop_restorer(&target)?;
        let full = logical::replica_identity_full(&source)?;
        if !full.is_empty() {
            tracing::info!(tables = %full.join(", "), "tables without a primary key replicate with REPLICA IDENTITY FULL");
        }
        // Half of what is free now: room for what the application writes during the
        // initial copy, and for the copy itself.
        let bound_mb = (free_bytes(&self.root)? / 2 / (1024 * 1024)).max(64);
        logical::subscribe(&source, &target, &name, bound_mb)?;
        crate::failpoint::hit("replicate:subscribed")?;
        let started = std::time::Instant::now();
        logical::wait_initial_copy(&target, &name)?;
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), "initial copy done");
        // Only now is the copy streaming: every table holds its initial copy, and what
        // follows is the stream of changes the catch-up waits for.
        self.update(env, id, |m| m.streaming_from = Some(from.clone()))?;
        crate::failpoint::hit("replicate:streaming")?;
        // Statistics for the application's first queries, and the hint bits of every copied
        // row set now: the first read after a copy sets them, and with data checksums logs
        // each page again, which verify's counts would otherwise pay inside the outage.
        target.sql(APP_DB, "VACUUM (ANALYZE)")?;
        // Stream what the source wrote meanwhile, so that the catch-up inside the outage
        // has only the last moments' changes to wait for.
        let lsn = logical::flushed_lsn(&source)?;
        let lag = logical::wait_caught_up(&source, &target, &name, &lsn, logical::STREAM_LIMIT)?;
        tracing::debug!(seconds = lag.as_secs_f64(), "streaming caught up before the fence");
        let _ = std::fs::remove_file(&schema);
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
        // The source is quiet from the fence on: its fingerprint for the verify that
        // follows is taken while the copy catches up, and the copy's as soon as it has
        // stopped changing, so that verify itself only compares.
        let fingerprint_source = verify != Verify::None && !self.fingerprints.contains_key(&from);
        let (copy_fp, source_fp) = std::thread::scope(|s| {
            let fp = fingerprint_source.then(|| s.spawn(|| fingerprint::timed(&source, APP_DB, verify, "source")));
            let copy_fp = self.finish_catch_up(env, id, &source, &target).and_then(|()| {
                (verify != Verify::None)
                    .then(|| fingerprint::timed(&target, APP_DB, verify, "copy").map_err(ProviderError::from))
                    .transpose()
            });
            (copy_fp, fp.and_then(|h| h.join().ok()).and_then(|r| r.ok()))
        });
        if let Some(fp) = copy_fp? {
            self.fingerprints.insert(id.clone(), (verify, fp));
        }
        if let Some(fp) = source_fp {
            self.fingerprints.insert(from, (verify, fp));
        }
        Ok(())
    }
}
