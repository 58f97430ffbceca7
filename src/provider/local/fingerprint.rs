//! What verify compares between a fenced source and its copy: the lists of schema
//! objects, exact row counts, sequence values, large objects, and with `checksums` an
//! order-independent hash of every table's rows.

use std::collections::BTreeMap;

use super::server::Server;
use crate::config::Verify;

const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";

/// `kind:name` → value, for every object compared.
pub type Fingerprint = BTreeMap<String, String>;

fn lines(server: &Server, db: &str, sql: &str) -> Result<Vec<String>, String> {
    Ok(server.sql(db, sql)?.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect())
}

/// Takes the fingerprint of database `db`.
pub fn take(server: &Server, db: &str, how: Verify) -> Result<Fingerprint, String> {
    let mut fp = Fingerprint::new();
    let not_extension = "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')";
    for (kind, relkinds) in [("table", "'r','p'"), ("view", "'v','m'"), ("index", "'i','I'"), ("sequence", "'S'")] {
        let sql = format!(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ({relkinds}) AND {USER_SCHEMAS} AND {not_extension} ORDER BY 1"
        );
        for name in lines(server, db, &sql)? {
            fp.insert(format!("{kind}:{name}"), "present".into());
        }
    }
    let functions = format!(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE {USER_SCHEMAS} AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e') ORDER BY 1"
    );
    for name in lines(server, db, &functions)? {
        fp.insert(format!("function:{name}"), "present".into());
    }
    for name in lines(server, db, "SELECT extname FROM pg_extension ORDER BY 1")? {
        fp.insert(format!("extension:{name}"), "present".into());
    }
    let seqs = "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename) || '|' || coalesce(last_value::text, 'unused') FROM pg_sequences ORDER BY 1";
    for line in lines(server, db, seqs)? {
        if let Some((name, value)) = line.rsplit_once('|') {
            fp.insert(format!("sequence value:{name}"), value.to_owned());
        }
    }
    let tables: Vec<String> = fp.keys().filter_map(|k| k.strip_prefix("table:")).map(str::to_owned).collect();
    // One statement per batch of tables keeps the round trips few on wide schemas.
    for batch in tables.chunks(50) {
        let parts: Vec<String> = batch
            .iter()
            .map(|t| {
                let hash = match how {
                    Verify::Checksums => format!(
                        "coalesce((SELECT md5(string_agg(h, '' ORDER BY h)) FROM (SELECT md5(x::text) AS h FROM {t} x) s), '')"
                    ),
                    _ => "''".to_owned(),
                };
                format!("SELECT {lit} || '|' || (SELECT count(*) FROM {t})::text || '|' || {hash}", lit = literal(t))
            })
            .collect();
        for line in lines(server, db, &parts.join(" UNION ALL "))? {
            let mut f = line.rsplitn(3, '|');
            let (hash, count, name) = (f.next().unwrap_or(""), f.next().unwrap_or(""), f.next().unwrap_or(""));
            fp.insert(format!("rows:{name}"), count.to_owned());
            if how == Verify::Checksums {
                fp.insert(format!("row hash:{name}"), hash.to_owned());
            }
        }
    }
    fp.insert("large objects".into(), server.sql(db, "SELECT count(*) FROM pg_largeobject_metadata")?);
    if how == Verify::Checksums {
        let lo = "SELECT coalesce(md5(string_agg(md5(data), '' ORDER BY loid, pageno)), '') FROM pg_largeobject";
        fp.insert("large object hash".into(), server.sql(db, lo)?);
    }
    Ok(fp)
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
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
