//! What verify compares between a fenced source and its copy: the lists of schema
//! objects, exact row counts, sequence values, large objects, and with `checksums` an
//! order-independent hash of every table's rows.

use std::collections::BTreeMap;

use super::error::{Error, Result};
use super::quote::literal;
use super::server::Server;
use crate::config::Verify;

const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";

/// `kind:name` → value, for every object compared.
pub type Fingerprint = BTreeMap<String, String>;

/// `take_part`, with the time it took logged; `what` names the server for the log.
pub fn timed(server: &Server, db: &str, how: Verify, part: Part, what: &str) -> Result<Fingerprint> {
    let t = std::time::Instant::now();
    let fp = take_part(server, db, how, part, None);
    tracing::debug!(what, ?part, seconds = t.elapsed().as_secs_f64(), "fingerprint taken");
    fp
}

/// Which parts of a fingerprint to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    All,
    /// Each table's rows (count, and hash with `checksums`): what grows with the data.
    Rows,
    /// Everything else: lists of objects, sequence values, the database's properties.
    Catalog,
}

/// Takes the fingerprint of database `db`, in one session: every value comes back as a
/// `key|value` line, and psql's `\gexec` runs one statement per table (each free to use
/// parallel workers), so a fingerprint costs one program start, not one per query.
pub fn take(server: &Server, db: &str, how: Verify) -> Result<Fingerprint> {
    take_part(server, db, how, Part::All, None)
}

/// `take`, of one part, and with `snapshot` in the snapshot another session exported
/// (the rows as they were then; sequence values are not kept by snapshots).
pub fn take_part(server: &Server, db: &str, how: Verify, part: Part, snapshot: Option<&str>) -> Result<Fingerprint> {
    let not_extension =
        |oid: &str| format!("NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = {oid} AND d.deptype = 'e')");
    let relations = |relkinds: &str| {
        format!(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS name FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ({relkinds}) AND {USER_SCHEMAS} AND {}",
            not_extension("c.oid")
        )
    };
    let mut parts: Vec<String> = [("table", "'r','p'"), ("view", "'v','m'"), ("index", "'i','I'"), ("sequence", "'S'")]
        .iter()
        .map(|(kind, relkinds)| format!("SELECT '{kind}:' || name || '|present' FROM ({}) r", relations(relkinds)))
        .collect();
    parts.push(format!(
        "SELECT 'function:' || p.oid::regprocedure::text || '|present' FROM pg_proc p \
         JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_SCHEMAS} AND {}",
        not_extension("p.oid")
    ));
    parts.push("SELECT 'extension:' || extname || '|present' FROM pg_extension".into());
    parts.push(
        "SELECT 'sequence value:' || quote_ident(schemaname) || '.' || quote_ident(sequencename) || '|' \
         || coalesce(last_value::text, 'unused') FROM pg_sequences"
            .into(),
    );
    parts.push("SELECT 'large objects|' || count(*) FROM pg_largeobject_metadata".into());
    // The database's own properties, which no table holds; hashed where a value could
    // hold the separator or a newline.
    parts.push(
        "SELECT 'database setting:' || coalesce(quote_ident(r.rolname), '(every role)') || '|' || \
         md5((SELECT string_agg(c, E'\\n' ORDER BY c) FROM unnest(s.setconfig) c)) FROM pg_db_role_setting s \
         LEFT JOIN pg_roles r ON r.oid = s.setrole WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())"
            .into(),
    );
    parts.push(
        "SELECT x FROM pg_database, LATERAL (VALUES ('database comment|' || md5(coalesce(shobj_description(oid, 'pg_database'), ''))), \
         ('database connection limit|' || datconnlimit), ('database privileges|' || md5(coalesce(datacl::text, '')))) v(x) \
         WHERE datname = current_database()"
            .into(),
    );
    if how == Verify::Checksums {
        parts.push(
            "SELECT 'large object hash|' || coalesce(md5(string_agg(md5(data), '' ORDER BY loid, pageno)), '') FROM pg_largeobject"
                .into(),
        );
    }
    let per_table = match how {
        Verify::Checksums => "'SELECT %L || ''|'' || (SELECT count(*) FROM %s)::text UNION ALL SELECT %L || ''|'' || \
             coalesce((SELECT md5(string_agg(h, '''' ORDER BY h)) FROM (SELECT md5(x::text) AS h FROM %s x) s), '''')', \
             'rows:' || name, name, 'row hash:' || name, name",
        _ => "'SELECT %L || ''|'' || (SELECT count(*) FROM %s)::text', 'rows:' || name, name",
    };
    let mut sql = String::new();
    if let Some(snapshot) = snapshot {
        sql += &format!("BEGIN ISOLATION LEVEL REPEATABLE READ;\nSET TRANSACTION SNAPSHOT {};\n", literal(snapshot));
    }
    if part != Part::Rows {
        sql += &format!("{};\n", parts.join(" UNION ALL "));
    }
    if part != Part::Catalog {
        sql += &format!("SELECT format({per_table}) FROM ({}) t ORDER BY name \\gexec\n", relations("'r','p'"));
    }
    if snapshot.is_some() {
        sql += "COMMIT;\n";
    }
    let mut fp = Fingerprint::new();
    for line in server.sql(db, &sql)?.lines().filter(|l| !l.is_empty()) {
        let (key, value) =
            line.rsplit_once('|').ok_or_else(|| Error::Server(format!("unexpected fingerprint line `{line}`")))?;
        fp.insert(key.to_owned(), value.to_owned());
    }
    Ok(fp)
}

/// What differs between a source and its copy, one line each; empty when they match.
pub fn differences(source: &Fingerprint, copy: &Fingerprint) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in source {
        match copy.get(k) {
            None => out.push(format!("{k}: missing from the copy")),
            Some(c) if c != v => out.push(format!("{k}: {v} in the source, {c} in the copy")),
            Some(_) => {}
        }
    }
    for k in copy.keys().filter(|k| !source.contains_key(*k)) {
        out.push(format!("{k}: only in the copy"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_what_is_missing_changed_and_extra() {
        let a: Fingerprint = [("rows:t", "3"), ("table:t", "present"), ("view:v", "present")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut b = a.clone();
        b.insert("rows:t".into(), "2".into());
        b.remove("view:v");
        b.insert("index:i".into(), "present".into());
        assert_eq!(
            differences(&a, &b),
            ["rows:t: 3 in the source, 2 in the copy", "view:v: missing from the copy", "index:i: only in the copy"]
        );
        assert!(differences(&a, &a).is_empty());
    }
}
