//! Running other programs: what every caller of psql, pg_dump or a user's command needs.

use std::process::{Command, Stdio};

/// The last `n` non-empty lines of a program's messages, on one line.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Runs `c` with `input` on its stdin (never on its command line, where other users of
/// the machine could read it) and collects its output.
pub fn output_fed(mut c: Command, input: &str) -> std::io::Result<std::process::Output> {
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, input.as_bytes())?;
    }
    child.wait_with_output()
}
