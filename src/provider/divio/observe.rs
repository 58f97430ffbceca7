//! What the API shows of the application: its environments, the catalogue of each
//! region, the service instances, read into the snapshot the rules work on.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::requests::{gave_up, poll_until};
use super::types::{self, answers, ServiceInstance};
use super::{api_err, awaited, failed, is_uuid, postgres_major, status, Awaited, DivioProvider, Instance, Seen, V3};
use crate::config::DesiredEnv;
use crate::model::{Data, EnvLive, EnvName, Live, Major, Prefix, Service, ServiceId, Status, FORMAT_VERSION};
use crate::provider::{ProviderError, Result};

impl DivioProvider {
    pub(super) fn app(&mut self) -> Result<String> {
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
        self.env_order.clear();
        for e in answers::<types::Environment>(envs, "an environment")? {
            if let Ok(name) = EnvName::parse(&e.slug) {
                self.env_order.push(name.clone());
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

    pub(super) fn env_uuid(&self, env: &EnvName) -> Result<String> {
        self.env_uuids.get(env).cloned().ok_or_else(|| failed(format!("environment {env} is not known")))
    }

    /// Lists the catalogue of each region not listed yet.
    pub(super) fn list_catalogues(&mut self, regions: BTreeSet<String>) -> Result<()> {
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

    /// The dataset a visible service under a temporary or retired prefix holds, and whether
    /// the prefix is the retired one: `NEW_P` and `OLD_P` are bound to P; `NEW` and `OLD` to
    /// the one declared prefix no visible service holds under its own name (the one
    /// migrating), if there is exactly one.
    pub(super) fn bound(desired: &DesiredEnv, prefix: &Prefix, visible: &[&Prefix]) -> Option<(Prefix, bool)> {
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

    /// The prefixes of the `<PREFIX>_DATABASE_DSN` variables of each environment: names
    /// only, the values (secrets) are dropped as they arrive.
    pub(super) fn dsn_names(&self) -> Result<BTreeMap<EnvName, BTreeSet<String>>> {
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

    /// `Provider::observe`: the instances of the declared environments, read into the
    /// snapshot, with the fences of the records.
    pub(super) fn look(&mut self) -> Result<Live> {
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
                    consumed_by: None,
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

    /// `Provider::settle`: observes until what the last action moved has arrived.
    pub(super) fn settled(&mut self, env: &EnvName, expected: &EnvLive) -> Result<Live> {
        let Some(moving) = self.moving.take() else { return self.look() };
        let (wait, poll) = (self.wait, self.poll);
        let mut last = None;
        poll_until(wait, poll, || {
            let live = self.look()?;
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

/// The status of an instance as `GET …/service-instances/<uuid>/` gives it.
pub(super) fn instance_status(instance: &ServiceInstance) -> Option<Seen> {
    status(&instance.service_status)
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
}
