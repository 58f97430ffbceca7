//! The Divio provider: the services of an application's environments, driven through the
//! Control Panel API (`docs/divio-api.md`). Add, backup, restore and deploy use endpoints
//! that Divio's own client uses; provision, detach, rename and delete use the API's REST
//! convention, and when the API answers 404 or 405 to one of them apply stops with the
//! Control Panel step that does it by hand.
//!
//! The platform acts in its own time and its answers can be lost, so an action is done
//! when observe shows what the rules predicted (`settle`, waiting while what the action
//! moved is on its way), and a request that creates something is sent again only once
//! it is proven not carried out: after a lost answer, the provider looks for what it would
//! have created first (`create`, `change`).
//!
//! The API shows neither write fences nor where a service's data came from. The fences
//! its `fence_command` set are this provider's records (under `root`, or in the state
//! database), read only while the service they name exists. What each service holds is
//! not its business: it reports only what the application can see, and the core's
//! ledger (`crate::ledger`) keeps the rest; without it a service
//! that is not visible holds no known data, and the next plan copies again rather than
//! trust a copy it cannot vouch for.

mod api;
pub mod decide;
pub mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use decide::*;

use self::api::{Api, ApiError};
use self::types::{answer, answers, Created, Operation, ServiceInstance, Success};
use super::{Backup, Provider, ProviderError, Result};
use crate::config::{DesiredEnv, DivioConfig, Verify};
use crate::model::{Data, EnvLive, EnvName, Live, Major, Prefix, Service, ServiceId, Status, FORMAT_VERSION};
use crate::plan::{Action, Plan};

const V3: &str = "/apps/v3";

/// The name of the records in the state database.
const RECORDS: &str = "divio-records";

/// A service instance as last observed.
#[derive(Clone, Debug)]
struct Instance {
    env: EnvName,
    region: String,
    service: Service,
    /// Its status as the provider reads it, and as the API spells it.
    seen: Seen,
    word: String,
}

/// What the API cannot show, as this provider recorded it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Records {
    #[serde(default)]
    fences: Vec<Fence>,
}

/// A fence set by `fence_command`; `lifted` once a deploy moved the application off the
/// fenced service and `unfence_command` ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Fence {
    env: EnvName,
    service: ServiceId,
    prefix: Prefix,
    #[serde(default)]
    lifted: bool,
}

/// The services of one application, through its API; see the module's text.
#[derive(Debug)]
pub struct DivioProvider {
    api: Api,
    application: String,
    envs: Vec<DesiredEnv>,
    root: PathBuf,
    fence_command: Option<String>,
    unfence_command: Option<String>,
    verify_command: Option<String>,
    poll: Duration,
    wait: Duration,
    app_uuid: Option<String>,
    env_uuids: BTreeMap<EnvName, String>,
    /// Catalogue entries by uuid (`None`: not PostgreSQL), and the regions already listed.
    catalogue: BTreeMap<String, (Option<u32>, String)>,
    regions_listed: BTreeSet<String>,
    instances: BTreeMap<ServiceId, Instance>,
    records: Records,
    /// The environment variables are read once per run, for `warn_undeployed`.
    vars_read: bool,
    writable: bool,
    /// Names this run in the notes of the backups and restores it starts, so that one
    /// whose answer was lost can be found again.
    run: String,
    /// What the last action asked the platform to change, for `settle` to wait for.
    moving: Option<Moving>,
    /// The API's base URL, for `identity`.
    base: String,
    /// Where the records live when not in a file under `root`: the state database.
    state: Option<crate::state::PgState>,
}

fn failed(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Failed(e.to_string())
}

/// An API error as the user should read it: a refused token says what to do.
fn api_err(e: ApiError) -> ProviderError {
    match e.code() {
        Some(401 | 403) => ProviderError::Failed(format!(
            "the Divio API refused the token ({e}); create a new access token in the Control Panel \
             (account → access tokens) and put it in the token environment variable or ~/.netrc"
        )),
        _ => ProviderError::Failed(format!("Divio API: {e}")),
    }
}

/// Looks like a uuid: an application named by uuid needs no lookup.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars()
            .enumerate()
            .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() })
}

/// The token: from `token_env`, else from the netrc entry of the zone's Control Panel.
fn token(config: &DivioConfig, zone: &str) -> Result<String> {
    let var = config.token_env.clone().unwrap_or_else(|| "DIVIO_TOKEN".into());
    if let Some(t) = std::env::var(&var).ok().filter(|t| !t.trim().is_empty()) {
        return Ok(t);
    }
    let netrc = std::env::var_os("NETRC_PATH")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".netrc")));
    let host = match zone.split_once("://") {
        Some((_, rest)) => rest.split(['/', ':']).next().unwrap_or(rest).to_owned(),
        None => netrc_host(zone),
    };
    let from_netrc =
        netrc.as_deref().and_then(|p| std::fs::read_to_string(p).ok()).and_then(|t| netrc_password(&t, &host));
    from_netrc.ok_or_else(|| {
        ProviderError::Failed(format!(
            "no Divio API token: set {var}, or log in with `divio login` (which stores it in ~/.netrc for {host})"
        ))
    })
}

impl DivioProvider {
    /// `envs`: the environments the config declares; only those are observed.
    pub fn new(config: &DivioConfig, config_path: &Path, envs: Vec<DesiredEnv>) -> Result<Self> {
        let zone = config.zone.clone().unwrap_or_else(|| "divio.com".into());
        let base = crate::config::divio_base_url(&zone).map_err(failed)?;
        let api = Api::new(&base, &token(config, &zone)?).map_err(failed)?;
        let identity_base = base.clone();
        let dir = config_path.parent().unwrap_or(Path::new(""));
        let root = dir.join(config.root.clone().unwrap_or_else(|| PathBuf::from(".pgconverge")));
        let mut p = DivioProvider {
            api,
            application: config.application.trim().to_owned(),
            envs,
            root,
            fence_command: config.fence_command.clone(),
            unfence_command: config.unfence_command.clone(),
            verify_command: config.verify_command.clone(),
            poll: Duration::from_secs_f64(config.poll_seconds.unwrap_or(3.0)),
            wait: Duration::from_secs_f64(60.0 * config.wait_minutes.unwrap_or(60.0)),
            app_uuid: None,
            env_uuids: BTreeMap::new(),
            catalogue: BTreeMap::new(),
            regions_listed: BTreeSet::new(),
            instances: BTreeMap::new(),
            records: Records::default(),
            vars_read: false,
            writable: false,
            run: run_id(),
            moving: None,
            base: identity_base,
            state: None,
        };
        p.records = p.read_records()?;
        Ok(p)
    }

    fn records_path(&self) -> PathBuf {
        let name: String =
            self.application.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        self.root.join(format!("divio-{name}.json"))
    }

    fn read_records(&self) -> Result<Records> {
        if let Some(state) = &self.state {
            return match state.get(RECORDS).map_err(failed)? {
                Some(text) => serde_json::from_str(&text)
                    .map_err(|e| ProviderError::Inconsistent(format!("the state database's record {RECORDS}: {e}"))),
                None => Ok(Records::default()),
            };
        }
        let path = self.records_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ProviderError::Inconsistent(format!("{}: {e}; remove it to start afresh", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Records::default()),
            Err(e) => Err(failed(format!("cannot read {}: {e}", path.display()))),
        }
    }

    fn write_records(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if let Some(state) = &self.state {
            let text = serde_json::to_string(&self.records).map_err(failed)?;
            return state.put(RECORDS, &text).map_err(failed);
        }
        let path = self.records_path();
        let bytes = serde_json::to_vec_pretty(&self.records).map_err(failed)?;
        crate::atomic::write_atomically(&path, &bytes, 0o644)
            .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
    }

    fn app(&mut self) -> Result<String> {
        if let Some(uuid) = &self.app_uuid {
            return Ok(uuid.clone());
        }
        // A refused token is said plainly before anything else is asked.
        self.api.get("/iam/v3/me/").map_err(api_err)?;
        let uuid = if is_uuid(&self.application) {
            self.application.clone()
        } else {
            let found = self.api.list(&format!("{V3}/applications/?slug={}", self.application)).map_err(api_err)?;
            let found: Vec<types::Application> = answers(found, "an application")?;
            let found: Vec<&types::Application> = found.iter().filter(|a| a.slug == self.application).collect();
            match found.as_slice() {
                [one] => one.uuid.clone(),
                [] => return Err(failed(format!("no application `{}` is visible to this token", self.application))),
                _ => {
                    return Err(failed(format!(
                        "several applications are called `{}`; name it by uuid",
                        self.application
                    )))
                }
            }
        };
        let envs = self.api.list(&format!("{V3}/environments/?application={uuid}")).map_err(api_err)?;
        for e in answers::<types::Environment>(envs, "an environment")? {
            if let Ok(name) = EnvName::parse(&e.slug) {
                self.env_uuids.insert(name, e.uuid);
            }
        }
        if let Some(missing) = self.envs.iter().find(|d| !self.env_uuids.contains_key(&d.name)) {
            let have: Vec<&str> = self.env_uuids.keys().map(EnvName::as_str).collect();
            return Err(ProviderError::Inconsistent(format!(
                "application {} has no environment `{}` (it has: {})",
                self.application,
                missing.name,
                have.join(", ")
            )));
        }
        self.app_uuid = Some(uuid.clone());
        Ok(uuid)
    }

    fn env_uuid(&self, env: &EnvName) -> Result<String> {
        self.env_uuids.get(env).cloned().ok_or_else(|| failed(format!("environment {env} is not known")))
    }

    /// Lists the catalogue of each region not listed yet.
    fn list_catalogues(&mut self, regions: BTreeSet<String>) -> Result<()> {
        let app = self.app()?;
        let todo: Vec<String> = regions.into_iter().filter(|r| !self.regions_listed.contains(r)).collect();
        let paths = todo.iter().map(|r| format!("{V3}/services/?region={r}&website={app}")).collect();
        for (region, entries) in todo.iter().zip(self.api.list_all(paths).map_err(api_err)?) {
            for e in answers::<types::CatalogueEntry>(entries, "a catalogue entry")? {
                self.catalogue.insert(e.uuid, (postgres_major(&e.identifier, &e.name), e.name));
            }
            self.regions_listed.insert(region.clone());
        }
        Ok(())
    }

    fn instance(&self, id: &ServiceId) -> Result<&Instance> {
        self.instances.get(id).ok_or_else(|| failed(format!("service {id} is not among the observed services")))
    }

    /// The dataset a visible service under a temporary or retired prefix holds, and whether
    /// the prefix is the retired one: `NEW_P` and `OLD_P` are bound to P; `NEW` and `OLD` to
    /// the one declared prefix no visible service holds under its own name (the one
    /// migrating), if there is exactly one.
    fn bound(desired: &DesiredEnv, prefix: &Prefix, visible: &[&Prefix]) -> Option<(Prefix, bool)> {
        let up = &desired.upgrade;
        let declared = || desired.postgres.iter().map(|(p, _)| p);
        let retired = |base: &Prefix| base == &up.retired_prefix;
        for base in [&up.temporary_prefix, &up.retired_prefix] {
            if prefix == base {
                let mut free = declared().filter(|p| !visible.contains(p));
                return match (free.next(), free.next()) {
                    (Some(p), None) => Some((p.clone(), retired(base))),
                    _ => None,
                };
            }
            if let Some(p) = declared().find(|p| prefix.as_str() == format!("{base}_{p}")) {
                return Some((p.clone(), retired(base)));
            }
        }
        None
    }

    /// Runs one of the configured shell commands with the service it is about in its
    /// environment; its output goes to the log, and into the error when it fails.
    fn run_command(&self, what: &str, command: &str, env: &EnvName, vars: &[(&str, &str)]) -> Result<()> {
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
    fn run_fence_command(&self, on: bool, env: &EnvName, id: &ServiceId, prefix: &Prefix) -> Result<()> {
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
    fn wait_for<T: Operation>(&self, for_what: &str, path: &str, done: impl Fn(&T) -> bool) -> Result<T> {
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
    fn create(
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
    fn find_by_notes(&self, path: &str, body: &Value) -> Result<Option<Value>> {
        let notes = body.get("notes").and_then(Value::as_str).unwrap_or_default();
        let listed = self.api.list(path).map_err(api_err)?;
        Ok(listed.into_iter().find(|item| item.get("notes").and_then(Value::as_str) == Some(notes)))
    }

    /// Asks for a change to an instance with `send`. A lost answer, or a refusal (400), is
    /// success when the instance already shows the change (`done`): an earlier attempt
    /// made it. A lost answer to a change not shown yet is asked again.
    fn change(
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
    fn unconfirmed(&self, result: std::result::Result<Value, ApiError>, env: &EnvName, manual: Manual) -> Result<()> {
        match result {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.code(), Some(404 | 405)) => {
                Err(ProviderError::manual(&e.to_string(), &manual_step(env.as_str(), manual)))
            }
            Err(e) => Err(api_err(e)),
        }
    }

    /// The prefixes of the `<PREFIX>_DATABASE_DSN` variables of each environment: names
    /// only, the values (secrets) are dropped as they arrive.
    fn dsn_names(&self) -> Result<BTreeMap<EnvName, BTreeSet<String>>> {
        let mut paths = Vec::new();
        for d in &self.envs {
            paths.push(format!("{V3}/environment-variables/?environment={}", self.env_uuid(&d.name)?));
        }
        let listed = self.api.list_all(paths).map_err(api_err)?;
        let names = |vars: Vec<Value>| -> Result<BTreeSet<String>> {
            let vars: Vec<types::Variable> = answers(vars, "an environment variable")?;
            Ok(vars.into_iter().filter_map(|v| v.name.strip_suffix("_DATABASE_DSN").map(str::to_owned)).collect())
        };
        let names = listed.into_iter().map(names).collect::<Result<Vec<_>>>()?;
        Ok(self.envs.iter().map(|d| d.name.clone()).zip(names).collect())
    }

    fn instance_path(id: &ServiceId) -> String {
        format!("{V3}/service-instances/{id}/")
    }
}

/// Says when the application's variables lag behind its services: they change at the next
/// deploy, which a plan that touches the environment ends with.
fn warn_undeployed(env: &EnvName, visible: &BTreeSet<String>, dsns: &BTreeSet<String>) {
    for p in visible.difference(dsns) {
        tracing::warn!(%env, prefix = %p, "{p} is attached, but the application has no {p}_DATABASE_DSN until the next deploy");
    }
    for p in dsns.difference(visible) {
        tracing::warn!(%env, prefix = %p, "the application still has {p}_DATABASE_DSN, whose service is no longer attached, until the next deploy");
    }
}

/// Calls `look` every `poll` (sooner at first: `decide::pause`) until it gives `Ok(T)`, for
/// at most `wait`; meanwhile it gives what it waits for and the state it sees, which is
/// said as `decide::report_due` says. `Err` once `wait` has passed: what was awaited, the
/// state seen, the time waited. A stop asked by a signal ends the wait.
#[allow(clippy::type_complexity)]
fn poll_until<T>(
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
fn gave_up(what: &str, seen: &str, waited: Duration) -> ProviderError {
    failed(format!(
        "gave up waiting for {what} after {} (wait_minutes): still {seen}; it may still happen: look in the \
         Control Panel, then run apply again",
        clock(waited)
    ))
}

/// The status of an instance as `GET …/service-instances/<uuid>/` gives it.
fn instance_status(instance: &ServiceInstance) -> Option<Seen> {
    status(&instance.service_status)
}

/// Names one run in the notes of what it creates: unique enough that two runs never share
/// it (the time in nanoseconds and the process id).
fn run_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}", nanos as u64, std::process::id())
}

impl Provider for DivioProvider {
    fn root(&self) -> &Path {
        &self.root
    }

    /// The application at its API.
    fn identity(&self) -> String {
        format!("divio {} {}", self.base, self.application)
    }

    fn keep_records_in(&mut self, state: crate::state::PgState) -> Result<()> {
        self.state = Some(state);
        self.records = self.read_records()?;
        Ok(())
    }

    /// Only apply writes the records, under the lock, so that a `plan` running beside it
    /// never writes back records older than the apply's.
    fn recover(&mut self) -> Result<()> {
        self.writable = true;
        Ok(())
    }

    /// Refuses, before anything is touched, a plan with actions the API cannot carry out:
    /// a fence without `fence_command`, a verify without `verify_command`.
    fn check(&self, plan: &Plan) -> Result<()> {
        for env in &plan.environments {
            if env.actions.iter().any(|a| matches!(a, Action::Replicate { .. } | Action::CatchUp { .. })) {
                return Err(ProviderError::Refused(format!(
                    "environment {}: Divio gives no access to the databases to replicate them; use \
                     `upgrade.strategy: dump_restore` there",
                    env.name
                )));
            }
            let verifies = env.actions.iter().any(|a| matches!(a, Action::Verify { .. }));
            if verifies && self.verify_command.is_none() {
                return Err(ProviderError::Refused(format!(
                    "environment {}: the plan verifies the copy, but Divio gives pgconverge no access to the \
                     databases. Set provider.divio.verify_command, or accept the risk with `upgrade.verify: none`: \
                     the copy is then put in use without being compared with its source",
                    env.name
                )));
            }
            let fences = env.actions.iter().any(|a| matches!(a, Action::Fence { .. } | Action::Unfence { .. }));
            if fences && self.fence_command.is_none() {
                let fence_writes = self.envs.iter().find(|d| d.name == env.name).is_none_or(|d| d.upgrade.fence_writes);
                let accept = if fence_writes {
                    "accept the risk with `upgrade.fence_writes: false`: as in Divio's own runbook, every write \
                     between the backup and the deploy will then be lost"
                } else {
                    "with `upgrade.verify: none` as well, accept that the copy is neither fenced nor verified"
                };
                return Err(ProviderError::Refused(format!(
                    "environment {}: the plan blocks writes (fence), which the Divio API cannot do. Set \
                     provider.divio.fence_command and unfence_command (e.g. commands that turn maintenance mode \
                     on and off), or {accept}",
                    env.name
                )));
            }
        }
        Ok(())
    }

    fn settle(&mut self, env: &EnvName, expected: &EnvLive) -> Result<Live> {
        let Some(moving) = self.moving.take() else { return self.observe() };
        let (wait, poll) = (self.wait, self.poll);
        let mut last = None;
        poll_until(wait, poll, || {
            let live = self.observe()?;
            let observed: Vec<(Service, String)> = self
                .instances
                .values()
                .filter(|i| &i.env == env)
                .map(|i| (i.service.clone(), i.word.trim().to_ascii_uppercase()))
                .collect();
            Ok(match awaited(&expected.services, &observed, &moving) {
                None => Ok(live),
                Some(a) => {
                    let pending = (format!("{} to {}", a.prefix, a.want), a.seen.clone());
                    last = Some(a);
                    Err(pending)
                }
            })
        })
        .unwrap_or_else(|(what, seen, waited)| {
            let what = last.map_or(what, |a: Awaited| format!("{} ({}) in {env} to {}", a.prefix, a.id, a.want));
            Err(gave_up(&what, &seen, waited))
        })
    }

    fn observe(&mut self) -> Result<Live> {
        self.app()?;
        let names: Vec<EnvName> = self.envs.iter().map(|d| d.name.clone()).collect();
        let mut paths = Vec::new();
        for name in &names {
            paths.push(format!("{V3}/service-instances/?environment={}", self.env_uuid(name)?));
        }
        let listed = self.api.list_all(paths).map_err(api_err)?;
        let listed: Vec<Vec<ServiceInstance>> =
            listed.into_iter().map(|l| answers(l, "a service instance")).collect::<Result<_>>()?;
        let regions = listed.iter().flatten().map(|i| i.region.clone()).filter(|r| !r.is_empty()).collect();
        self.list_catalogues(regions)?;
        let dsns = if self.vars_read { None } else { Some(self.dsn_names()?) };
        self.vars_read = true;

        let mut live = Live::empty();
        self.instances.clear();
        for (desired, items) in self.envs.iter().zip(&listed) {
            let env = &desired.name;
            let mut found = Vec::new();
            for item in items {
                let (uuid, word) = (&item.uuid, &item.service_status);
                let seen = status(word).ok_or_else(|| {
                    ProviderError::Inconsistent(format!(
                        "service instance {uuid} in {env} has status `{word}`, which this version of pgconverge \
                         does not know; nothing was done"
                    ))
                })?;
                let Some(status) = seen.for_rules() else { continue }; // removed
                if !item.is_database() {
                    continue;
                }
                let service = &item.service;
                let Some((major, _)) = self.catalogue.get(service) else {
                    return Err(ProviderError::Inconsistent(format!(
                        "service instance {uuid} in {env} uses catalogue entry {service}, which its region's catalogue does not list"
                    )));
                };
                let Some(major) = *major else { continue }; // another engine
                let bad = |m: String| ProviderError::Inconsistent(format!("service instance {uuid} in {env}: {m}"));
                let service = Service {
                    id: ServiceId::observed(uuid).map_err(bad)?,
                    version: Major::new(major).map_err(bad)?,
                    prefix: Prefix::parse(&item.prefix).map_err(bad)?,
                    status,
                    fenced: false,
                    data: None,
                };
                found.push((service, item.region.clone(), seen, word.clone()));
            }
            if let Some(dsns) = dsns.as_ref().and_then(|d| d.get(env)) {
                let visible = items.iter().filter(|i| {
                    i.is_database() && status(&i.service_status).and_then(Seen::for_rules).is_some_and(Status::visible)
                });
                let seen: BTreeSet<String> = visible.map(|i| i.prefix.clone()).collect();
                warn_undeployed(env, &seen, dsns);
            }
            let visible: Vec<&Prefix> =
                found.iter().filter(|(s, ..)| s.status.visible()).map(|(s, ..)| &s.prefix).collect();
            let bound: Vec<_> = found.iter().map(|(s, ..)| Self::bound(desired, &s.prefix, &visible)).collect();
            let mut services = Vec::new();
            for ((mut s, region, seen, word), bound) in found.into_iter().zip(bound) {
                s.fenced = self.records.fences.iter().any(|f| &f.env == env && f.service == s.id);
                // What the application can see, read from its prefix: the retired original
                // stays its database until a deploy; a new service it can see holds a copy
                // (whose making, if pgconverge's, the core's ledger knows better).
                s.data = match bound {
                    Some((of, retired)) if s.status.visible() => {
                        Some(Data { of, complete: retired, restored_from: None, verified: false, streaming: false })
                    }
                    _ => None,
                };
                self.instances
                    .insert(s.id.clone(), Instance { env: env.clone(), region, service: s.clone(), seen, word });
                services.push(s);
            }
            live.environments.insert(env.clone(), EnvLive { services });
        }
        let before = self.records.clone();
        let exists = |env: &EnvName, id: &ServiceId| self.instances.get(id).is_some_and(|i| &i.env == env);
        self.records.fences.retain(|f| exists(&f.env, &f.service));
        if self.records != before {
            self.write_records()?;
        }
        live.format_version = FORMAT_VERSION;
        Ok(live)
    }

    fn add(&mut self, env: &EnvName, prefix: &Prefix, version: Major) -> Result<ServiceId> {
        let env_uuid = self.env_uuid(env)?;
        let regions: BTreeSet<&str> = self
            .instances
            .values()
            .filter(|i| &i.env == env && !i.region.is_empty())
            .map(|i| i.region.as_str())
            .collect();
        let region = match Vec::from_iter(regions).as_slice() {
            [one] => one.to_string(),
            [] => {
                let all: Vec<types::Region> =
                    answers(self.api.list(&format!("{V3}/regions/")).map_err(api_err)?, "a region")?;
                match all.as_slice() {
                    [one] => one.uuid.clone(),
                    _ => return Err(failed(format!("environment {env} has no database yet, so its region is unknown: add one in the Control Panel first"))),
                }
            }
            _ => {
                return Err(failed(format!(
                    "environment {env} has services in several regions; pgconverge cannot tell which to use"
                )))
            }
        };
        self.list_catalogues([region.clone()].into())?;
        let mut offers: Vec<(&String, &(Option<u32>, String))> =
            self.catalogue.iter().filter(|(_, (m, _))| m.is_some()).collect();
        offers.sort_by(|a, b| a.1 .1.cmp(&b.1 .1));
        let Some((service, _)) = offers.iter().find(|(_, (m, _))| *m == Some(version.get())) else {
            let mut majors: Vec<u32> = offers.iter().filter_map(|(_, (m, _))| *m).collect();
            majors.dedup();
            let majors: Vec<String> = majors.iter().map(u32::to_string).collect();
            return Err(failed(format!(
                "the Divio catalogue offers no PostgreSQL {version} to this application (it offers: {})",
                majors.join(", ")
            )));
        };
        let service = service.to_string();
        let body = json!({"environment": env_uuid, "region": region, "service": service, "prefix": prefix.as_str()});
        // The rules add only under a free prefix: an instance there now is this request's.
        let find = |p: &Self| -> Result<Option<Value>> {
            let listed = p.api.list(&format!("{V3}/service-instances/?environment={env_uuid}")).map_err(api_err)?;
            Ok(listed.into_iter().find(|i| {
                answer::<ServiceInstance>(i.clone(), "a service instance").is_ok_and(|i| {
                    i.prefix == prefix.as_str()
                        && i.service == service
                        && status(&i.service_status).is_some_and(|s| s != Seen::Removed)
                })
            }))
        };
        let created =
            self.create(&format!("the instance {prefix}"), &format!("{V3}/service-instances/"), body, find)?;
        let created: Created = answer(created, "the new instance")?;
        let id = ServiceId::observed(&created.uuid).map_err(ProviderError::Inconsistent)?;
        self.moving = Some(Moving::These(vec![id.clone()]));
        Ok(id)
    }

    fn provision(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        let instance = self.instance(id)?;
        let (prefix, seen) = (instance.service.prefix.clone(), instance.seen);
        self.moving = Some(Moving::These(vec![id.clone()]));
        if seen == Seen::Provisioning {
            // Asked before (by an apply that stopped while it waited): wait, do not ask again.
            return Ok(());
        }
        let path = format!("{}provision/", Self::instance_path(id));
        let r = self.change(
            id,
            || self.api.post(&path, json!({})),
            |i| instance_status(i).is_some_and(|s| s != Seen::Is(Status::New)),
        );
        self.unconfirmed(r, env, Manual::Provision { prefix: prefix.as_str() })
    }

    fn fence(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        let prefix = self.instance(id)?.service.prefix.clone();
        self.run_fence_command(true, env, id, &prefix)?;
        self.records.fences.push(Fence { env: env.clone(), service: id.clone(), prefix, lifted: false });
        self.write_records()
    }

    fn unfence(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        let prefix = self.instance(id)?.service.prefix.clone();
        self.run_fence_command(false, env, id, &prefix)?;
        self.records.fences.retain(|f| !(&f.env == env && &f.service == id));
        self.write_records()
    }

    /// The handle is the backup's uuid and its part for `id`'s instance, which a restore
    /// names: `<backup>/<service-instance-backup>`.
    fn backup(&mut self, env: &EnvName, id: &ServiceId) -> Result<Backup> {
        let service = self.instance(id)?.service.clone();
        let body = json!({
            "environment": self.env_uuid(env)?,
            "services": [id.as_str()],
            "trigger": "MANUAL",
            "notes": format!("pgconverge {} backup {id}: {} before its upgrade", self.run, service.prefix),
        });
        let find = |p: &Self| p.find_by_notes(&format!("{V3}/backups/?environment={}", p.env_uuid(env)?), &body);
        let created =
            self.create(&format!("the backup of {}", service.prefix), &format!("{V3}/backups/"), body.clone(), find)?;
        let uuid = answer::<Created>(created, "the new backup")?.uuid;
        let what = format!("the backup of {} ({uuid}) to complete", service.prefix);
        let done: types::Backup = self.wait_for(&what, &format!("{V3}/backups/{uuid}/"), |b: &types::Backup| {
            b.state.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("COMPLETED"))
        })?;
        if !Success::ok(&done.success) {
            return Err(failed(format!("backup {uuid} of {} ended with success = {:?}", service.prefix, done.success)));
        }
        let mut found = None;
        for part in done.service_instance_backups.iter().map(types::Part::uuid) {
            let path = format!("{V3}/service-instance-backups/{part}/");
            let sib: types::InstanceBackup = answer(self.api.get(&path).map_err(api_err)?, &path)?;
            if sib.service_instance == id.as_str() {
                found = Some((part.to_owned(), sib.size));
            }
        }
        let (instance_backup, size) = found.ok_or_else(|| failed(format!("backup {uuid} holds no backup of {id}")))?;
        Ok(Backup { of: id.clone(), handle: format!("{uuid}/{instance_backup}"), bytes: size })
    }

    fn restore(&mut self, _env: &EnvName, id: &ServiceId, backup: &Backup) -> Result<u64> {
        let Some((backup_uuid, instance_backup)) = backup.handle.split_once('/') else {
            return Err(failed(format!("{} is not a backup this provider took", backup.handle)));
        };
        let body = json!({
            "backup": backup_uuid,
            "service_instance_restores": [{"service_instance_backup": instance_backup, "service_instance": id.as_str()}],
            "notes": format!("pgconverge {} restore {id} from {backup_uuid}: copy of {}", self.run, backup.of),
        });
        let find = |p: &Self| p.find_by_notes(&format!("{V3}/backup-restores/?backup={backup_uuid}"), &body);
        let created =
            self.create(&format!("the restore into {id}"), &format!("{V3}/backup-restores/"), body.clone(), find)?;
        let uuid = answer::<Created>(created, "the new restore")?.uuid;
        let what = format!("the restore of {}'s backup into {id} ({uuid}) to finish", backup.of);
        let done: types::Restore =
            self.wait_for(&what, &format!("{V3}/backup-restores/{uuid}/"), |r: &types::Restore| r.finished.is_some())?;
        if !Success::ok(&done.success) {
            return Err(failed(format!("restore {uuid} into {id} ended with success = {:?}", done.success)));
        }
        let path = format!("{V3}/service-instance-backups/{instance_backup}/");
        let part: types::InstanceBackup = answer(self.api.get(&path).map_err(api_err)?, &path)?;
        Ok(part.size)
    }

    fn verify(&mut self, env: &EnvName, id: &ServiceId, against: &ServiceId, how: Verify) -> Result<()> {
        let Some(command) = &self.verify_command else {
            return Err(ProviderError::Refused(
                "Divio gives no database access to verify with; set provider.divio.verify_command".into(),
            ));
        };
        let (copy, source) =
            (self.instance(id)?.service.prefix.clone(), self.instance(against)?.service.prefix.clone());
        self.run_command(
            "verify_command",
            command,
            env,
            &[
                ("PGCONVERGE_SERVICE", id.as_str()),
                ("PGCONVERGE_PREFIX", copy.as_str()),
                ("PGCONVERGE_AGAINST", against.as_str()),
                ("PGCONVERGE_AGAINST_PREFIX", source.as_str()),
                ("PGCONVERGE_VERIFY", how.as_str()),
            ],
        )
    }

    fn rename(&mut self, env: &EnvName, id: &ServiceId, to: &Prefix) -> Result<()> {
        let from = self.instance(id)?.service.prefix.clone();
        self.moving = Some(Moving::These(vec![id.clone()]));
        let path = Self::instance_path(id);
        let r = self.change(id, || self.api.patch(&path, json!({"prefix": to.as_str()})), |i| i.prefix == to.as_str());
        self.unconfirmed(r, env, Manual::Rename { from: from.as_str(), to: to.as_str() })
    }

    fn detach(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        let prefix = self.instance(id)?.service.prefix.clone();
        self.moving = Some(Moving::These(vec![id.clone()]));
        let path = format!("{}detach/", Self::instance_path(id));
        let r = self.change(
            id,
            || self.api.post(&path, json!({})),
            |i| matches!(instance_status(i), Some(Seen::Is(Status::PendingDetachment | Status::Detached))),
        );
        self.unconfirmed(r, env, Manual::Detach { prefix: prefix.as_str() })
    }

    fn deploy(&mut self, env: &EnvName) -> Result<()> {
        let env_uuid = self.env_uuid(env)?;
        let listing = format!("{V3}/deployments/?environment={env_uuid}");
        let deployments = |p: &Self| -> Result<Vec<types::Deployment>> {
            answers(p.api.list(&listing).map_err(api_err)?, "a deployment")
        };
        let running = deployments(self)?;
        // A deployment already under way started before this apply's changes: it is waited
        // for, then a new one carries them.
        let mut before: BTreeSet<String> = running.iter().map(|d| d.uuid.clone()).collect();
        if let Some(busy) = running.iter().find(|d| d.ended_at.is_none()) {
            let path = format!("{V3}/deployments/{}/", busy.uuid);
            let what = format!("the deployment already running ({}) to end", busy.uuid);
            self.wait_for(&what, &path, |d: &types::Deployment| d.ended_at.is_some())?;
            before = deployments(self)?.into_iter().map(|d| d.uuid).collect();
        }
        self.moving = Some(Moving::All);
        // Any deployment that started after this one was asked for carries the changes
        // made before it: one of them, found after a lost answer, is as good as this one.
        let find = |p: &Self| -> Result<Option<Value>> {
            let new = deployments(p)?.into_iter().find(|d| !before.contains(&d.uuid));
            Ok(new.map(|d| json!({"uuid": d.uuid})))
        };
        let created = self.create(
            &format!("the deployment of {env}"),
            &format!("{V3}/deployments/"),
            json!({"environment": env_uuid}),
            find,
        )?;
        let uuid = answer::<Created>(created, "the new deployment")?.uuid;
        let path = format!("{V3}/deployments/{uuid}/");
        let what = format!("the deployment of {env} ({uuid}) to end");
        let done: types::Deployment = self.wait_for(&what, &path, |d: &types::Deployment| d.ended_at.is_some())?;
        if !Success::ok(&done.success) {
            return Err(failed(format!("deployment {uuid} of {env} failed; its log is in the Control Panel")));
        }
        // The application now uses the copies: the fences on what it left may be lifted
        // (a fence is often the whole application's maintenance mode).
        let fenced: Vec<Fence> = self.records.fences.iter().filter(|f| &f.env == env && !f.lifted).cloned().collect();
        for f in fenced {
            self.run_fence_command(false, env, &f.service, &f.prefix)?;
            for r in self.records.fences.iter_mut().filter(|r| **r == f) {
                r.lifted = true;
            }
            self.write_records()?;
        }
        Ok(())
    }

    fn delete(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        let prefix = self.instance(id)?.service.prefix.clone();
        self.moving = Some(Moving::These(vec![id.clone()]));
        let r = self.api.delete(&Self::instance_path(id));
        self.unconfirmed(r, env, Manual::Delete { prefix: prefix.as_str() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Upgrade;

    fn prefix(p: &str) -> Prefix {
        Prefix::parse(p).expect("prefix")
    }

    fn env(declared: &[&str]) -> DesiredEnv {
        DesiredEnv {
            name: EnvName::parse("live").expect("name"),
            postgres: declared.iter().map(|p| (prefix(p), Major::new(17).expect("major"))).collect(),
            upgrade: Upgrade::default(),
        }
    }

    #[test]
    fn temporary_and_retired_prefixes_are_bound_to_their_dataset() {
        let one = env(&["DEFAULT"]);
        let bound = |d: &DesiredEnv, p: &str, visible: &[&str]| {
            let visible: Vec<Prefix> = visible.iter().map(|v| prefix(v)).collect();
            DivioProvider::bound(d, &prefix(p), &visible.iter().collect::<Vec<_>>())
        };
        assert_eq!(bound(&one, "OLD", &["OLD"]), Some((prefix("DEFAULT"), true)));
        assert_eq!(bound(&one, "NEW", &["DEFAULT", "NEW"]), None, "DEFAULT is visible under its own name");
        assert_eq!(bound(&one, "NEW", &["NEW"]), Some((prefix("DEFAULT"), false)));
        assert_eq!(bound(&one, "ANALYTICS", &["ANALYTICS"]), None, "not ours");
        let two = env(&["DEFAULT", "ANALYTICS"]);
        assert_eq!(bound(&two, "OLD_ANALYTICS", &["DEFAULT"]), Some((prefix("ANALYTICS"), true)));
        assert_eq!(bound(&two, "NEW_DEFAULT", &["DEFAULT"]), Some((prefix("DEFAULT"), false)));
        assert_eq!(bound(&two, "OLD", &["OLD"]), None, "two prefixes could own a plain OLD");
        assert_eq!(bound(&two, "OLD", &["OLD", "ANALYTICS"]), Some((prefix("DEFAULT"), true)));
    }

    #[test]
    fn applications_named_by_uuid_need_no_lookup() {
        assert!(is_uuid("00000000-0000-4000-a000-000000000001"));
        assert!(!is_uuid("my-app") && !is_uuid("00000000-0000-4000-a000-00000000000g"));
    }
}
