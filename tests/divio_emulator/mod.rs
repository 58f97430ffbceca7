//! An in-process emulator of the Divio Control Panel API as `docs/divio-api.md` documents
//! it, for the Divio provider's tests: token check, pagination through absolute `next`
//! links with small pages, service instances with the documented statuses and
//! transitions, backups, restores and deployments that take several polls, and 429s now
//! and then. The unconfirmed endpoints (provision, detach, rename, delete) follow the
//! REST convention and can be switched off (405) one by one.
//!
//! It can be as unkind as the real platform: provisioning that takes wall time (seen the
//! same way by the listing and by GET; a restore into an instance still provisioning
//! fails), jobs that take wall time as well as polls, and replies lost after the work was
//! done (`Lose`): the connection dropped, or a 502 as from a proxy.
//!
//! It also plays the application: at every request it tries to commit one write through
//! the DSN its last deployment gave it for `DEFAULT`, unless the fence file exists
//! (maintenance mode), and remembers every write it was told had committed. A test then
//! checks that each of them is in the database the application ends up on.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use pgconverge::provider::divio::types;
use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub struct Instance {
    pub uuid: String,
    pub env: String,
    pub prefix: String,
    pub status: String,
    pub region: String,
    pub service: String,
    pub kind: String,
    pub rows: Vec<String>,
    /// Added through the API (not by the test's set-up).
    pub created: bool,
    /// When a provisioning instance is ready.
    ready_at: Option<Instant>,
}

#[derive(Clone, Debug)]
struct Job {
    polls_left: u32,
    /// It also takes this long, whatever the polls.
    ends_at: Instant,
    done: bool,
}

/// How the answer to a request that changed something is lost, the first time that very
/// request (method, path, body) is seen: after the platform acted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lose {
    /// The connection is closed without an answer.
    Drop,
    /// A proxy answers 502 Bad Gateway.
    BadGateway,
    /// A proxy answers 502 Bad Gateway, and the platform never saw the request: the one
    /// case where sending a create again is right.
    BadGatewayBeforeActing,
}

#[derive(Clone, Debug)]
struct Backup {
    env: String,
    parts: Vec<String>,
    notes: String,
    job: Job,
}

#[derive(Clone, Debug)]
struct InstanceBackup {
    backup: String,
    instance: String,
    rows: Vec<String>,
}

#[derive(Clone, Debug)]
struct Restore {
    backup: String,
    target: String,
    rows: Vec<String>,
    notes: String,
    /// Posted into an instance that was not ready: it ends with `FAILURE`.
    fails: bool,
    job: Job,
}

#[derive(Clone, Debug)]
pub struct Deployment {
    pub uuid: String,
    pub env: String,
    job: Job,
    pub started_by_test: bool,
    pub seq: u32,
    pub ended_seq: Option<u32>,
}

#[derive(Debug, Default)]
pub struct World {
    pub token: String,
    pub base: String,
    pub page_size: usize,
    /// GETs a backup, restore or deployment takes to finish.
    pub polls: u32,
    /// Wall time a backup, restore or deployment takes to finish, besides the polls.
    pub job_time: std::time::Duration,
    /// Wall time an instance takes to provision.
    pub provisioning: std::time::Duration,
    /// Wall time a deployment takes, when longer than `job_time`.
    pub deployment_time: std::time::Duration,
    /// Loses the first answer to every request that changes something (`None`: never).
    pub lose: Option<Lose>,
    /// The requests whose answers were lost, and how many.
    lost: BTreeSet<String>,
    pub answers_lost: u32,
    /// Every nth request is answered 429 (0: never).
    pub rate_limit_every: u32,
    /// Every nth request is answered 503 (0: never).
    pub unavailable_every: u32,
    /// Answers refused with 429 or 503 so far.
    pub refused: u32,
    /// How long each answer takes, to see requests overlap.
    pub delay: std::time::Duration,
    /// Requests in flight now, and the most there ever were at once.
    pub in_flight: u32,
    pub max_in_flight: u32,
    /// Unconfirmed endpoints answered 405: "provision", "detach", "rename", "delete".
    pub unsupported: BTreeSet<&'static str>,
    pub app: (String, String),
    pub envs: Vec<(String, String)>,
    pub regions: Vec<String>,
    /// (uuid, name, identifier)
    pub catalogue: Vec<(String, String, String)>,
    pub instances: Vec<Instance>,
    backups: BTreeMap<String, Backup>,
    instance_backups: BTreeMap<String, InstanceBackup>,
    restores: BTreeMap<String, Restore>,
    pub deployments: Vec<Deployment>,
    /// What the application's last deployment gave it: env → prefix → instance.
    pub bindings: BTreeMap<String, BTreeMap<String, String>>,
    /// While this file exists the application cannot write (its maintenance mode).
    pub fence_file: Option<PathBuf>,
    /// Writes the application was told had committed, per environment.
    pub committed: BTreeMap<String, Vec<String>>,
    pub requests: u32,
    pub log: Vec<String>,
    next_id: u32,
    seq: u32,
}

/// The password in every DSN the emulator hands out: it must never appear in any output.
pub const DSN_PASSWORD: &str = "dsn-pa55word";
pub const PG15: &str = "00000000-0000-4000-8000-000000000015";
pub const PG17: &str = "00000000-0000-4000-8000-000000000017";

impl World {
    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("00000000-0000-4000-a000-{:012}", self.next_id)
    }

    /// An application `shop` with the given environments, one region, a catalogue of
    /// PostgreSQL 13, 15, 17 and MySQL 8, and in each environment a `DEFAULT` PostgreSQL 15
    /// holding two rows and attached (deployed), beside a storage instance.
    pub fn shop(envs: &[&str]) -> World {
        let mut w = World { token: "tok-s3cret".into(), page_size: 2, polls: 3, ..World::default() };
        w.app = ("00000000-0000-4000-b000-000000000001".into(), "shop".into());
        w.regions = vec!["00000000-0000-4000-c000-000000000001".into()];
        w.catalogue = vec![
            ("00000000-0000-4000-8000-000000000013".into(), "PostgreSQL 13".into(), "postgres-13".into()),
            (PG15.into(), "PostgreSQL 15".into(), "postgres-15".into()),
            (PG17.into(), "PostgreSQL 17".into(), "postgres-17".into()),
            ("00000000-0000-4000-8000-000000000008".into(), "MySQL 8".into(), "mysql-8".into()),
            ("00000000-0000-4000-8000-0000000000aa".into(), "Object storage".into(), "s3".into()),
        ];
        for env in envs {
            let uuid = w.id();
            w.envs.push((uuid.clone(), env.to_string()));
            let db = w.instance(&uuid, "DEFAULT", PG15, "ATTACHED");
            w.instances.iter_mut().for_each(|i| {
                if i.uuid == db {
                    i.rows = vec!["row-a".into(), "row-b".into()];
                }
            });
            w.bindings.entry(env.to_string()).or_default().insert("DEFAULT".into(), db);
            let storage = w.instance(&uuid, "DEFAULT", "00000000-0000-4000-8000-0000000000aa", "ATTACHED");
            w.instances.iter_mut().filter(|i| i.uuid == storage).for_each(|i| i.kind = "STORAGE".into());
        }
        w
    }

    /// Adds an instance to the environment with this uuid; returns its uuid.
    pub fn instance(&mut self, env_uuid: &str, prefix: &str, service: &str, status: &str) -> String {
        let uuid = self.id();
        let region = self.regions[0].clone();
        self.instances.push(Instance {
            uuid: uuid.clone(),
            env: env_uuid.into(),
            prefix: prefix.into(),
            status: status.into(),
            region,
            service: service.into(),
            kind: "DATABASE".into(),
            rows: Vec::new(),
            created: false,
            ready_at: None,
        });
        uuid
    }

    /// What the API created in an environment: instances, backups, restores (into its
    /// instances) and deployments of its own.
    pub fn creates(&self, slug: &str) -> [usize; 4] {
        let env = self.env_uuid(slug);
        let ours = |uuid: &str| self.instances.iter().any(|i| i.uuid == uuid && i.env == env);
        [
            self.instances.iter().filter(|i| i.env == env && i.created).count(),
            self.backups.values().filter(|b| b.env == env).count(),
            self.restores.values().filter(|r| ours(&r.target)).count(),
            self.deployments.iter().filter(|d| d.env == env && !d.started_by_test).count(),
        ]
    }

    /// Deployments running now end at their next poll, whatever time they were to take.
    pub fn end_deployments_now(&mut self) {
        for d in self.deployments.iter_mut().filter(|d| !d.job.done) {
            d.job.ends_at = Instant::now();
        }
    }

    /// Every instance provisioning now is ready at once.
    pub fn provision_now(&mut self) {
        for i in self.instances.iter_mut().filter(|i| i.status == "PROVISIONING") {
            i.ready_at = Some(Instant::now());
        }
    }

    /// Provisioning instances whose time has come are ready.
    fn refresh(&mut self) {
        let now = Instant::now();
        for i in self.instances.iter_mut().filter(|i| i.status == "PROVISIONING") {
            if i.ready_at.is_none_or(|at| at <= now) {
                i.status = "PENDING_ATTACHMENT".into();
            }
        }
    }

    pub fn env_uuid(&self, slug: &str) -> String {
        self.envs.iter().find(|(_, s)| s == slug).map(|(u, _)| u.clone()).expect("environment")
    }

    /// The database instances of an environment that are not removed.
    pub fn databases(&self, slug: &str) -> Vec<Instance> {
        let env = self.env_uuid(slug);
        self.instances
            .iter()
            .filter(|i| i.env == env && i.kind == "DATABASE" && i.status != "REMOVED")
            .cloned()
            .collect()
    }

    /// The rows of the database the application's `DEFAULT` now points at.
    pub fn app_rows(&self, slug: &str) -> Vec<String> {
        let uuid = &self.bindings[slug]["DEFAULT"];
        self.instances.iter().find(|i| &i.uuid == uuid).map(|i| i.rows.clone()).unwrap_or_default()
    }

    /// Renames by hand, as a person in the Control Panel would.
    pub fn rename_by_hand(&mut self, slug: &str, from: &str, to: &str) {
        let env = self.env_uuid(slug);
        let i = self.instances.iter_mut().find(|i| i.env == env && i.prefix == from && i.status != "REMOVED");
        i.expect("instance to rename").prefix = to.into();
    }

    /// The application commits one write to its `DEFAULT`, unless it is fenced out.
    fn app_writes(&mut self) {
        if self.fence_file.as_ref().is_some_and(|f| f.exists()) {
            return;
        }
        for (env, bound) in self.bindings.clone() {
            let Some(uuid) = bound.get("DEFAULT") else { continue };
            let row = format!("write-{}", self.requests);
            if let Some(i) = self.instances.iter_mut().find(|i| &i.uuid == uuid && i.status != "REMOVED") {
                i.rows.push(row.clone());
                self.committed.entry(env).or_default().push(row);
            }
        }
    }

    fn tick(job: &mut Job) {
        if job.polls_left > 0 {
            job.polls_left -= 1;
        }
        job.done = job.polls_left == 0 && Instant::now() >= job.ends_at;
    }

    fn job(&self) -> Job {
        Job { polls_left: self.polls, ends_at: Instant::now() + self.job_time, done: false }
    }

    /// Starts a deployment of `slug` that is already running when pgconverge looks.
    pub fn start_deployment(&mut self, slug: &str, polls: u32) -> String {
        let uuid = self.id();
        self.seq += 1;
        let env = self.env_uuid(slug);
        self.deployments.push(Deployment {
            uuid: uuid.clone(),
            env,
            job: Job { polls_left: polls, ends_at: Instant::now(), done: false },
            started_by_test: true,
            seq: self.seq,
            ended_seq: None,
        });
        uuid
    }

    fn finish_deployment(&mut self, env: &str) {
        let slug = self.envs.iter().find(|(u, _)| u == env).map(|(_, s)| s.clone()).unwrap_or_default();
        let mut bound = BTreeMap::new();
        for i in self.instances.iter_mut().filter(|i| i.env == env) {
            match i.status.as_str() {
                "NEW" | "PROVISIONING" | "PENDING_ATTACHMENT" => i.status = "ATTACHED".into(),
                "PENDING_DETACHMENT" => i.status = "DETACHED".into(),
                _ => {}
            }
            if i.status == "ATTACHED" && i.kind == "DATABASE" {
                bound.insert(i.prefix.clone(), i.uuid.clone());
            }
        }
        self.bindings.insert(slug, bound);
    }
}

pub type Shared = Arc<Mutex<World>>;

pub fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves `world` on 127.0.0.1 from a thread of its own; returns the base URL.
pub fn serve(world: World) -> (Shared, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let shared = Arc::new(Mutex::new(World { base: base.clone(), ..world }));
    let state = shared.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new().fallback(handle).with_state(state);
            axum::serve(listener, app).await.expect("serve");
        });
    });
    (shared, base)
}

fn answer(code: StatusCode, body: Value) -> Response {
    (code, [("content-type", "application/json")], body.to_string()).into_response()
}

fn bad(msg: &str) -> Response {
    answer(StatusCode::BAD_REQUEST, json!({"non_field_errors": [msg]}))
}

fn not_found() -> Response {
    answer(StatusCode::NOT_FOUND, json!({"detail": "Not found."}))
}

async fn handle(State(world): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let delay = {
        let mut w = lock(&world);
        w.in_flight += 1;
        w.max_in_flight = w.max_in_flight.max(w.in_flight);
        w.delay
    };
    tokio::time::sleep(delay).await;
    let key = format!("{method} {} {}", uri.path(), String::from_utf8_lossy(&body));
    let changes = method != Method::GET;
    let bad_gateway = || (StatusCode::BAD_GATEWAY, "<html>502 Bad Gateway</html>").into_response();
    {
        let mut w = lock(&world);
        if changes && w.lose == Some(Lose::BadGatewayBeforeActing) && w.lost.insert(key.clone()) {
            w.answers_lost += 1;
            w.in_flight -= 1;
            return bad_gateway();
        }
    }
    let response = respond(&world, method, uri, headers, body);
    let lose = {
        let mut w = lock(&world);
        w.in_flight -= 1;
        let lose = w.lose.filter(|_| changes && response.status().is_success() && w.lost.insert(key));
        w.answers_lost += u32::from(lose.is_some());
        lose
    };
    match lose {
        // Ends the connection's task: the client sees the connection closed, no answer.
        Some(Lose::Drop) => std::panic::resume_unwind(Box::new("answer lost")),
        Some(Lose::BadGateway) => bad_gateway(),
        Some(Lose::BadGatewayBeforeActing) | None => response,
    }
}

fn respond(world: &Shared, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let mut w = lock(world);
    w.requests += 1;
    w.log.push(format!("{method} {}", uri.path()));
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Token {}", w.token)) {
        return answer(StatusCode::UNAUTHORIZED, json!({"detail": "Invalid token."}));
    }
    if !headers.get("user-agent").and_then(|v| v.to_str().ok()).is_some_and(|u| u.starts_with("pgconverge/")) {
        return bad("no user agent");
    }
    if w.rate_limit_every > 0 && w.requests.is_multiple_of(w.rate_limit_every) {
        w.refused += 1;
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")], "slow down").into_response();
    }
    if w.unavailable_every > 0 && w.requests.is_multiple_of(w.unavailable_every) {
        w.refused += 1;
        return (StatusCode::SERVICE_UNAVAILABLE, "<html>upstream down</html>").into_response();
    }
    w.app_writes();
    w.refresh();
    let query: BTreeMap<String, String> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let route: Vec<&str> = path.iter().skip(2).copied().collect();
    let area = path.first().copied().unwrap_or("");
    match (method.clone(), area, route.as_slice()) {
        (Method::GET, "iam", ["me"]) => answer(StatusCode::OK, json!({"uuid": "me", "email": "me@example.com"})),
        (Method::GET, "apps", ["applications"]) => {
            let items = if query.get("slug") == Some(&w.app.1) {
                vec![typed(
                    types::Application { uuid: w.app.0.clone(), slug: w.app.1.clone() },
                    json!({"name": "Shop", "organisation": "org"}),
                )]
            } else {
                vec![]
            };
            page(&w, &uri, &query, items)
        }
        (Method::GET, "apps", ["environments"]) if query.get("application") == Some(&w.app.0) => {
            let env = |(uuid, slug): &(String, String)| types::Environment { uuid: uuid.clone(), slug: slug.clone() };
            let items = w.envs.iter().map(|e| typed(env(e), json!({"last_finished_deployment": null}))).collect();
            page(&w, &uri, &query, items)
        }
        (Method::GET, "apps", ["regions"]) => {
            let items =
                w.regions.iter().map(|r| typed(types::Region { uuid: r.clone() }, json!({"name": "Europe"}))).collect();
            page(&w, &uri, &query, items)
        }
        (Method::GET, "apps", ["services"]) if query.get("website") == Some(&w.app.0) => {
            let items = w
                .catalogue
                .iter()
                .map(|(u, n, i)| {
                    let entry = types::CatalogueEntry { uuid: u.clone(), name: n.clone(), identifier: i.clone() };
                    typed(entry, json!({"type": "DATABASE", "description": ""}))
                })
                .collect();
            page(&w, &uri, &query, items)
        }
        (Method::GET, "apps", ["service-instances"]) => {
            let env = query.get("environment").cloned().unwrap_or_default();
            let items = w.instances.iter().filter(|i| i.env == env).map(instance_json).collect();
            page(&w, &uri, &query, items)
        }
        (Method::POST, "apps", ["service-instances"]) => add_instance(&mut w, &body),
        (method, "apps", ["service-instances", uuid, rest @ ..]) => instance_action(&mut w, method, uuid, rest, &body),
        (Method::POST, "apps", ["backups"]) => {
            let env = body["environment"].as_str().unwrap_or_default().to_owned();
            let services: Vec<String> = body["services"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect();
            let notes = body["notes"].as_str().unwrap_or_default().to_owned();
            let uuid = w.id();
            let mut parts = Vec::new();
            for s in services {
                let Some(i) = w.instances.iter().find(|i| i.uuid == s && i.env == env).cloned() else {
                    return bad("unknown service instance");
                };
                if i.status == "NEW" {
                    return bad("the service instance is not provisioned");
                }
                let part = w.id();
                w.instance_backups
                    .insert(part.clone(), InstanceBackup { backup: uuid.clone(), instance: s, rows: i.rows });
                parts.push(part);
            }
            let job = w.job();
            w.backups.insert(uuid.clone(), Backup { env, parts, notes, job });
            created(&uuid)
        }
        (Method::GET, "apps", ["backups"]) => {
            let env = query.get("environment").cloned().unwrap_or_default();
            let items = w.backups.iter().filter(|(_, b)| b.env == env).map(|(u, b)| backup_json(u, b)).collect();
            page(&w, &uri, &query, items)
        }
        (Method::GET, "apps", ["backups", uuid]) => {
            let uuid = uuid.to_string();
            let Some(b) = w.backups.get_mut(&uuid) else { return not_found() };
            World::tick(&mut b.job);
            answer(StatusCode::OK, backup_json(&uuid, b))
        }
        (Method::GET, "apps", ["service-instance-backups", uuid]) => match w.instance_backups.get(*uuid) {
            Some(p) => {
                let part =
                    types::InstanceBackup { service_instance: p.instance.clone(), size: 1000 * p.rows.len() as u64 };
                let extra = json!({"uuid": uuid, "backup": p.backup, "service_type": "DATABASE", "errors": null});
                answer(StatusCode::OK, typed(part, extra))
            }
            None => not_found(),
        },
        (Method::POST, "apps", ["backup-restores"]) => {
            let Some(item) = body["service_instance_restores"].as_array().and_then(|a| a.first()).cloned() else {
                return bad("service_instance_restores is required");
            };
            let Some(part) = item["service_instance_backup"].as_str().and_then(|p| w.instance_backups.get(p)).cloned()
            else {
                return bad("unknown service instance backup");
            };
            let target = item["service_instance"].as_str().map_or(part.instance.clone(), str::to_owned);
            let fails = match w.instances.iter().find(|i| i.uuid == target) {
                Some(i) if i.status != "NEW" && i.status != "REMOVED" => i.status == "PROVISIONING",
                _ => return bad("the target is not provisioned"),
            };
            let uuid = w.id();
            let job = w.job();
            let notes = body["notes"].as_str().unwrap_or_default().to_owned();
            w.restores
                .insert(uuid.clone(), Restore { backup: part.backup, target, rows: part.rows, notes, fails, job });
            created(&uuid)
        }
        (Method::GET, "apps", ["backup-restores"]) => {
            let backup = query.get("backup").cloned().unwrap_or_default();
            let items =
                w.restores.iter().filter(|(_, r)| r.backup == backup).map(|(u, r)| restore_json(u, r)).collect();
            page(&w, &uri, &query, items)
        }
        (Method::GET, "apps", ["backup-restores", uuid]) => {
            let uuid = uuid.to_string();
            let Some(r) = w.restores.get_mut(&uuid) else { return not_found() };
            World::tick(&mut r.job);
            let r = r.clone();
            if r.job.done && !r.fails {
                if let Some(i) = w.instances.iter_mut().find(|i| i.uuid == r.target) {
                    i.rows = r.rows.clone();
                }
            }
            answer(StatusCode::OK, restore_json(&uuid, &r))
        }
        (Method::GET, "apps", ["environment-variables"]) => {
            let env = query.get("environment").cloned().unwrap_or_default();
            let slug = w.envs.iter().find(|(u, _)| *u == env).map(|(_, s)| s.clone()).unwrap_or_default();
            let mut items = Vec::new();
            for (prefix, uuid) in w.bindings.get(&slug).cloned().unwrap_or_default() {
                let dsn = format!("postgres://app:{DSN_PASSWORD}@{uuid}.db.example/app");
                if prefix == "DEFAULT" {
                    items.push(json!({"name": "DATABASE_URL", "value": dsn, "is_sensitive": true, "environment": env}));
                }
                items.push(json!({"name": format!("{prefix}_DATABASE_DSN"), "value": dsn, "is_sensitive": true, "environment": env}));
            }
            page(&w, &uri, &query, items)
        }
        (Method::GET, "apps", ["deployments"]) => {
            let env = query.get("environment").cloned().unwrap_or_default();
            let items = w.deployments.iter().rev().filter(|d| d.env == env).map(deployment_json).collect();
            page(&w, &uri, &query, items)
        }
        (Method::POST, "apps", ["deployments"]) => {
            let env = body["environment"].as_str().unwrap_or_default().to_owned();
            if !w.envs.iter().any(|(u, _)| *u == env) {
                return bad("unknown environment");
            }
            if w.deployments.iter().any(|d| d.env == env && !d.job.done) {
                return bad("a deployment is already running for this environment");
            }
            let uuid = w.id();
            w.seq += 1;
            let (mut job, seq) = (w.job(), w.seq);
            job.ends_at = job.ends_at.max(Instant::now() + w.deployment_time);
            w.deployments.push(Deployment {
                uuid: uuid.clone(),
                env,
                job,
                started_by_test: false,
                seq,
                ended_seq: None,
            });
            created(&uuid)
        }
        (Method::GET, "apps", ["deployments", uuid]) => {
            let Some(at) = w.deployments.iter().position(|d| d.uuid == *uuid) else { return not_found() };
            let was_done = w.deployments[at].job.done;
            World::tick(&mut w.deployments[at].job);
            if w.deployments[at].job.done && !was_done {
                w.seq += 1;
                let (seq, env) = (w.seq, w.deployments[at].env.clone());
                w.deployments[at].ended_seq = Some(seq);
                w.finish_deployment(&env);
            }
            answer(StatusCode::OK, deployment_json(&w.deployments[at]))
        }
        _ => not_found(),
    }
}

/// An answer written with the provider's own type, plus the fields the provider does not
/// read (`extra`, an object).
fn typed<T: serde::Serialize>(t: T, extra: Value) -> Value {
    let mut v = serde_json::to_value(t).expect("answer");
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    v
}

fn created(uuid: &str) -> Response {
    answer(StatusCode::CREATED, typed(types::Created { uuid: uuid.to_owned() }, json!({})))
}

const FINISHED_AT: &str = "2026-11-25T12:00:00Z";

fn instance_json(i: &Instance) -> Value {
    let instance = types::ServiceInstance {
        uuid: i.uuid.clone(),
        prefix: i.prefix.clone(),
        kind: i.kind.clone(),
        service_status: i.status.clone(),
        region: i.region.clone(),
        service: i.service.clone(),
    };
    typed(instance, json!({"environment": i.env}))
}

fn backup_json(uuid: &str, b: &Backup) -> Value {
    let backup = types::Backup {
        uuid: uuid.to_owned(),
        state: Some(if b.job.done { "COMPLETED" } else { "WORKING" }.into()),
        success: b.job.done.then(|| types::Success::Word("SUCCESS".into())),
        service_instance_backups: b.parts.iter().cloned().map(types::Part::Uuid).collect(),
        notes: Some(b.notes.clone()),
    };
    typed(backup, json!({}))
}

fn restore_json(uuid: &str, r: &Restore) -> Value {
    let restore = types::Restore {
        uuid: uuid.to_owned(),
        finished: r.job.done.then(|| FINISHED_AT.into()),
        success: r.job.done.then(|| types::Success::Word(if r.fails { "FAILURE" } else { "SUCCESS" }.into())),
        notes: Some(r.notes.clone()),
    };
    typed(restore, json!({"backup": r.backup}))
}

fn deployment_json(d: &Deployment) -> Value {
    let deployment = types::Deployment {
        uuid: d.uuid.clone(),
        ended_at: d.job.done.then(|| FINISHED_AT.into()),
        success: d.job.done.then_some(types::Success::Flag(true)),
    };
    typed(deployment, json!({"environment": d.env}))
}

/// One page of `items`, with an absolute `next` link while more remain.
fn page(w: &World, uri: &Uri, query: &BTreeMap<String, String>, items: Vec<Value>) -> Response {
    let size = query.get("page_size").and_then(|s| s.parse().ok()).unwrap_or(w.page_size).max(1);
    let n: usize = query.get("page").and_then(|s| s.parse().ok()).unwrap_or(1);
    let start = (n - 1) * size;
    let next = (start + size < items.len()).then(|| {
        let rest: Vec<String> = query.iter().filter(|(k, _)| *k != "page").map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}{}?{}page={}", w.base, uri.path(), rest.iter().map(|kv| format!("{kv}&")).collect::<String>(), n + 1)
    });
    let results: Vec<Value> = items.iter().skip(start).take(size).cloned().collect();
    answer(StatusCode::OK, json!({"count": items.len(), "next": next, "previous": null, "results": results}))
}

fn add_instance(w: &mut World, body: &Value) -> Response {
    let field = |k: &str| body[k].as_str().unwrap_or_default().to_owned();
    let (env, region, service, prefix) = (field("environment"), field("region"), field("service"), field("prefix"));
    if !w.envs.iter().any(|(u, _)| *u == env) || !w.regions.contains(&region) {
        return bad("unknown environment or region");
    }
    if !w.catalogue.iter().any(|(u, _, _)| *u == service) {
        return answer(StatusCode::BAD_REQUEST, json!({"service": ["not in the catalogue"]}));
    }
    if w.instances.iter().any(|i| i.env == env && i.prefix == prefix && i.kind == "DATABASE" && i.status != "REMOVED") {
        return answer(StatusCode::BAD_REQUEST, json!({"prefix": ["already in use"]}));
    }
    let uuid = w.instance(&env, &prefix, &service, "NEW");
    if let Some(i) = w.instances.iter_mut().find(|i| i.uuid == uuid) {
        i.created = true;
    }
    created(&uuid)
}

fn instance_action(w: &mut World, method: Method, uuid: &str, rest: &[&str], body: &Value) -> Response {
    let op = match (&method, rest) {
        (&Method::GET, []) => "get",
        (&Method::POST, ["provision"]) => "provision",
        (&Method::POST, ["detach"]) => "detach",
        (&Method::PATCH, []) => "rename",
        (&Method::DELETE, []) => "delete",
        _ => return not_found(),
    };
    if w.unsupported.contains(op) {
        return answer(StatusCode::METHOD_NOT_ALLOWED, json!({"detail": format!("Method \"{method}\" not allowed.")}));
    }
    let Some(at) = w.instances.iter().position(|i| i.uuid == uuid && i.status != "REMOVED") else { return not_found() };
    let status = w.instances[at].status.clone();
    match op {
        "get" => {}
        "provision" if status == "NEW" => {
            w.instances[at].status = "PROVISIONING".into();
            w.instances[at].ready_at = Some(Instant::now() + w.provisioning);
        }
        "detach" if status == "ATTACHED" => w.instances[at].status = "PENDING_DETACHMENT".into(),
        "rename" => {
            let to = body["prefix"].as_str().unwrap_or_default().to_owned();
            let env = w.instances[at].env.clone();
            if w.instances.iter().any(|i| {
                i.env == env && i.uuid != uuid && i.prefix == to && i.kind == "DATABASE" && i.status != "REMOVED"
            }) {
                return answer(StatusCode::BAD_REQUEST, json!({"prefix": ["already in use"]}));
            }
            w.instances[at].prefix = to;
        }
        "delete" if matches!(status.as_str(), "NEW" | "PROVISIONING" | "PENDING_ATTACHMENT" | "DETACHED") => {
            w.instances[at].status = "REMOVED".into();
            return (StatusCode::NO_CONTENT, "").into_response();
        }
        _ => return bad(&format!("cannot {op} an instance that is {status}")),
    }
    answer(StatusCode::OK, instance_json(&w.instances[at]))
}
