//! A dump streamed into a restore while the same bytes go to a file: the copy takes as
//! long as the slower of the two programs instead of both one after the other, and the
//! backup is kept. Memory stays at one buffer whatever the size of the dump.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use super::error::{Error, Result};
use crate::process::last_lines;

const CHUNK: usize = 256 * 1024;
const STDERR_LIMIT: usize = 64 * 1024;

/// How a streamed copy ended.
#[derive(Debug)]
pub struct Streamed {
    /// Why the producer failed, if it did (then `file` is incomplete).
    pub producer_error: Option<String>,
    /// Why the consumer failed, if it did.
    pub consumer_error: Option<String>,
}

/// Runs `producer | tee file | consumer`. The caller syncs and publishes `file`.
pub fn tee(producer: Command, consumer: Command, file: &Path) -> Result<Streamed> {
    run(producer, consumer, Some(file))
}

/// Runs `producer | consumer`.
pub fn pipe(producer: Command, consumer: Command) -> Result<Streamed> {
    run(producer, consumer, None)
}

fn run(mut producer: Command, mut consumer: Command, file: Option<&Path>) -> Result<Streamed> {
    let program = |c: &Command| c.get_program().to_string_lossy().into_owned();
    let (producer_name, consumer_name) = (program(&producer), program(&consumer));
    // Readable by its owner alone from the first byte, and never a file found there.
    let mut out = match file {
        Some(file) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(file)
                .map_err(Error::io("create", file))?,
        ),
        None => None,
    };
    let mut sink = consumer
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::spawn(&consumer_name))?;
    let sink_stderr = drain(&mut sink);
    let mut source = match producer.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = sink.kill();
            let _ = sink.wait();
            return Err(Error::spawn(&producer_name)(e));
        }
    };
    let source_stderr = drain(&mut source);

    let mut input = source.stdout.take().expect("stdout is piped");
    let mut feed = sink.stdin.take();
    let mut buf = vec![0u8; CHUNK];
    let mut write_error = None;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                write_error = Some(format!("reading from {producer_name}: {e}"));
                break;
            }
        };
        if let (Some(out), Some(file)) = (out.as_mut(), file) {
            if let Err(e) = out.write_all(&buf[..n]) {
                write_error = Some(format!("writing {}: {e}", file.display()));
                break;
            }
        }
        // A consumer that stopped reading has failed; its status says why. The file
        // still gets the whole dump; without one, the producer need not go on.
        if feed.as_mut().is_some_and(|f| f.write_all(&buf[..n]).is_err()) {
            feed = None;
            if out.is_none() {
                let _ = source.kill();
                break;
            }
        }
    }
    drop(feed);
    if write_error.is_some() {
        let _ = source.kill();
    }
    drop(input);
    let source_status = source.wait().map_err(Error::spawn(&producer_name))?;
    let sink_status = sink.wait().map_err(Error::spawn(&consumer_name))?;
    let failure = |name: &str, status: ExitStatus, stderr: Option<JoinHandle<String>>| {
        let text = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        (!status.success()).then(|| format!("{name} failed ({status}): {}", last_lines(&text, 5)))
    };
    let mut producer_error = failure(&producer_name, source_status, source_stderr);
    if producer_error.is_none() {
        producer_error = write_error;
    }
    let consumer_error = failure(&consumer_name, sink_status, sink_stderr);
    Ok(Streamed { producer_error, consumer_error })
}

/// Reads a child's stderr on a thread, so that a chatty child never blocks on it.
fn drain(child: &mut Child) -> Option<JoinHandle<String>> {
    let mut stderr = child.stderr.take()?;
    Some(std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            if kept.len() < STDERR_LIMIT {
                kept.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&kept).into_owned()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    /// A file in a directory of its own, removed with it at the end of the test.
    struct Scratch(tempfile::TempDir);

    impl Scratch {
        fn new(name: &str) -> Self {
            Scratch(tempfile::Builder::new().prefix(&format!("pgconverge-stream-{name}-")).tempdir().expect("dir"))
        }
        fn file(&self) -> std::path::PathBuf {
            self.0.path().join("out")
        }
    }

    #[test]
    fn the_file_and_the_consumer_get_every_byte() {
        let dir = Scratch::new("bytes");
        let file = dir.file();
        let check = file.with_extension("seen");
        let consumer = sh(&format!("cat > {}", check.display()));
        let s = tee(sh("head -c 3000000 /dev/urandom"), consumer, &file).expect("tee runs");
        assert_eq!(std::fs::metadata(&file).expect("file").len(), 3_000_000);
        assert!(s.producer_error.is_none() && s.consumer_error.is_none(), "{s:?}");
        assert_eq!(std::fs::read(&file).expect("file"), std::fs::read(&check).expect("what the consumer saw"));
    }

    #[test]
    fn a_consumer_that_dies_is_reported_and_the_file_still_complete() {
        let dir = Scratch::new("consumer");
        let file = dir.file();
        let s = tee(sh("head -c 2000000 /dev/zero"), sh("head -c 10 >/dev/null; echo broken >&2; exit 3"), &file)
            .expect("tee runs");
        assert_eq!(std::fs::metadata(&file).expect("file").len(), 2_000_000);
        assert!(s.producer_error.is_none());
        let e = s.consumer_error.expect("the consumer failed");
        assert!(e.contains("broken"), "{e}");
    }

    #[test]
    fn a_producer_that_fails_is_reported() {
        let dir = Scratch::new("producer");
        let file = dir.file();
        let s =
            tee(sh("echo partial; echo 'no such table' >&2; exit 1"), sh("cat >/dev/null"), &file).expect("tee runs");
        let e = s.producer_error.expect("the producer failed");
        assert!(e.contains("no such table"), "{e}");
    }

    #[test]
    fn a_pipe_without_a_file_stops_its_producer_when_the_consumer_dies() {
        // `yes` never ends on its own: only being stopped ends this pipe.
        let s = pipe(sh("yes"), sh("head -c 10 >/dev/null; echo gone >&2; exit 3")).expect("pipe runs");
        let e = s.consumer_error.expect("the consumer failed");
        assert!(e.contains("gone"), "{e}");
        let checked = Scratch::new("pipe");
        let seen = checked.file();
        let s = pipe(sh("head -c 100000 /dev/zero"), sh(&format!("cat > {}", seen.display()))).expect("pipe runs");
        assert!(s.producer_error.is_none() && s.consumer_error.is_none(), "{s:?}");
        assert_eq!(std::fs::metadata(&seen).expect("what the consumer saw").len(), 100_000);
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let dir = Scratch::new("missing");
        let file = dir.file();
        let e = tee(Command::new("/nonexistent/pg_dump"), sh("cat >/dev/null"), &file).expect_err("no such program");
        assert!(e.to_string().contains("/nonexistent/pg_dump"), "{e}");
    }
}
