//! The action rules, in one place: what each op requires and what it does, on a compact
//! state the search can hash cheaply. Nothing else in the crate decides whether an action
//! is allowed. `docs/rules.md` states them in words.
//!
//! Refinements of the founding table (`docs/rules.md`), each on the side of never losing data:
//! - restore, like delete, may not drop the last copy of a dataset: restoring over a
//!   service's data needs another visible copy of that data;
//! - verify needs a complete copy: a copy taken while its source still took writes can
//!   only differ from it, so "verified" would be a lie;
//! - deploy may attach a service with no data only under a declared prefix P, and only
//!   while dataset P exists nowhere: otherwise it would present an empty database as P's
//!   data, or create a dataset under a temporary name that could never be removed;
//! - staleness: a copy of dataset P (a service's data or a backup) is complete only while
//!   no other service holding P takes the application's writes (visible and unfenced),
//!   and the application's only visible holder of P is complete whatever its record
//!   says: it is the dataset. `settle` applies this after every op and to the observed state
//!   (`model::staleness`), so a retired original is stale from the deploy that put its
//!   copy in use, and never a copy source (backup and replicate refuse a stale source);
//! - completeness of a copy is decided by how it was made (was its source quiet from
//!   the backup to the restore, or fenced at the catch-up), never by a flag the source's
//!   own record carries from an earlier copy.

use crate::config::{DesiredEnv, Verify};
use crate::model::{staleness, EnvLive, Holding, Prefix, ServiceId, Status};

/// Index into `Ctx::prefixes`.
pub type P = u8;

/// The source of a copy whose source no longer exists.
pub const GONE: Id = Id::Observed(u16::MAX);

/// A service: observed (index into `Ctx::observed`) or added by the plan (`+n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Id {
    Observed(u16),
    Added(u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataS {
    pub of: P,
    pub complete: bool,
    pub restored_from: Option<Id>,
    pub verified: bool,
    /// Still arriving from `restored_from` by logical replication.
    pub streaming: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backup {
    pub of: P,
    pub complete: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Svc {
    pub id: Id,
    pub version: u32,
    pub prefix: P,
    pub status: Status,
    pub fenced: bool,
    /// Effective data: a visible service always holds data, but for an empty one under a
    /// temporary prefix.
    pub data: Option<DataS>,
    /// The latest backup taken of this service in this plan (snapshots list none).
    pub backup: Option<Backup>,
    /// Its files became another service's (pg_upgrade's `link`): the dataset it held and
    /// the service that holds it now. It holds nothing, stays fenced and can only leave.
    pub consumed: Option<(P, Id)>,
}

impl DataS {
    /// The data of a copy of dataset `of` made from `from`.
    pub fn copy(of: P, complete: bool, from: Id, streaming: bool) -> DataS {
        DataS { of, complete, restored_from: Some(from), verified: false, streaming }
    }
}

impl Svc {
    /// The `n`th service a plan adds: status new, no data.
    pub fn added(n: u16, prefix: P, version: u32) -> Self {
        Svc {
            id: Id::Added(n),
            version,
            prefix,
            status: Status::New,
            fenced: false,
            data: None,
            backup: None,
            consumed: None,
        }
    }

    pub fn visible(&self) -> bool {
        self.status.visible()
    }
}

/// One environment's services as the rules see them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    pub svcs: Vec<Svc>,
    /// How many services this plan has added so far (the next is `+(adds+1)`).
    pub adds: u16,
}

/// An action on the compact state: services by `Id`, prefixes by index, versions as
/// numbers. An add names the service it makes `Id::Added(adds + 1)`.
pub type Op = super::Action<Id, P, u32>;

/// What a prefix means in this environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Declared in the config, with its declared version.
    Declared(u32),
    /// The new service of an upgrade of the bound prefix (`NEW`, `NEW_P`).
    Temporary(Option<P>),
    /// The old service of an upgrade of the bound prefix (`OLD`, `OLD_P`).
    Retired(Option<P>),
    /// Anything else: services under it are pgconverge's only if they hold declared data.
    Other,
}

/// Everything about an environment that does not change while planning.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub prefixes: Vec<Prefix>,
    pub roles: Vec<Role>,
    /// Declared prefixes in file order, with versions.
    pub declared: Vec<(P, u32)>,
    /// The temporary and retired prefix the planner uses for each declared prefix.
    pub temp_of: Vec<(P, P)>,
    /// With keep_old, the further retired prefixes (`<retired>_<major>`) an upgrade may
    /// retire under when an earlier kept original holds the retired prefix, each with the
    /// one major it may hold.
    pub kept: Vec<(P, u32)>,
    pub observed: Vec<ServiceId>,
    pub fence_writes: bool,
    pub verify: Verify,
    pub logical: bool,
    /// Copies are made by `upgrade` (pg_upgrade), one action, with the source quiet.
    pub pg_upgrade: bool,
    /// The upgrade consumes its source (`transfer: link`): the copy takes its files.
    pub consumes: bool,
    pub keep_old: bool,
    pub allow_downgrade: bool,
    /// What the search aims for; the rules themselves never read it.
    pub goal: Goal,
}

/// The state a search aims for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// The goal (`docs/rules.md`): every declared prefix held at its declared version.
    Declared,
    /// The same, whatever the versions: each declared dataset attached under its own
    /// prefix and nothing else left to tidy. A waypoint for the fallback search
    /// (`search::by_waypoint`), from which the upgrades themselves are the runbook's.
    Tidy,
}

/// Why the rules refuse an op.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(msg.into()))
}

impl Ctx {
    /// Builds the context and the starting state of `desired` against what was observed.
    pub fn new(desired: &DesiredEnv, live: &EnvLive) -> Result<(Ctx, State), String> {
        let up = &desired.upgrade;
        let mut prefixes: Vec<Prefix> = Vec::new();
        let mut intern = |p: &Prefix| -> Result<P, String> {
            if let Some(i) = prefixes.iter().position(|q| q == p) {
                return Ok(i as P);
            }
            if prefixes.len() >= usize::from(P::MAX) {
                return Err("too many distinct prefixes in one environment (at most 255)".into());
            }
            prefixes.push(p.clone());
            Ok((prefixes.len() - 1) as P)
        };
        let mut declared = Vec::new();
        for (p, v) in &desired.postgres {
            declared.push((intern(p)?, v.get()));
        }
        let declared_version = |p: &Prefix| desired.postgres.iter().find(|(q, _)| q == p).map(|(_, v)| v.get());

        // A prefix migrates when a service under it, or a visible service holding its
        // dataset, runs another version than the declared one.
        let mut migrating = Vec::new();
        for (p, v) in &desired.postgres {
            let migrates = live.services.iter().any(|s| {
                let holds = s.effective_data().is_some_and(|d| &d.of == p);
                (&s.prefix == p || (s.status.visible() && holds)) && s.version.get() != v.get()
            });
            if migrates {
                migrating.push(intern(p)?);
            }
        }
        let single = (migrating.len() == 1).then(|| migrating[0]);

        let joined = |base: &Prefix, p: &Prefix| Prefix::parse(&format!("{base}_{p}"));
        let mut temp_of = Vec::new();
        let mut retired_names = Vec::new();
        for (p, _) in &desired.postgres {
            let pi = intern(p)?;
            let (t, r) = if single == Some(pi) {
                (up.temporary_prefix.clone(), up.retired_prefix.clone())
            } else {
                (joined(&up.temporary_prefix, p)?, joined(&up.retired_prefix, p)?)
            };
            temp_of.push((intern(&t)?, intern(&r)?));
            retired_names.push(r);
        }
        // With keep_old, a retired original kept by an earlier upgrade may hold the
        // retired prefix: the next one retires under `<retired>_<major>` instead.
        let mut kept = Vec::new();
        if up.keep_old {
            let mut versions: Vec<u32> = live.services.iter().map(|s| s.version.get()).collect();
            versions.sort_unstable();
            versions.dedup();
            for ((p, _), retired) in desired.postgres.iter().zip(&retired_names) {
                for v in &versions {
                    let name = Prefix::parse(&format!("{retired}_{v}"))?;
                    kept.push((intern(&name)?, intern(p)?, *v));
                }
            }
        }
        let mut observed = Vec::new();
        let mut svcs = Vec::new();
        // A temporary prefix holds a copy being made, never data of its own: an empty
        // service attached under one (a deploy someone made between a provision and its
        // restore) holds no dataset. (Under a retired prefix the same record may be an
        // original whose data record is missing: that stays a dataset.)
        let scaffolding = |p: &Prefix| {
            *p == up.temporary_prefix
                || desired.postgres.iter().any(|(q, _)| joined(&up.temporary_prefix, q).as_ref() == Ok(p))
        };
        for (i, s) in live.services.iter().enumerate() {
            observed.push(s.id.clone());
            let data = match s.effective_data() {
                Some(d) if d.of == s.prefix && d.restored_from.is_none() && scaffolding(&s.prefix) => None,
                Some(d) => Some(DataS {
                    of: intern(&d.of)?,
                    complete: d.complete,
                    // A copy of a service that is gone stays a copy: it still needs its
                    // verification, which can no longer happen.
                    restored_from: d.restored_from.as_ref().map(|r| {
                        live.services.iter().position(|o| &o.id == r).map_or(GONE, |j| Id::Observed(j as u16))
                    }),
                    verified: d.verified,
                    streaming: d.streaming,
                }),
                None => None,
            };
            let consumed = match &s.consumed_by {
                Some(by) => {
                    let by = live.services.iter().position(|o| &o.id == by).map_or(GONE, |j| Id::Observed(j as u16));
                    Some((intern(&s.held().of)?, by))
                }
                None => None,
            };
            svcs.push(Svc {
                id: Id::Observed(i as u16),
                version: s.version.get(),
                prefix: intern(&s.prefix)?,
                status: s.status,
                // Nothing can write to it.
                fenced: s.fenced || consumed.is_some(),
                data,
                backup: None,
                consumed,
            });
        }
        if live.services.len() > 1000 {
            return Err("more than 1000 services in one environment".into());
        }
        let roles = prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if let Some(v) = declared_version(p) {
                    return Role::Declared(v);
                }
                if let Some(&(_, q, _)) = kept.iter().find(|(k, _, _)| usize::from(*k) == i) {
                    return Role::Retired(Some(q));
                }
                if *p == up.temporary_prefix {
                    return Role::Temporary(single);
                }
                if *p == up.retired_prefix {
                    return Role::Retired(single);
                }
                for (q, _) in &desired.postgres {
                    let qi = prefixes.iter().position(|x| x == q).map(|i| i as P);
                    if joined(&up.temporary_prefix, q).as_ref() == Ok(p) {
                        return Role::Temporary(qi);
                    }
                    if joined(&up.retired_prefix, q).as_ref() == Ok(p) {
                        return Role::Retired(qi);
                    }
                }
                Role::Other
            })
            .collect();
        let ctx = Ctx {
            prefixes,
            roles,
            declared,
            temp_of,
            kept: kept.into_iter().map(|(k, _, v)| (k, v)).collect(),
            observed,
            fence_writes: up.fence_writes,
            verify: up.verify,
            logical: up.strategy == crate::config::Strategy::Logical,
            pg_upgrade: up.strategy == crate::config::Strategy::PgUpgrade,
            consumes: up.strategy == crate::config::Strategy::PgUpgrade && up.transfer.consumes(),
            keep_old: up.keep_old,
            allow_downgrade: up.allow_downgrade,
            goal: Goal::Declared,
        };
        let mut st = State { svcs, adds: 0 };
        ctx.settle(&mut st);
        Ok((ctx, st))
    }

    pub fn declared_version(&self, p: P) -> Option<u32> {
        match self.roles[p as usize] {
            Role::Declared(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_declared(&self, p: P) -> bool {
        self.declared_version(p).is_some()
    }

    /// A service of version `version` may end as the holder of a prefix declared at `v`.
    pub fn goal_version(&self, version: u32, v: u32) -> bool {
        version == v || self.goal == Goal::Tidy
    }

    /// The public id of a service.
    pub fn id(&self, id: Id) -> ServiceId {
        match id {
            Id::Observed(i) => self.observed.get(usize::from(i)).cloned().unwrap_or_else(ServiceId::gone),
            Id::Added(n) => ServiceId::added(u32::from(n)),
        }
    }

    /// Never touched: not under a declared, temporary or retired prefix, and not holding
    /// declared data.
    pub fn unmanaged(&self, s: &Svc) -> bool {
        self.roles[s.prefix as usize] == Role::Other && !s.data.is_some_and(|d| self.is_declared(d.of))
    }

    /// The application's own copy of a declared dataset.
    pub fn live_holder(&self, s: &Svc) -> bool {
        s.visible() && s.data.is_some_and(|d| self.is_declared(d.of))
    }

    /// With keep_old, the original kept detached under a retired prefix: one holding a
    /// declared dataset, or a detached one whose data no record knows (an original whose
    /// record was lost, or an upgrade made by hand): never deleted on a guess.
    pub fn retired_original(&self, s: &Svc) -> bool {
        matches!(self.roles[s.prefix as usize], Role::Retired(_))
            && match s.data {
                Some(d) => self.is_declared(d.of),
                None => s.status == Status::Detached && s.consumed.is_none(),
            }
    }

    /// A copy of `p` is good enough to replace or be the application's copy.
    pub fn trusted(&self, d: &DataS, p: P) -> bool {
        d.of == p && (d.complete || !self.fence_writes) && (d.verified || self.verify == Verify::None)
    }

    /// A replacement for dataset `p` is ready.
    pub fn ready(&self, st: &State, p: P) -> bool {
        st.svcs.iter().any(|s| {
            matches!(s.status, Status::New | Status::Provisioned) && s.data.is_some_and(|d| self.trusted(&d, p))
        })
    }

    /// Prefixes carry meaning (`docs/rules.md`): may `s` sit under its prefix with its data?
    pub fn prefix_meaning_holds(&self, s: &Svc) -> bool {
        // A consumed service is named for what it held.
        let of = s.data.map(|d| d.of).or(s.consumed.map(|(p, _)| p));
        match self.roles[s.prefix as usize] {
            Role::Declared(_) => of.is_none_or(|o| o == s.prefix),
            Role::Temporary(Some(p)) => of.is_none_or(|o| o == p) && Some(s.version) == self.declared_version(p),
            Role::Retired(Some(p)) => of == Some(p) && self.kept.iter().all(|&(k, v)| k != s.prefix || v == s.version),
            Role::Temporary(None) | Role::Retired(None) | Role::Other => false,
        }
    }

    /// Another visible service holds dataset `of` (complete, when fence_writes): the data
    /// of `id` may be dropped, by delete or by restoring over it.
    pub fn has_other_copy(&self, st: &State, id: Id, of: P) -> bool {
        st.svcs.iter().any(|o| {
            o.id != id && o.visible() && o.data.is_some_and(|od| od.of == of && (od.complete || !self.fence_writes))
        })
    }

    pub fn dataset_exists(&self, st: &State, p: P) -> bool {
        st.svcs.iter().any(|s| s.data.is_some_and(|d| d.of == p))
    }

    /// Applies the staleness rule (see the module text): stale copies and their backups
    /// incomplete, the application's only visible holder of each dataset complete.
    pub fn settle(&self, st: &mut State) {
        let holdings: Vec<Option<Holding<P>>> = st
            .svcs
            .iter()
            .map(|s| s.data.map(|d| Holding { of: d.of, visible: s.visible() && !d.streaming, fenced: s.fenced }))
            .collect();
        for (s, verdict) in st.svcs.iter_mut().zip(staleness(&holdings)) {
            if let (Some(complete), Some(d)) = (verdict, s.data.as_mut()) {
                d.complete = complete;
            }
            // A backup is stale once anything takes writes past it: another holder, or
            // the service itself (attached since, or unfenced).
            let writable = s.visible() && !s.fenced;
            if verdict == Some(false) || writable {
                if let Some(b) = s.backup.as_mut() {
                    b.complete = false;
                }
            }
        }
    }

    /// A copy another service has taken the application's writes past.
    pub fn stale(&self, st: &State, s: &Svc) -> bool {
        s.data.is_some_and(|d| {
            !d.complete
                && st.svcs.iter().any(|o| {
                    o.id != s.id && o.visible() && !o.fenced && o.data.is_some_and(|od| od.of == d.of && !od.streaming)
                })
        })
    }

    /// The goal (`docs/rules.md`) for one environment.
    pub fn is_goal(&self, st: &State) -> bool {
        for &(p, v) in &self.declared {
            let mut under = st.svcs.iter().filter(|s| s.prefix == p);
            let (Some(s), None) = (under.next(), under.next()) else { return false };
            if s.status != Status::Attached || !self.goal_version(s.version, v) || s.fenced {
                return false;
            }
            if self.dataset_exists(st, p) && !s.data.is_some_and(|d| self.final_data_ok(&d, p)) {
                return false;
            }
        }
        st.svcs.iter().all(|s| {
            self.is_declared(s.prefix)
                || self.unmanaged(s)
                || (self.keep_old && self.retired_original(s) && s.status == Status::Detached)
        })
    }

    /// The application's copy of `p` as the goal and deploy's safety want it.
    pub fn final_data_ok(&self, d: &DataS, p: P) -> bool {
        d.of == p
            && (d.complete || !self.fence_writes)
            && (d.verified || self.verify == Verify::None || d.restored_from.is_none())
    }

    /// Checks an op's precondition (`docs/rules.md`'s table).
    pub fn check(&self, st: &State, op: &Op) -> Result<(), Refusal> {
        let get = |id: Id| match st.svcs.iter().find(|s| s.id == id) {
            Some(s) if self.unmanaged(s) => {
                refuse(format!("{} is not managed by pgconverge and is never touched", self.id(id)))
            }
            Some(s) => Ok(s),
            None => refuse(format!("no service {} in this environment", self.id(id))),
        };
        let name = |p: P| self.prefixes[p as usize].as_str();
        match *op {
            Op::Add { service, prefix, version } => {
                if service != Id::Added(st.adds + 1) {
                    return refuse(format!("the next service added here is +{}", st.adds + 1));
                }
                if st.svcs.iter().any(|s| s.prefix == prefix) {
                    return refuse(format!("a service already holds prefix {}", name(prefix)));
                }
                if !self.prefix_meaning_holds(&Svc::added(0, prefix, version)) {
                    return refuse(format!("a version {version} service may not be added under {}", name(prefix)));
                }
                Ok(())
            }
            Op::Provision { service: id } => match get(id)?.status {
                Status::New => Ok(()),
                other => refuse(format!("{} is {}, not new", self.id(id), other.as_str())),
            },
            Op::Fence { service: id } => {
                let s = get(id)?;
                if !s.visible() || s.fenced || s.data.is_none() {
                    return refuse(format!("{} is not a visible, unfenced service holding data", self.id(id)));
                }
                Ok(())
            }
            Op::Unfence { service: id } => {
                let s = get(id)?;
                if !s.fenced {
                    return refuse(format!("{} is not fenced", self.id(id)));
                }
                if let Some((_, by)) = s.consumed {
                    return refuse(format!(
                        "{} can never serve again: its files are {}'s now",
                        self.id(id),
                        self.id(by)
                    ));
                }
                Ok(())
            }
            Op::Backup { service: id } => {
                let s = get(id)?;
                if s.status == Status::New || s.data.is_none() {
                    return refuse(format!("{} holds no data to back up", self.id(id)));
                }
                if self.stale(st, s) {
                    return refuse(format!("{} is stale: the application has written elsewhere since", self.id(id)));
                }
                Ok(())
            }
            Op::Restore { service, from } => {
                let f = get(from)?;
                let Some(b) = f.backup else {
                    return refuse(format!("no backup of {} was taken earlier in this plan", self.id(from)));
                };
                if self.logical || self.pg_upgrade {
                    return refuse("the strategy makes copies without backups");
                }
                self.check_copy(st, service, from, DataS::copy(b.of, b.complete, from, false))
            }
            Op::Replicate { service, from } => {
                if !self.logical {
                    return refuse("the strategy makes copies without replication");
                }
                let d = self.live_source(st, get(from)?, "replicate")?;
                self.check_copy(st, service, from, DataS::copy(d.of, false, from, true))
            }
            Op::Upgrade { service, from } => {
                if !self.pg_upgrade {
                    return refuse("the strategy makes copies without pg_upgrade");
                }
                let f = get(from)?;
                let d = self.live_source(st, f, "upgrade")?;
                if f.visible() && !f.fenced {
                    return refuse(format!(
                        "{} still takes writes: fence it before pg_upgrade stops it",
                        self.id(from)
                    ));
                }
                if get(service)?.version < f.version {
                    return refuse("pg_upgrade cannot move data to an older major");
                }
                self.check_copy(st, service, from, DataS::copy(d.of, d.complete, from, false))
            }
            Op::CatchUp { service: id } => {
                let s = get(id)?;
                let Some(from) = s.data.filter(|d| d.streaming).and_then(|d| d.restored_from) else {
                    return refuse(format!("{} is not streaming from anything", self.id(id)));
                };
                let f = get(from)?;
                if f.visible() && !f.fenced {
                    return refuse(format!("{} still takes writes: fence it before the catch-up", self.id(from)));
                }
                Ok(())
            }
            Op::Verify { service, against } => {
                let s = get(service)?;
                let a = get(against)?;
                if self.verify == Verify::None {
                    return refuse("verification is off (upgrade.verify: none)");
                }
                if s.data.and_then(|d| d.restored_from) != Some(against) {
                    return refuse(format!("{} was not restored from {}", self.id(service), self.id(against)));
                }
                if a.visible() && !a.fenced {
                    return refuse(format!("{} still takes writes: fence it before comparing", self.id(against)));
                }
                if !s.data.is_some_and(|d| d.complete) {
                    return refuse(format!(
                        "{} was copied while {} took writes: the two cannot match",
                        self.id(service),
                        self.id(against)
                    ));
                }
                Ok(())
            }
            Op::Rename { service, to } => {
                let s = get(service)?;
                if st.svcs.iter().any(|o| o.prefix == to) {
                    return refuse(format!("a service already holds prefix {}", name(to)));
                }
                let mut after = s.clone();
                after.prefix = to;
                if !self.prefix_meaning_holds(&after) {
                    return refuse(format!("{} may not be renamed to {}", self.id(service), name(to)));
                }
                if let Some(d) = s.data.filter(|d| self.live_holder(s) && s.prefix == d.of) {
                    if !self.ready(st, d.of) {
                        return refuse(format!("no replacement for {} is ready", name(d.of)));
                    }
                }
                Ok(())
            }
            Op::Detach { service: id } => {
                let s = get(id)?;
                if s.status != Status::Attached {
                    return refuse(format!("{} is not attached", self.id(id)));
                }
                if let Some(d) = s.data.filter(|_| self.live_holder(s)) {
                    if !self.ready(st, d.of) {
                        return refuse(format!("no replacement for {} is ready", name(d.of)));
                    }
                }
                Ok(())
            }
            Op::Deploy => {
                if let Some(s) = st.svcs.iter().find(|s| s.data.is_some_and(|d| d.streaming)) {
                    return refuse(format!("{} is still streaming its copy: catch it up first", self.id(s.id)));
                }
                for s in &st.svcs {
                    if !matches!(s.status, Status::New | Status::Provisioned) || s.data.is_some() {
                        continue;
                    }
                    if !self.is_declared(s.prefix) && !self.unmanaged(s) {
                        return refuse(format!(
                            "{} holds no data yet: under {} it would become a database nobody declared",
                            self.id(s.id),
                            name(s.prefix)
                        ));
                    }
                    if self.dataset_exists(st, s.prefix) {
                        return refuse(format!(
                            "{} would present an empty database as {}, whose data exists",
                            self.id(s.id),
                            name(s.prefix)
                        ));
                    }
                }
                // Judged before staleness settles the result: it would call whatever deploy
                // attaches complete, being the application's from then on.
                let after = self.apply(st, op);
                if let Some(s) = after.svcs.iter().find(|s| s.visible() && s.fenced) {
                    return refuse(format!("{} would be visible while fenced", self.id(s.id)));
                }
                for &(p, _) in &self.declared {
                    if !self.dataset_exists(&after, p) {
                        continue;
                    }
                    let shown = after
                        .svcs
                        .iter()
                        .any(|s| s.visible() && s.prefix == p && s.data.is_some_and(|d| self.final_data_ok(&d, p)));
                    if !shown {
                        return refuse(format!("{} would not be visible with complete, verified data", name(p)));
                    }
                }
                Ok(())
            }
            Op::Delete { service: id } => {
                let s = get(id)?;
                if !matches!(s.status, Status::New | Status::Provisioned | Status::Detached) {
                    return refuse(format!("{} is {}", self.id(id), s.status.as_str()));
                }
                if let Some(d) = s.data.filter(|d| !self.has_other_copy(st, id, d.of)) {
                    return refuse(format!("{} may hold the last copy of {}", self.id(id), name(d.of)));
                }
                if self.keep_old && self.retired_original(s) {
                    return refuse(format!("{} is the retired original, kept by upgrade.keep_old", self.id(id)));
                }
                if let Some(r) =
                    st.svcs.iter().find(|r| r.data.is_some_and(|d| d.streaming && d.restored_from == Some(id)))
                {
                    return refuse(format!("{} streams its copy from {}", self.id(r.id), self.id(id)));
                }
                Ok(())
            }
        }
    }

    /// What replicate and upgrade ask of their source, whose live data they copy: it
    /// holds declared data that is not itself still arriving, is provisioned, and is not
    /// stale.
    fn live_source(&self, st: &State, f: &Svc, verb: &str) -> Result<DataS, Refusal> {
        let Some(d) = f.data.filter(|d| self.is_declared(d.of) && !d.streaming) else {
            return refuse(format!("{} holds no declared data to {verb}", self.id(f.id)));
        };
        if f.status == Status::New {
            return refuse(format!("{} is not provisioned", self.id(f.id)));
        }
        if self.stale(st, f) {
            return refuse(format!("{} is stale: the application has written elsewhere since", self.id(f.id)));
        }
        Ok(d)
    }

    /// What restore, replicate and upgrade share: `after` would be the data of `service`, a
    /// provisioned service other than `from`, of a version no older, whose own data is
    /// not the last copy of anything, and whose prefix allows the copy.
    fn check_copy(&self, st: &State, service: Id, from: Id, after: DataS) -> Result<(), Refusal> {
        let name = |p: P| self.prefixes[p as usize].as_str();
        let (Some(s), Some(f)) = (st.svcs.iter().find(|s| s.id == service), st.svcs.iter().find(|s| s.id == from))
        else {
            return refuse(format!("no service {} in this environment", self.id(service)));
        };
        if self.unmanaged(s) {
            return refuse(format!("{} is not managed by pgconverge and is never touched", self.id(service)));
        }
        if service == from || s.status != Status::Provisioned || s.consumed.is_some() {
            return refuse(format!("{} is not a provisioned service other than the source", self.id(service)));
        }
        if s.version < f.version && !self.allow_downgrade {
            return refuse(format!(
                "copying PostgreSQL {} data into {} would downgrade it (set upgrade.allow_downgrade)",
                f.version, s.version
            ));
        }
        if s.data.is_some_and(|d| d.streaming) {
            return refuse(format!("{} is still streaming a copy", self.id(service)));
        }
        if let Some(d) = s.data.filter(|d| !self.has_other_copy(st, service, d.of)) {
            return refuse(format!("copying into {} would destroy the last copy of {}", self.id(service), name(d.of)));
        }
        let mut next = s.clone();
        next.data = Some(after);
        if !self.prefix_meaning_holds(&next) {
            return refuse(format!(
                "{} may not hold dataset {} under {}",
                self.id(service),
                name(after.of),
                name(s.prefix)
            ));
        }
        Ok(())
    }

    /// The state after `op`, settled; call `check` first.
    pub fn effect(&self, st: &State, op: &Op) -> State {
        let mut next = self.apply(st, op);
        self.settle(&mut next);
        next
    }

    /// What `op` itself changes, before staleness is settled.
    fn apply(&self, st: &State, op: &Op) -> State {
        let mut next = st.clone();
        let find = |next: &mut State, id: Id| next.svcs.iter().position(|s| s.id == id);
        match *op {
            Op::Add { prefix, version, .. } => {
                next.adds += 1;
                next.svcs.push(Svc::added(next.adds, prefix, version));
            }
            Op::Provision { service: id } => {
                if let Some(i) = find(&mut next, id) {
                    next.svcs[i].status = Status::Provisioned;
                }
            }
            Op::Fence { service: id } => {
                if let Some(i) = find(&mut next, id) {
                    next.svcs[i].fenced = true;
                }
            }
            Op::Unfence { service: id } => {
                if let Some(i) = find(&mut next, id) {
                    next.svcs[i].fenced = false;
                    if next.svcs[i].visible() {
                        // Writes can land again: nothing taken from it is complete any more.
                        if let Some(b) = next.svcs[i].backup.as_mut() {
                            b.complete = false;
                        }
                        for s in &mut next.svcs {
                            if let Some(d) = s.data.as_mut().filter(|d| d.restored_from == Some(id)) {
                                d.complete = false;
                            }
                        }
                    }
                }
            }
            Op::Backup { service: id } => {
                if let Some(i) = find(&mut next, id) {
                    let s = &mut next.svcs[i];
                    if let Some(d) = s.data {
                        let quiet = s.fenced || !s.visible();
                        s.backup = Some(Backup { of: d.of, complete: d.complete && quiet });
                    }
                }
            }
            Op::Restore { service, from } => {
                let backup = st.svcs.iter().find(|s| s.id == from).and_then(|s| s.backup);
                if let (Some(i), Some(b)) = (find(&mut next, service), backup) {
                    next.svcs[i].data = Some(DataS::copy(b.of, b.complete, from, false));
                }
            }
            Op::Replicate { service, from } => {
                let of = st.svcs.iter().find(|s| s.id == from).and_then(|s| s.data).map(|d| d.of);
                if let (Some(i), Some(of)) = (find(&mut next, service), of) {
                    next.svcs[i].data = Some(DataS::copy(of, false, from, true));
                }
            }
            Op::Upgrade { service, from } => {
                let data = st.svcs.iter().find(|s| s.id == from).and_then(|s| s.data);
                if let (Some(i), Some(d)) = (find(&mut next, service), data) {
                    next.svcs[i].data = Some(DataS::copy(d.of, d.complete, from, false));
                    if let Some(f) = next.svcs.iter_mut().find(|s| s.id == from).filter(|_| self.consumes) {
                        f.data = None;
                        f.backup = None;
                        f.fenced = true;
                        f.consumed = Some((d.of, service));
                    }
                }
            }
            Op::CatchUp { service: id } => {
                let source = |d: DataS| st.svcs.iter().find(|s| Some(s.id) == d.restored_from).and_then(|s| s.data);
                if let Some(i) = find(&mut next, id) {
                    if let Some(d) = next.svcs[i].data.as_mut() {
                        d.complete = source(*d).is_some_and(|s| s.complete);
                        d.streaming = false;
                    }
                }
            }
            Op::Verify { service, .. } => {
                if let Some(i) = find(&mut next, service) {
                    if let Some(d) = next.svcs[i].data.as_mut() {
                        d.verified = true;
                    }
                }
            }
            Op::Rename { service, to } => {
                if let Some(i) = find(&mut next, service) {
                    next.svcs[i].prefix = to;
                }
            }
            Op::Detach { service: id } => {
                if let Some(i) = find(&mut next, id) {
                    next.svcs[i].status = Status::PendingDetachment;
                }
            }
            Op::Deploy => {
                for s in &mut next.svcs {
                    match s.status {
                        Status::New | Status::Provisioned => {
                            s.status = Status::Attached;
                            if s.data.is_none() {
                                s.data = Some(DataS {
                                    of: s.prefix,
                                    complete: true,
                                    restored_from: None,
                                    verified: false,
                                    streaming: false,
                                });
                            }
                        }
                        Status::PendingDetachment => s.status = Status::Detached,
                        Status::Attached | Status::Detached => {}
                    }
                }
            }
            Op::Delete { service: id } => next.svcs.retain(|s| s.id != id),
        }
        next
    }

    /// Every op the rules allow in `st`, in a fixed order.
    pub fn successors(&self, st: &State) -> Vec<(Op, State)> {
        let mut ops = Vec::new();
        for &(p, v) in &self.declared {
            let (t, _) = self.temp_of[self.declared.iter().position(|d| d.0 == p).unwrap_or(0)];
            let service = Id::Added(st.adds + 1);
            ops.push(Op::Add { service, prefix: p, version: v });
            ops.push(Op::Add { service, prefix: t, version: v });
        }
        let mut targets: Vec<P> =
            self.declared.iter().zip(&self.temp_of).flat_map(|(&(p, _), &(t, r))| [p, t, r]).collect();
        targets.extend(self.kept.iter().map(|(k, _)| *k));
        // Grouped by kind in the runbook's order, so that among equally good plans the
        // search settles on the one that reads like the runbook.
        let managed: Vec<&Svc> = st.svcs.iter().filter(|s| !self.unmanaged(s)).collect();
        // Only candidates `check` could allow are offered to it: most refusals never need
        // to be written out (the search asks millions of times).
        let provisioned: Vec<&Svc> = managed.iter().copied().filter(|s| s.status == Status::Provisioned).collect();
        for s in managed.iter().filter(|s| s.status == Status::New) {
            ops.push(Op::Provision { service: s.id });
        }
        for s in &managed {
            if s.fenced {
                ops.push(Op::Unfence { service: s.id });
            } else if s.visible() {
                ops.push(Op::Fence { service: s.id });
            }
        }
        let holds_declared = |s: &&&Svc| s.data.is_some_and(|d| self.is_declared(d.of));
        for s in managed.iter().filter(holds_declared) {
            ops.push(Op::Backup { service: s.id });
        }
        for s in &provisioned {
            for f in st.svcs.iter().filter(|f| f.backup.is_some()) {
                ops.push(Op::Restore { service: s.id, from: f.id });
            }
        }
        for s in &provisioned {
            for f in managed.iter().filter(holds_declared) {
                ops.push(Op::Replicate { service: s.id, from: f.id });
            }
        }
        for s in &provisioned {
            for f in managed.iter().filter(holds_declared) {
                ops.push(Op::Upgrade { service: s.id, from: f.id });
            }
        }
        for s in managed.iter().filter(|s| s.data.is_some_and(|d| d.streaming)) {
            ops.push(Op::CatchUp { service: s.id });
        }
        for s in &managed {
            if let Some(from) = s.data.and_then(|d| d.restored_from).filter(|_| self.verify != Verify::None) {
                ops.push(Op::Verify { service: s.id, against: from });
            }
        }
        targets.retain(|&t| !st.svcs.iter().any(|s| s.prefix == t));
        let rename_all = |ops: &mut Vec<Op>, visible: bool| {
            for s in managed.iter().filter(|s| s.visible() == visible) {
                for &t in &targets {
                    ops.push(Op::Rename { service: s.id, to: t });
                }
            }
        };
        rename_all(&mut ops, true);
        for s in managed.iter().filter(|s| s.status == Status::Attached) {
            ops.push(Op::Detach { service: s.id });
        }
        rename_all(&mut ops, false);
        for s in managed.iter().filter(|s| matches!(s.status, Status::New | Status::Provisioned | Status::Detached)) {
            ops.push(Op::Delete { service: s.id });
        }
        ops.push(Op::Deploy);
        ops.into_iter()
            .filter(|op| self.check(st, op).is_ok())
            .map(|op| {
                let next = self.effect(st, &op);
                (op, next)
            })
            .filter(|(op, next)| !matches!(op, Op::Backup { .. }) || next != st)
            .collect()
    }

    /// What `op` risks for the application here: as its kind says, and an upgrade that
    /// consumes its source leaves no server to go back to.
    pub fn risk(&self, op: &Op) -> Option<super::Risk> {
        match op {
            Op::Upgrade { .. } if self.consumes => Some(super::Risk::ConsumesSource),
            _ => op.risk(),
        }
    }

    /// Inside the write outage: the application cannot write to a visible service.
    pub fn in_outage(&self, st: &State) -> bool {
        st.svcs.iter().any(|s| s.visible() && s.fenced)
    }
}
