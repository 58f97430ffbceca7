//! The root directory: its marker, the checks that it is pgconverge's own, and the
//! subdirectories made with their modes.

use super::*;

/// The file that marks a directory as a pgconverge root.
pub(super) const ROOT_MARKER: &str = ".pgconverge-root";

pub(super) const ROOT_MARKER_TEXT: &str =
    "This directory is the root of a pgconverge local provider: its servers, records and backups.\n";

impl LocalProvider {
    /// Makes sure `root` is pgconverge's own before apply writes, deletes or starts
    /// anything under it: made here (with `ROOT_MARKER` inside), or marked as such, owned
    /// by this user and writable by no one else. `/`, and a directory holding files of
    /// someone else's without the marker, are refused: tidy-up removes what a crash left
    /// under root, which must never be another program's files.
    pub fn claim_root(&self) -> Result<()> {
        self.check_root()?;
        if !self.root.exists() {
            let parent = self.root.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(parent).map_err(|e| io_err("create", parent, e))?;
            private::dir(&self.root, 0o711)?;
        }
        let marker = self.root.join(ROOT_MARKER);
        if std::fs::symlink_metadata(&marker).is_err() {
            write_atomically(&marker, ROOT_MARKER_TEXT.as_bytes(), 0o644).map_err(|e| io_err("write", &marker, e))?;
        }
        Ok(())
    }

    /// `root/<name>` (and `root/<name>/<sub>` when given), made with their modes if
    /// missing, checked if present: the servers' user passes through `servers` and `run`
    /// to its own directories; the rest is root's alone.
    pub(super) fn subdir(&self, name: &str, sub: Option<&str>) -> Result<PathBuf> {
        let mode = if matches!(name, "servers" | "run" | "poolers") { 0o711 } else { 0o700 };
        let mut dir = self.root.join(name);
        private::dir(&dir, mode)?;
        if let Some(sub) = sub {
            dir = dir.join(sub);
            private::dir(&dir, 0o700)?;
        }
        Ok(dir)
    }

    /// The checks of `claim_root` that write nothing: plan and show make them too.
    pub fn check_root(&self) -> Result<()> {
        let refuse = |why: String| {
            ProviderError::Refused(format!(
                "provider.local.root {}: {why}; point it at a new or empty directory (the default is .pgconverge beside the config file)",
                self.root.display()
            ))
        };
        if self.root.parent().is_none() {
            return Err(refuse("pgconverge does not use / as its root".into()));
        }
        let meta = match std::fs::symlink_metadata(&self.root) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("look at", &self.root, e)),
        };
        private::check(&self.root, &meta, true).map_err(|e| refuse(e.to_string()))?;
        if std::fs::symlink_metadata(self.root.join(ROOT_MARKER)).is_ok() {
            return Ok(());
        }
        // A root made before the marker existed holds only what pgconverge writes.
        let entries: Vec<String> = std::fs::read_dir(&self.root)
            .map_err(|e| io_err("read", &self.root, e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let ours = |name: &String| {
            ["state", "servers", "backups", "secrets", "run", "lock"].contains(&name.as_str())
                || name.ends_with(".env")
                || (name.starts_with('.') && name.contains(".tmp-"))
        };
        let foreign: Vec<&String> = entries.iter().filter(|n| !ours(n)).collect();
        if !foreign.is_empty() {
            let shown: Vec<String> = foreign.iter().take(3).map(|n| crate::model::printable(n)).collect();
            return Err(refuse(format!(
                "it is not empty and not pgconverge's (no {ROOT_MARKER} file{}{})",
                if shown.is_empty() { "" } else { "; it holds " },
                shown.join(", ")
            )));
        }
        Ok(())
    }
}
