//! How the provider asks for things: API requests that are sent again only once proven
//! not carried out, waits on the platform's long operations, and the configured shell
//! commands.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::api::{self, ApiError};
use super::types::{answer, Operation, ServiceInstance};
use super::{api_err, backoff, clock, failed, manual_step, pause, report_due, DivioProvider, Manual, MAX_ATTEMPTS, V3};
use crate::model::{EnvName, Prefix, ServiceId};
use crate::provider::{ProviderError, Result};

impl DivioProvider {
    /// Runs one of the configured shell commands with the service it is about in its
    /// environment; its output goes to the log, and into the error when it fails.
    pub(super) fn run_command(&self, what: &str, command: &str, env: &EnvName, vars: &[(&str, &str)]) -> Result<()> {
        let mut c = Command::new("sh");
        c.args(["-c", command]).env("PGCONVERGE_ENV", env.as_str()).env("PGCONVERGE_APPLICATION", &self.application);
        for (k, v) in vars {
            c.env(k, v);
        }
        let out = c.stdin(Stdio::null()).output().map_err(|e| failed(format!("{what}: cannot run `sh`: {e}")))?;
        let said = String::from_utf8_lossy(&[out.stdout.as_slice(), out.stderr.as_slice()].concat()).trim().to_owned();
        if !said.is_empty() {
            tracing::info!(command = what, output = %said, "command output");
        }
        if !out.status.success() {
            let last = crate::process::last_lines(&said, 5);
            return Err(failed(format!(
                "{what} failed ({}){}",
                out.status,
                if last.is_empty() { String::new() } else { format!(": {last}") }
            )));
        }
        Ok(())
    }

    /// `fence_command` (`on`) or `unfence_command` for one service.
    pub(super) fn run_fence_command(&self, on: bool, env: &EnvName, id: &ServiceId, prefix: &Prefix) -> Result<()> {
        let (what, command) =
            if on { ("fence_command", &self.fence_command) } else { ("unfence_command", &self.unfence_command) };
        let Some(command) = command else {
            return Err(ProviderError::Refused(format!(
                "the Divio API can neither block nor allow writes; set provider.divio.{what}"
            )));
        };
        self.run_command(
            what,
            command,
            env,
            &[("PGCONVERGE_SERVICE", id.as_str()), ("PGCONVERGE_PREFIX", prefix.as_str())],
        )
    }

    /// Gets the long operation at `path` every `poll` until `done` says it has ended, for
    /// at most `wait`, saying what it waits `for_what` meanwhile; returns its last state.
    pub(super) fn wait_for<T: Operation>(&self, for_what: &str, path: &str, done: impl Fn(&T) -> bool) -> Result<T> {
        poll_until(self.wait, self.poll, || {
            let state: T = answer(self.api.get(path).map_err(api_err)?, path)?;
            if done(&state) {
                return Ok(Ok(state));
            }
            Ok(Err((for_what.to_owned(), state.state())))
        })
        .unwrap_or_else(|(what, seen, waited)| Err(gave_up(&what, &seen, waited)))
    }

    /// POSTs `body` to create one thing, exactly once: when the answer is lost, `find`
    /// looks for what the request would have created; found, that is the answer; not
    /// found, the request is proven not carried out and is sent again.
    pub(super) fn create(
        &self,
        what: &str,
        path: &str,
        body: Value,
        find: impl Fn(&Self) -> Result<Option<Value>>,
    ) -> Result<Value> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.api.post(path, body.clone()) {
                Ok(created) => return Ok(created),
                Err(e) if e.lost() => {
                    crate::progress::say(&format!("the answer was lost ({e}): looking for {what} before asking again"));
                    if let Some(found) = find(self)? {
                        crate::progress::say(&format!(
                            "found {what}: the request was carried out; carrying on with it"
                        ));
                        return Ok(found);
                    }
                    if attempt >= MAX_ATTEMPTS {
                        return Err(api_err(e));
                    }
                    std::thread::sleep(backoff(attempt, api::jitter(), None));
                }
                Err(e) => return Err(api_err(e)),
            }
        }
    }

    /// The item of the listing at `path` whose `notes` are those of `body`: the backup or
    /// restore that a request with that body started (the notes name this run).
    pub(super) fn find_by_notes(&self, path: &str, body: &Value) -> Result<Option<Value>> {
        let notes = body.get("notes").and_then(Value::as_str).unwrap_or_default();
        let listed = self.api.list(path).map_err(api_err)?;
        Ok(listed.into_iter().find(|item| item.get("notes").and_then(Value::as_str) == Some(notes)))
    }

    /// Asks for a change to an instance with `send`. A lost answer, or a refusal (400), is
    /// success when the instance already shows the change (`done`): an earlier attempt
    /// made it. A lost answer to a change not shown yet is asked again.
    pub(super) fn change(
        &self,
        id: &ServiceId,
        send: impl Fn() -> std::result::Result<Value, ApiError>,
        done: impl Fn(&ServiceInstance) -> bool,
    ) -> std::result::Result<Value, ApiError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match send() {
                Err(e) if e.lost() || e.code() == Some(400) => {
                    let now = self.api.get(&Self::instance_path(id))?;
                    if answer::<ServiceInstance>(now.clone(), "an instance").is_ok_and(|i| done(&i)) {
                        return Ok(now);
                    }
                    if !e.lost() || attempt >= MAX_ATTEMPTS {
                        return Err(e);
                    }
                    std::thread::sleep(backoff(attempt, api::jitter(), None));
                }
                r => return r,
            }
        }
    }

    /// One of the unconfirmed endpoints: a 404 or 405 means the API has no such endpoint,
    /// and the person running apply is told the Control Panel step instead.
    pub(super) fn unconfirmed(
        &self,
        result: std::result::Result<Value, ApiError>,
        env: &EnvName,
        manual: Manual,
    ) -> Result<()> {
        match result {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.code(), Some(404 | 405)) => {
                Err(ProviderError::manual(&e.to_string(), &manual_step(env.as_str(), manual)))
            }
            Err(e) => Err(api_err(e)),
        }
    }

    pub(super) fn instance_path(id: &ServiceId) -> String {
        format!("{V3}/service-instances/{id}/")
    }
}

/// Calls `look` every `poll` (sooner at first: `decide::pause`) until it gives `Ok(T)`, for
/// at most `wait`; meanwhile it gives what it waits for and the state it sees, which is
/// said as `decide::report_due` says. `Err` once `wait` has passed: what was awaited, the
/// state seen, the time waited. A stop asked by a signal ends the wait.
#[allow(clippy::type_complexity)]
pub(super) fn poll_until<T>(
    wait: Duration,
    poll: Duration,
    mut look: impl FnMut() -> Result<std::result::Result<T, (String, String)>>,
) -> std::result::Result<Result<T>, (String, String, Duration)> {
    let started = Instant::now();
    let (mut said, mut looks) = (None, 0);
    loop {
        looks += 1;
        let (what, seen) = match look() {
            Ok(Ok(t)) => return Ok(Ok(t)),
            Err(e) => return Ok(Err(e)),
            Ok(Err(pending)) => pending,
        };
        let waited = started.elapsed();
        if waited >= wait {
            return Err((what, seen, waited));
        }
        if report_due(waited, said) {
            crate::progress::say(&format!("waiting for {what}: {seen} for {}", clock(waited)));
            said = Some(waited);
        }
        if let Err(e) = crate::interrupt::check() {
            return Ok(Err(failed(e.to_string())));
        }
        std::thread::sleep(pause(poll, looks));
    }
}

/// The error of a wait that lasted `wait_minutes`.
pub(super) fn gave_up(what: &str, seen: &str, waited: Duration) -> ProviderError {
    failed(format!(
        "gave up waiting for {what} after {} (wait_minutes): still {seen}; it may still happen: look in the \
         Control Panel, then run apply again",
        clock(waited)
    ))
}
