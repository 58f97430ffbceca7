//! Plans: the public plan format (format 1), and planning every environment of a config
//! against a live snapshot. Pure: no I/O.

mod action;
pub mod rules;
pub mod search;

pub use action::{Action, Risk};

use serde::{Deserialize, Serialize};

use crate::config::{Config, DesiredEnv};
use crate::model::{EnvLive, EnvName, Live, Major, Prefix, ServiceId, Status, FORMAT_VERSION};
use rules::{Ctx, Id, Op, State};
use search::Answer;

/// The plan of one environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvPlan {
    pub name: EnvName,
    pub actions: Vec<Action>,
}

/// Plan format 1: what `plan --format json` prints and `apply FILE` carries out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub format_version: u32,
    /// Digest of the snapshot this plan was made from; a stale plan is refused.
    pub observed: String,
    /// Digest of the config it was made for (`config_digest`); `apply PLAN` refuses it
    /// under another. Empty in plans of versions before it was recorded.
    #[serde(default)]
    pub config: String,
    pub environments: Vec<EnvPlan>,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        self.environments.iter().any(|e| !e.actions.is_empty())
    }
}

/// An action with what a person needs to judge it. For display only: apply never reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub reason: String,
    pub risk: Option<Risk>,
    /// The action runs while writes are blocked.
    pub in_outage: bool,
}

/// One environment's plan with its context, for the renderers.
#[derive(Clone, Debug)]
pub struct EnvReport {
    pub name: EnvName,
    pub desired: DesiredEnv,
    pub live: EnvLive,
    pub steps: Vec<Step>,
    /// Services pgconverge never touches, with a word on why.
    pub unmanaged: Vec<ServiceId>,
    /// Actions strictly inside the write outage.
    pub outage_actions: u32,
    /// The exact search finished: no valid plan is shorter. False when it ran out of
    /// budget and a quicker search found this (valid, rules-checked) plan instead.
    pub proven_shortest: bool,
}

/// Every environment planned, for the renderers and apply.
#[derive(Clone, Debug)]
pub struct Report {
    pub plan: Plan,
    pub environments: Vec<EnvReport>,
    /// Environments in the snapshot that the config does not declare: never touched.
    pub unmanaged_environments: Vec<EnvName>,
    /// Environments that would run a major an earlier one in `rollout` does not run yet.
    pub rollout_warnings: Vec<String>,
}

/// Why an environment has no plan.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `--env` named an environment the config does not declare.
    #[error("environment `{0}` is not declared in the config")]
    UnknownEnvironment(String),
    /// The snapshot is inconsistent.
    #[error("the live snapshot is invalid: {0}")]
    BadSnapshot(String),
    /// No sequence of allowed actions reaches the goal.
    #[error("environment {env}: no safe plan exists: {reason}")]
    NoPlan { env: EnvName, reason: String },
    /// A saved plan has an action the rules refuse in the state it would run in.
    #[error("environment {env}: the saved plan's action {number} is not allowed now: {reason} (checked before anything was done: nothing was touched)")]
    Refused { env: EnvName, number: usize, reason: String },
}

/// Plans the environments of `config` (all, or those named in `only`) against `live`.
pub fn plan(config: &Config, live: &Live, only: &[EnvName]) -> Result<Report, PlanError> {
    live.validate().map_err(PlanError::BadSnapshot)?;
    let desired = config.desired();
    for name in only {
        if !desired.iter().any(|d| &d.name == name) {
            return Err(PlanError::UnknownEnvironment(name.to_string()));
        }
    }
    let mut environments = Vec::new();
    for d in desired.iter().filter(|d| only.is_empty() || only.contains(&d.name)) {
        let env_live = live.environments.get(&d.name).cloned().unwrap_or_default();
        environments.push(plan_env(d, &env_live)?);
    }
    let unmanaged_environments =
        live.environments.keys().filter(|n| !desired.iter().any(|d| &d.name == *n)).cloned().collect();
    let plan = Plan {
        format_version: FORMAT_VERSION,
        observed: live.digest(),
        config: config_digest(config),
        environments: environments
            .iter()
            .map(|e| EnvPlan { name: e.name.clone(), actions: e.steps.iter().map(|s| s.action.clone()).collect() })
            .collect(),
    };
    let rollout_warnings = rollout_warnings(config, &desired, live, &environments);
    Ok(Report { plan, environments, unmanaged_environments, rollout_warnings })
}

/// Digest of a config as pgconverge reads it (comments and layout do not count).
pub fn config_digest(config: &Config) -> String {
    use sha2::Digest;
    let bytes = serde_json::to_vec(config).unwrap_or_default();
    format!("sha256:{}", crate::model::hex(&sha2::Sha256::digest(&bytes)))
}

/// The report of a saved plan, made from `live`, so that what `apply PLAN` shows is what it
/// runs: each action's reason, risk and place in the write outage come from the rules,
/// replayed from the observed state. Refused where the rules refuse an action.
pub fn report_of(config: &Config, live: &Live, saved: &Plan) -> Result<Report, PlanError> {
    live.validate().map_err(PlanError::BadSnapshot)?;
    let desired = config.desired();
    let mut environments = Vec::new();
    for env_plan in &saved.environments {
        let d = desired
            .iter()
            .find(|d| d.name == env_plan.name)
            .ok_or_else(|| PlanError::UnknownEnvironment(env_plan.name.to_string()))?;
        let refused = |number: usize, reason: String| PlanError::Refused { env: d.name.clone(), number, reason };
        let env_live = live.environments.get(&d.name).cloned().unwrap_or_default();
        let mut p = Prediction::new(d, &env_live).map_err(|r| refused(0, r))?;
        let start = p.state.clone();
        let (mut steps, mut outage_actions) = (Vec::new(), 0);
        for (i, action) in env_plan.actions.iter().enumerate() {
            let refused = |r: String| refused(i + 1, r);
            let op = p.op_of(action).map_err(refused)?;
            let before = p.state.clone();
            p.advance(action, action.stand_in()).map_err(refused)?;
            let inside = search::step_outage(&p.ctx, &before, &p.state) == 1;
            outage_actions += u32::from(inside);
            steps.push(Step {
                action: action.clone(),
                reason: reason(&p.ctx, &before, &op),
                risk: p.ctx.risk(&op),
                in_outage: inside,
            });
        }
        let unmanaged = start.svcs.iter().filter(|s| p.ctx.unmanaged(s)).map(|s| p.ctx.id(s.id)).collect();
        environments.push(EnvReport {
            name: d.name.clone(),
            desired: d.clone(),
            live: env_live,
            steps,
            unmanaged,
            outage_actions,
            // Whether it was the shortest was said when it was made; not known here.
            proven_shortest: true,
        });
    }
    let unmanaged_environments =
        live.environments.keys().filter(|n| !desired.iter().any(|d| &d.name == *n)).cloned().collect();
    let rollout_warnings = rollout_warnings(config, &desired, live, &environments);
    Ok(Report { plan: saved.clone(), environments, unmanaged_environments, rollout_warnings })
}

/// An environment that would move a prefix to a major that an environment before it in
/// `rollout` declares the prefix in but does not run yet skips the promotion the rollout
/// exists for: an upgrade should reach `live` only after it ran in `test`.
fn rollout_warnings(config: &Config, desired: &[DesiredEnv], live: &Live, planned: &[EnvReport]) -> Vec<String> {
    let runs = |env: &EnvName, prefix: &Prefix, major: Major| {
        live.environments
            .get(env)
            .is_some_and(|e| e.services.iter().any(|s| s.status.visible() && &s.prefix == prefix && s.version == major))
    };
    let mut out = Vec::new();
    for (k, later) in config.rollout.iter().enumerate() {
        let Some(report) = planned.iter().find(|r| &r.name == later && !r.steps.is_empty()) else { continue };
        for (prefix, major) in &report.desired.postgres {
            if runs(later, prefix, *major) {
                continue;
            }
            for earlier in &config.rollout[..k] {
                let declares =
                    desired.iter().any(|d| &d.name == earlier && d.postgres.iter().any(|(p, _)| p == prefix));
                if declares && !runs(earlier, prefix, *major) {
                    out.push(format!(
                        "`{later}` would run {prefix} on PostgreSQL {major}, which `{earlier}` (earlier in `rollout`) does not run yet: promote through `{earlier}` first"
                    ));
                    break;
                }
            }
        }
    }
    // With a pooler the fence pauses the application's queries, which wait through the
    // whole outage: where the copy itself runs inside it, they wait for the copy.
    if config.provider.local.as_ref().is_some_and(|l| l.pooler.is_some()) {
        for report in planned {
            let copies_inside = report.steps.iter().any(|s| {
                s.in_outage
                    && matches!(s.action, Action::Backup { .. } | Action::Restore { .. } | Action::Upgrade { .. })
            });
            if copies_inside {
                out.push(format!(
                    "`{}`: the pooler holds the application's queries through the whole write outage, the copy included \
                     (strategy {}); once the pause has lasted upgrade.max_pause_seconds ({} s) apply gives it up, \
                     unfencing, so only a copy that fits in it can finish: `strategy: logical` keeps the copy out of \
                     the pause",
                    report.name,
                    report.desired.upgrade.strategy.as_str(),
                    report.desired.upgrade.max_pause_seconds
                ));
            }
        }
    }
    out
}

/// Plans one environment.
pub fn plan_env(desired: &DesiredEnv, live: &EnvLive) -> Result<EnvReport, PlanError> {
    let no_plan = |reason: String| PlanError::NoPlan { env: desired.name.clone(), reason };
    let (ctx, start) = Ctx::new(desired, live).map_err(no_plan)?;
    if let Some(reason) = obstacle(&ctx, &start) {
        return Err(no_plan(reason));
    }
    let unreachable = || {
        no_plan(
            "no sequence of the allowed actions reaches the declared state from the observed one; \
             see `pgconverge show` for what is there"
                .into(),
        )
    };
    let (ops, proven_shortest) = match search::plan(&ctx, &start) {
        Answer::Shortest(ops) => (ops, true),
        Answer::Valid(ops) => (ops, false),
        Answer::Unreachable => return Err(unreachable()),
        Answer::GaveUp { expanded } => {
            return Err(no_plan(format!(
                "the search gave up after {expanded} states without finding a plan or proving that none \
                 exists; leftovers of earlier upgrades usually cause this: see `pgconverge show`, delete the \
                 copies nobody needs by hand or declare fewer prefixes at once, then plan again"
            )))
        }
    };
    let mut steps = Vec::new();
    let mut st = start.clone();
    let mut outage_actions = 0;
    for op in &ops {
        let next = ctx.effect(&st, op);
        let inside = search::step_outage(&ctx, &st, &next) == 1;
        outage_actions += u32::from(inside);
        steps.push(Step {
            action: to_action(&ctx, op),
            reason: reason(&ctx, &st, op),
            risk: ctx.risk(op),
            in_outage: inside,
        });
        st = next;
    }
    let unmanaged = start.svcs.iter().filter(|s| ctx.unmanaged(s)).map(|s| ctx.id(s.id)).collect();
    Ok(EnvReport {
        name: desired.name.clone(),
        desired: desired.clone(),
        live: live.clone(),
        steps,
        unmanaged,
        outage_actions,
        proven_shortest,
    })
}

/// Known reasons no plan can exist, found before searching so the user hears the cause
/// rather than "no plan".
fn obstacle(ctx: &Ctx, st: &State) -> Option<String> {
    if let Some(s) = search::stranded(ctx, st).and_then(|id| st.svcs.iter().find(|s| s.id == id)) {
        let of = s.data.map(|d| ctx.prefixes[d.of as usize].to_string()).unwrap_or_default();
        return Some(format!(
            "{} ({}) holds data of {of}, which the config does not declare, and pgconverge would have to drop it; \
             declare {of}, or record which dataset it holds in the snapshot",
            ctx.id(s.id),
            ctx.prefixes[s.prefix as usize]
        ));
    }
    let ids = |ids: &[Id]| ids.iter().map(|&i| ctx.id(i).to_string()).collect::<Vec<_>>().join(", ");
    if let Some((s, writers)) = search::spoiled(ctx, st) {
        return Some(format!(
            "{} holds data the config does not declare, which pgconverge would have to drop; but {} hold it too, \
             are not managed by pgconverge and will all take writes from the next deploy on, so no copy can ever \
             be proven complete enough to drop {} against; delete or detach all but one of them by hand, or \
             declare the data, then plan again",
            ctx.id(s),
            ids(&writers),
            ctx.id(s)
        ));
    }
    if let Some((p, waiting)) = search::split_at_deploy(ctx, st) {
        let name = &ctx.prefixes[p as usize];
        return Some(format!(
            "{} all hold {name} and are not attached yet, and no attached service holds it: the next deploy \
             attaches them all, and from then on each takes writes the others miss, so no copy of {name} can \
             be proven complete again; delete all but the one you trust by hand, then plan again",
            ids(&waiting)
        ));
    }
    if let Some((p, id)) = search::jammed(ctx, st) {
        let name = &ctx.prefixes[p as usize];
        return Some(format!(
            "{} under {name} is pending detachment: the next deploy hides it, and every deploy must show {name}'s \
             data under {name}; it cannot be renamed out of the way first, since each prefix it could take holds \
             a service pending detachment too; run the deploy by hand to finish the detachments (the \
             application loses {name} until the next apply), then plan again",
            ctx.id(id)
        ));
    }
    if let Some(id) = search::fenced_for_good(ctx, st).filter(|_| !ctx.is_goal(st)) {
        return Some(format!(
            "{} is attached and fenced, and pgconverge does not manage it: no deploy may leave a fenced service \
             visible, and pgconverge never touches it; lift its fence by hand (or declare its prefix), then plan again",
            ctx.id(id)
        ));
    }
    for &(p, v) in &ctx.declared {
        let name = &ctx.prefixes[p as usize];
        let holders: Vec<_> = st.svcs.iter().filter(|s| s.data.is_some_and(|d| d.of == p)).collect();
        if search::only_incomplete(ctx, st, p) {
            let ids: Vec<String> = holders.iter().map(|s| ctx.id(s.id).to_string()).collect();
            return Some(format!(
                "every copy of {name} ({}) is incomplete: each was taken while another took the application's writes, \
                 and none is the one copy the application uses; decide which holds the data, leave it as the only \
                 attached service holding {name}, then plan again",
                ids.join(", ")
            ));
        }
        if let Some(oldest) = search::too_new(ctx, st, p, v) {
            return Some(format!(
                "{name} is declared as PostgreSQL {v}, but every usable copy of its data is on PostgreSQL {oldest} \
                 or newer (a copy that missed writes and can never be attached again is no source); \
                 a downgrade needs `upgrade.allow_downgrade: true` and a dump that the older server can read"
            ));
        }
        if !ctx.allow_downgrade {
            if let Some(s) = holders.iter().find(|s| s.visible() && s.version > v) {
                return Some(format!(
                    "{name} is declared as PostgreSQL {v}, but its data is on {} ({}); \
                     a downgrade needs `upgrade.allow_downgrade: true` and a dump that the older server can read",
                    s.version,
                    ctx.id(s.id)
                ));
            }
        }
    }
    None
}

/// An op of the rules in the plan format's names.
fn to_action(ctx: &Ctx, op: &Op) -> Action {
    let named: Result<Action, std::convert::Infallible> = op.try_map(
        |i| Ok(ctx.id(*i)),
        |p| Ok(ctx.prefixes[*p as usize].clone()),
        |v| Ok(Major::new(*v).unwrap_or_else(|_| unreachable!("declared versions are positive"))),
    );
    named.unwrap_or_else(|e| match e {})
}

/// One line in the runbook's words on why the action is there.
fn reason(ctx: &Ctx, st: &State, op: &Op) -> String {
    let svc = |i: Id| st.svcs.iter().find(|s| s.id == i);
    let pre = |p: u8| ctx.prefixes[p as usize].as_str().to_owned();
    let dataset = |i: Id| svc(i).and_then(|s| s.data).map(|d| pre(d.of)).unwrap_or_else(|| "its".into());
    let version = |i: Id| svc(i).map(|s| s.version).unwrap_or_default();
    match *op {
        Op::Add { prefix, version, .. } => match ctx.roles[prefix as usize] {
            rules::Role::Declared(_) => format!("{} is declared as PostgreSQL {version}", pre(prefix)),
            _ => "the new server, under a temporary prefix until the copy is ready".to_owned(),
        },
        Op::Provision { .. } if ctx.logical => "create the server that the data will stream into".to_owned(),
        Op::Provision { .. } if ctx.pg_upgrade => "create the empty server that pg_upgrade will fill".to_owned(),
        Op::Provision { .. } => "create the server so that the backup can be restored into it".to_owned(),
        Op::Fence { service: i } if ctx.logical => {
            format!("block writes to {} {} so that the copy can catch up with every commit", dataset(i), version(i))
        }
        Op::Fence { service: i } if ctx.pg_upgrade => {
            format!("block writes to {} {} so that the upgrade misses no committed write", dataset(i), version(i))
        }
        Op::Fence { service: i } => {
            format!("block writes to {} {} so that the backup misses no committed write", dataset(i), version(i))
        }
        Op::Unfence { service: i } => format!("let the application write to {} {} again", dataset(i), version(i)),
        Op::Backup { service: i } => format!("back up {}'s data from PostgreSQL {}", dataset(i), version(i)),
        Op::Restore { service, from } => {
            format!("copy {}'s data into PostgreSQL {}", dataset(from), version(service))
        }
        Op::Replicate { service, from } => format!(
            "copy {}'s data into PostgreSQL {} while the application keeps writing; changes stream until the catch-up",
            dataset(from),
            version(service)
        ),
        Op::CatchUp { .. } => "wait until the copy holds every committed change, then end the replication".to_owned(),
        Op::Upgrade { service, from } => format!(
            "upgrade {}'s data directory into PostgreSQL {} with pg_upgrade, {}",
            dataset(from),
            version(service),
            if ctx.consumes {
                "its files linked: the old server can never start again"
            } else {
                "the old server stopped meanwhile"
            }
        ),
        Op::Verify { .. } => {
            format!("compare the copy with its source ({}) before anything depends on it", ctx.verify.as_str())
        }
        Op::Rename { service, to } => match ctx.roles[to as usize] {
            rules::Role::Retired(_) => "retire the old server: its replacement is ready".to_owned(),
            rules::Role::Declared(_) if svc(service).is_some_and(|s| !s.visible()) => {
                format!("the copy takes over {} at the next deploy", pre(to))
            }
            _ => format!("move it under {}", pre(to)),
        },
        Op::Detach { .. } => "the application stops seeing it at the next deploy".to_owned(),
        Op::Deploy => {
            let attach: Vec<String> = st
                .svcs
                .iter()
                .filter(|s| matches!(s.status, Status::New | Status::Provisioned))
                .map(|s| format!("{} {}", pre(s.prefix), s.version))
                .collect();
            if attach.is_empty() {
                "the application stops seeing the detached servers".to_owned()
            } else {
                format!("the application switches to {}", attach.join(", "))
            }
        }
        Op::Delete { service: i } => match svc(i).map(|s| (s.data, s.consumed)) {
            Some((Some(d), _)) => format!("no longer needed: {}'s data lives on in the attached copy", pre(d.of)),
            Some((None, Some((_, by)))) => format!("no longer needed: its files are {}'s now", ctx.id(by)),
            _ => "no longer needed: it holds no data".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests;

/// Follows a plan's actions through the rules while apply carries them out: checks each
/// one against the state the plan predicts, and says what the provider should then show.
/// Added services (`+n`) are bound to the ids the provider gave them.
#[derive(Clone, Debug)]
pub struct Prediction {
    ctx: Ctx,
    state: State,
    added: Vec<ServiceId>,
}

impl Prediction {
    /// Starts from the observed services of an environment.
    pub fn new(desired: &DesiredEnv, live: &EnvLive) -> Result<Self, String> {
        let (ctx, state) = Ctx::new(desired, live)?;
        Ok(Self { ctx, state, added: Vec::new() })
    }

    /// The real id of a service named in the plan.
    pub fn resolve(&self, id: &ServiceId) -> Result<ServiceId, String> {
        match id.added_number() {
            Some(n) => {
                self.added.get(n as usize - 1).cloned().ok_or_else(|| format!("{id} is used before the plan adds it"))
            }
            None => Ok(id.clone()),
        }
    }

    fn op_of(&self, action: &Action) -> Result<Op, String> {
        let id = |s: &ServiceId| -> Result<Id, String> {
            if let Some(n) = s.added_number() {
                return u16::try_from(n).map(Id::Added).map_err(|_| format!("{s} is out of range"));
            }
            self.ctx
                .observed
                .iter()
                .position(|o| o == s)
                .map(|i| Id::Observed(i as u16))
                .ok_or_else(|| format!("no service {s} in this environment"))
        };
        let prefix = |p: &Prefix| -> Result<u8, String> {
            self.ctx
                .prefixes
                .iter()
                .position(|q| q == p)
                .map(|i| i as u8)
                .ok_or_else(|| format!("prefix {p} means nothing in this environment"))
        };
        if let Action::Add { service, .. } = action {
            if service.added_number() != Some(u32::from(self.state.adds) + 1) {
                return Err(format!("the next service added here is +{}, not {service}", self.state.adds + 1));
            }
        }
        action.try_map(id, prefix, |v| Ok(v.get()))
    }

    /// Refuses an action the rules do not allow in the predicted state.
    pub fn check(&self, action: &Action) -> Result<(), String> {
        let op = self.op_of(action)?;
        self.ctx.check(&self.state, &op).map_err(|r| r.0)
    }

    /// Records that `action` was carried out (`new_id`: the id the provider gave an
    /// added service) and returns the services the provider should now show.
    pub fn advance(&mut self, action: &Action, new_id: Option<ServiceId>) -> Result<EnvLive, String> {
        let op = self.op_of(action)?;
        self.ctx.check(&self.state, &op).map_err(|r| r.0)?;
        self.state = self.ctx.effect(&self.state, &op);
        if let Op::Add { .. } = op {
            self.added.push(new_id.ok_or("the provider gave the added service no id")?);
        }
        Ok(self.expected())
    }

    /// The application cannot write: a service it sees is fenced.
    pub fn writes_blocked(&self) -> bool {
        self.ctx.in_outage(&self.state)
    }

    /// The services as the rules predict them, in snapshot form.
    pub fn expected(&self) -> EnvLive {
        let id = |i: Id| match i {
            Id::Added(n) => self.added.get(usize::from(n) - 1).cloned().unwrap_or_else(ServiceId::gone),
            obs => self.ctx.id(obs),
        };
        let prefix = |p: u8| self.ctx.prefixes[p as usize].clone();
        let services = self
            .state
            .svcs
            .iter()
            .map(|s| crate::model::Service {
                id: id(s.id),
                version: Major::new(s.version).unwrap_or_else(|_| unreachable!("versions are positive")),
                prefix: prefix(s.prefix),
                status: s.status,
                fenced: s.fenced,
                data: s
                    .data
                    .map(|d| crate::model::Data {
                        of: prefix(d.of),
                        complete: d.complete,
                        restored_from: d.restored_from.map(id),
                        verified: d.verified,
                        streaming: d.streaming,
                    })
                    .or(s.consumed.map(|(of, _)| crate::model::Data {
                        of: prefix(of),
                        complete: false,
                        restored_from: None,
                        verified: false,
                        streaming: false,
                    })),
                consumed_by: s.consumed.map(|(_, by)| id(by)),
            })
            .collect();
        EnvLive { services }
    }
}

/// How two snapshots of an environment differ, one line per service; empty when the rules
/// read them the same way.
pub fn differences(expected: &EnvLive, observed: &EnvLive) -> Vec<String> {
    let norm = |e: &EnvLive| {
        // Staleness is the rules' reading of what providers record.
        let e = &e.settled();
        let mut v: Vec<crate::model::Service> = e
            .services
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.data = s.effective_data();
                // The source of an old copy may be long gone: its name does not matter.
                if let Some(d) = s.data.as_mut() {
                    if d.restored_from.as_ref().is_some_and(|r| !e.services.iter().any(|o| &o.id == r)) {
                        d.restored_from = Some(ServiceId::gone());
                    }
                }
                s
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    let (a, b) = (norm(expected), norm(observed));
    let show = |s: &crate::model::Service| serde_json::to_string(s).unwrap_or_default();
    let mut out = Vec::new();
    for s in &a {
        match b.iter().find(|o| o.id == s.id) {
            None => out.push(format!("{} is missing (expected {})", s.id, show(s))),
            Some(o) if o != s => out.push(format!("{}: expected {}, found {}", s.id, show(s), show(o))),
            Some(_) => {}
        }
    }
    for o in b.iter().filter(|o| !a.iter().any(|s| s.id == o.id)) {
        out.push(format!("{} is there but was not expected: {}", o.id, show(o)));
    }
    out
}
