//! What goes wrong on this machine, by kind: a program that cannot start or that fails, a
//! file that cannot be read or made (its `io::Error` kept as the source), a file pgconverge
//! will not trust, a server that does not do what it must. Formatted once, at the edge.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program could not be started at all.
    #[error("{program}: cannot run: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A program ran and failed; `output` holds the last lines it wrote.
    #[error("{what} failed ({status}): {output}")]
    Program { what: String, status: std::process::ExitStatus, output: String },
    /// A file or directory could not be read, made or changed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file or directory pgconverge will not use: a symlink, someone else's, or one
    /// that others can write.
    #[error("{0}")]
    Untrusted(String),
    /// A server that does not do what it must: start, stop, keep its socket, answer as
    /// expected, finish a copy.
    #[error("{0}")]
    Server(String),
    /// The binaries of a PostgreSQL major are not on this machine.
    #[error(transparent)]
    Binaries(#[from] crate::binaries::Missing),
    /// A failpoint (tests only) failed the step.
    #[error(transparent)]
    Failpoint(#[from] crate::failpoint::Tripped),
    /// A stop was asked for while the step waited.
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
    /// This machine is not set up as the provider needs (the OS user servers run as).
    #[error("{0}")]
    Setup(String),
}

impl Error {
    /// For `map_err`: `program` could not be started.
    pub fn spawn(program: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Spawn { program: program.to_owned(), source }
    }

    /// For `map_err`: `action` (a verb: "read", "create") on `path` failed.
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { action, path, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The result of a scoped thread doing `what`; a thread that panicked is an error.
pub fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>, what: &str) -> Result<T> {
    handle.join().unwrap_or_else(|_| Err(Error::Server(format!("the {what} thread panicked"))))
}
