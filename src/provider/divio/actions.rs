//! The provider's actions: each asks the platform for one change (or runs one of the
//! configured commands) and says what `settle` must wait for.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};

use super::observe::instance_status;
use super::records::Fence;
use super::types::{self, answer, answers, Created, ServiceInstance, Success};
use super::{api_err, failed, status, DivioProvider, Manual, Moving, Seen, V3};
use crate::config::Verify;
use crate::model::{EnvLive, EnvName, Live, Major, Prefix, ServiceId, Status};
use crate::plan::{Action, Plan};
use crate::provider::{Backup, Provider, ProviderError, Result};

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
        self.settled(env, expected)
    }

    fn observe(&mut self) -> Result<Live> {
        self.look()
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
