//! Finding the PostgreSQL programs of a major version.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The programs of one major version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binaries {
    pub major: u32,
    pub dir: PathBuf,
}

impl Binaries {
    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Where a major's binaries are looked for, in order: the configured `bin_dirs`, the
/// usual install locations, pgconverge's own cache (filled by `scripts/fetch-postgres`),
/// then PATH.
pub fn candidates(major: u32, bin_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = bin_dirs.to_vec();
    dirs.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    dirs.push(PathBuf::from(format!("/usr/pgsql-{major}/bin")));
    for brew in ["/opt/homebrew/opt", "/usr/local/opt", "/home/linuxbrew/.linuxbrew/opt"] {
        dirs.push(PathBuf::from(format!("{brew}/postgresql@{major}/bin")));
    }
    for cache in cache_dirs() {
        let mut versions: Vec<PathBuf> = std::fs::read_dir(cache.join("postgresql"))
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        versions.retain(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{major}."))));
        versions.sort();
        dirs.extend(versions.into_iter().rev().map(|v| v.join("bin")));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs
}

fn cache_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(c) = std::env::var_os("PGCONVERGE_CACHE") {
        out.push(PathBuf::from(c));
    }
    out.push(PathBuf::from("/var/cache/pgconverge"));
    if let Some(home) = std::env::var_os("HOME") {
        out.push(Path::new(&home).join(".cache/pgconverge"));
    }
    out
}

/// The major a `postgres --version` output names: "postgres (PostgreSQL) 17.11" → 17.
pub fn parse_major(version_output: &str) -> Option<u32> {
    let v = version_output.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    v.split(['.', 'b', 'r']).next()?.parse().ok()
}

/// Finds the binaries of `major`, confirming with `postgres --version` the first time
/// this process asks (the provider asks for every server it touches, after every action).
pub fn find(major: u32, bin_dirs: &[PathBuf]) -> Result<Binaries, Missing> {
    type Found = std::collections::HashMap<(u32, Vec<PathBuf>), Binaries>;
    static FOUND: std::sync::Mutex<Option<Found>> = std::sync::Mutex::new(None);
    let key = (major, bin_dirs.to_vec());
    if let Some(b) = FOUND.lock().ok().and_then(|f| f.as_ref()?.get(&key).cloned()) {
        return Ok(b);
    }
    let found = search(major, bin_dirs)?;
    if let Ok(mut f) = FOUND.lock() {
        f.get_or_insert_with(Default::default).insert(key, found.clone());
    }
    Ok(found)
}

/// No binaries of `major` where pgconverge looked (the first few places named).
#[derive(Debug, thiserror::Error)]
#[error(
    "no PostgreSQL {major} binaries found (looked in {}, and PATH); install them (e.g. apt-get install \
     postgresql-{major}), add their directory to provider.local.bin_dirs, or run scripts/fetch-postgres {major}",
    looked.join(", ")
)]
pub struct Missing {
    pub major: u32,
    pub looked: Vec<String>,
}

fn search(major: u32, bin_dirs: &[PathBuf]) -> Result<Binaries, Missing> {
    let dirs = candidates(major, bin_dirs);
    for dir in &dirs {
        let postgres = dir.join("postgres");
        if !postgres.is_file() {
            continue;
        }
        let Ok(out) = Command::new(&postgres).arg("--version").output() else { continue };
        if parse_major(&String::from_utf8_lossy(&out.stdout)) == Some(major) {
            return Ok(Binaries { major, dir: dir.clone() });
        }
    }
    let looked: Vec<String> = dirs.iter().take(8).map(|d| d.display().to_string()).collect();
    Err(Missing { major, looked })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors_parse_from_version_output() {
        assert_eq!(parse_major("postgres (PostgreSQL) 17.11\n"), Some(17));
        assert_eq!(parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"), Some(15));
        assert_eq!(parse_major("postgres (PostgreSQL) 18beta1"), Some(18));
        assert_eq!(parse_major("nothing here"), None);
    }

    #[test]
    fn a_missing_major_says_where_it_looked() {
        let err = find(3, &[PathBuf::from("/nonexistent")]).expect_err("no PostgreSQL 3").to_string();
        assert!(err.contains("/nonexistent") && err.contains("fetch-postgres 3"), "{err}");
    }
}
