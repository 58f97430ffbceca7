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

mod actions;
mod api;
pub mod decide;
mod observe;
mod records;
mod requests;
pub mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use decide::*;

use self::api::{Api, ApiError};
use self::records::Records;
use super::{ProviderError, Result};
use crate::config::{DesiredEnv, DivioConfig};
use crate::model::{EnvName, Service, ServiceId};

const V3: &str = "/apps/v3";

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
    /// The application's environments in the API's order.
    env_order: Vec<EnvName>,
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
            env_order: Vec::new(),
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

    /// Every environment of the application, in the API's order.
    pub fn environments(&mut self) -> Result<Vec<EnvName>> {
        self.app()?;
        Ok(self.env_order.clone())
    }

    fn instance(&self, id: &ServiceId) -> Result<&Instance> {
        self.instances.get(id).ok_or_else(|| failed(format!("service {id} is not among the observed services")))
    }
}

/// Names one run in the notes of what it creates: unique enough that two runs never share
/// it (the time in nanoseconds and the process id).
fn run_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}", nanos as u64, std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applications_named_by_uuid_need_no_lookup() {
        assert!(is_uuid("00000000-0000-4000-a000-000000000001"));
        assert!(!is_uuid("my-app") && !is_uuid("00000000-0000-4000-a000-00000000000g"));
    }
}
