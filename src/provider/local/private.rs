//! Directories and files under `root` made with explicit modes, whatever the umask, and
//! never reached through a symlink: pgconverge runs as root, so a link planted where it
//! writes would hand its writes (and chmods, and chowns) to whoever planted it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::error::{Error, Result};

/// Bits that let others than the owner change a directory or a file.
const WRITABLE_BY_OTHERS: u32 = 0o022;

fn effective_uid() -> u32 {
    super::server::effective_uid().unwrap_or(0)
}

/// Makes `path` a directory of this process's user with `mode` if it is missing; if it
/// exists, it must be one: not a symlink, owned by this user, writable by no one else.
pub fn dir(path: &Path, mode: u32) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => check(path, &m, true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match new_dir(path, mode) {
            // Made meanwhile by another apply: as good, if it is a proper one.
            Err(_) if path.is_dir() => dir(path, mode),
            other => other,
        },
        Err(e) => Err(Error::io("look at", path)(e)),
    }
}

/// Makes a new directory `path` with exactly `mode`; one that exists already is an error.
pub fn new_dir(path: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(Error::io("create", path))
}

/// Checks that what is at `path` is a directory (`want_dir`) or a plain file, owned by
/// this process's user and writable by no one else.
pub fn check(path: &Path, m: &std::fs::Metadata, want_dir: bool) -> Result<()> {
    let kind = if want_dir { "directory" } else { "file" };
    if m.file_type().is_symlink() || (want_dir && !m.is_dir()) || (!want_dir && !m.is_file()) {
        return Err(Error::Untrusted(format!(
            "{} is not a {kind} (a symlink or something else): pgconverge follows no link under its root; remove it",
            path.display()
        )));
    }
    if m.uid() != effective_uid() || m.mode() & WRITABLE_BY_OTHERS != 0 {
        return Err(Error::Untrusted(format!(
            "{} belongs to uid {} with mode {:o}: pgconverge uses only {kind}s of its own user (uid {}) that no one else can write; fix its owner and mode, or remove it",
            path.display(),
            m.uid(),
            m.mode() & 0o7777,
            effective_uid()
        )));
    }
    Ok(())
}

/// Checks what is at `path`, if anything.
pub fn check_if_present(path: &Path, want_dir: bool) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => check(path, &m, want_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("look at", path)(e)),
    }
}
