//! What the rules know of a service's data that a provider cannot see: which dataset a
//! copy holds, whether it is complete, verified or still streaming. Apply writes it from
//! the rules' own predicted effects, so the bookkeeping exists once, here; the snapshot
//! the rules plan from is what the provider observed with the ledger's facts filled in
//! (`merge`).
//!
//! Crash safety: before an action, apply records for each service the weaker of what is
//! known now and what the action will make true (`weaken`), and only after the action is
//! seen done does it record the prediction (`record`). A crash between the two leaves
//! nothing claimed that the action may have undone (an unfence makes copies incomplete
//! before it runs) and nothing claimed that it may not have done (a restore's copy is
//! recorded only once it is there), so the next apply copies again rather than trust a
//! copy it cannot vouch for.
//!
//! Every provider's snapshot goes through it: what a provider records of copies for its
//! own use is not what the rules plan from.

use serde::{Deserialize, Serialize};

use crate::model::{Data, EnvLive, EnvName, Live, ServiceId};

/// The recorded data of services, per environment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(default)]
    pub entries: Vec<Entry>,
}

/// What one service holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub env: EnvName,
    pub service: ServiceId,
    pub data: Data,
}

impl Ledger {
    /// The ledger's data for every observed service: what it recorded, or, for a service
    /// it does not know, nothing unless the application can see the service (whose data
    /// the provider reads off its prefix). A copy the ledger does not vouch for holds no
    /// known data, whatever else says so.
    pub fn merge(&self, live: &mut Live) {
        for (env, services) in &mut live.environments {
            for s in &mut services.services {
                match self.entries.iter().find(|e| &e.env == env && e.service == s.id) {
                    Some(e) => s.data = Some(e.data.clone()),
                    None if !s.status.visible() => s.data = None,
                    None => {}
                }
            }
            // A service the provider saw consumed gave its data to the one that took its
            // files (the provider records that before the new server first starts): if the
            // action's own record was lost to a crash, the copy is that data, unverified.
            let taken: Vec<(ServiceId, ServiceId, Data)> = services
                .services
                .iter()
                .filter_map(|s| Some((s.id.clone(), s.consumed_by.clone()?, s.held())))
                .collect();
            for (from, by, held) in taken {
                let Some(copy) = services.services.iter_mut().find(|s| s.id == by) else { continue };
                if copy.data.as_ref().is_none_or(|d| d.restored_from.as_ref() != Some(&from)) {
                    copy.data = Some(Data { restored_from: Some(from), verified: false, streaming: false, ..held });
                }
            }
        }
    }

    /// Records the data the rules predict for `env`'s services (its other entries go).
    pub fn record(&mut self, env: &EnvName, expected: &EnvLive) {
        self.entries.retain(|e| &e.env != env);
        for s in &expected.services {
            // A consumed service's entry says what it held, which names it.
            let data = if s.consumed_by.is_some() { Some(s.held()) } else { s.effective_data() };
            if let Some(data) = data {
                self.entries.push(Entry { env: env.clone(), service: s.id.clone(), data });
            }
        }
    }

    /// Before an action that takes `env` from `before` to `after`: records for each service
    /// only what holds in both, so that a crash inside the action claims nothing it may
    /// have undone or not yet done.
    pub fn weaken(&mut self, env: &EnvName, before: &EnvLive, after: &EnvLive) {
        let mut weaker = EnvLive::default();
        for b in &before.services {
            let Some(a) = after.services.iter().find(|a| a.id == b.id) else { continue };
            // A service the action consumes holds its data until the provider records it
            // consumed (what `merge` reads), at once with the copy's taking it.
            let a = if a.consumed_by.is_some() && b.consumed_by.is_none() { b } else { a };
            let data = match (b.effective_data(), a.effective_data()) {
                (Some(b), Some(a)) if b.of == a.of && b.restored_from == a.restored_from => Some(Data {
                    of: b.of,
                    complete: b.complete && a.complete,
                    restored_from: b.restored_from,
                    verified: b.verified && a.verified,
                    // Streaming and whole are both claims: keep only what both sides make.
                    streaming: b.streaming && a.streaming,
                }),
                _ => None,
            };
            let mut s = b.clone();
            s.data = data;
            weaker.services.push(s);
        }
        self.record(env, &weaker);
    }

    /// A copy found to differ from its source (a failed verify): no longer complete.
    pub fn distrust(&mut self, env: &EnvName, service: &ServiceId) {
        for e in self.entries.iter_mut().filter(|e| &e.env == env && &e.service == service) {
            e.data.complete = false;
            e.data.verified = false;
        }
    }

    /// Drops the entries of services that no longer exist.
    pub fn prune(&mut self, live: &Live) {
        self.entries
            .retain(|e| live.environments.get(&e.env).is_some_and(|l| l.services.iter().any(|s| s.id == e.service)));
    }
}

/// Why a ledger could not be written where it is kept (the keeper's own error).
pub type SaveError = Box<dyn std::error::Error + Send + Sync>;

/// Writes a ledger where it is kept.
pub type Save = Box<dyn Fn(&Ledger) -> Result<(), SaveError>>;

/// A ledger and where it is kept: a file under root, or the state database.
pub struct Kept {
    pub ledger: Ledger,
    save: Save,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept").field("ledger", &self.ledger).finish_non_exhaustive()
    }
}

impl Kept {
    pub fn new(ledger: Ledger, save: Save) -> Kept {
        Kept { ledger, save }
    }

    /// Changes the ledger and saves it, when `change` changed it.
    pub fn update(&mut self, change: impl FnOnce(&mut Ledger)) -> Result<(), SaveError> {
        let before = self.ledger.clone();
        change(&mut self.ledger);
        if self.ledger == before {
            return Ok(());
        }
        (self.save)(&self.ledger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Major, Prefix, Service, Status};

    fn svc(id: &str, status: Status, data: Option<Data>) -> Service {
        Service {
            id: ServiceId::observed(id).expect("id"),
            version: Major::new(17).expect("major"),
            prefix: Prefix::parse("NEW").expect("prefix"),
            status,
            fenced: false,
            data,
            consumed_by: None,
        }
    }

    fn copy(complete: bool, verified: bool) -> Option<Data> {
        Some(Data {
            of: Prefix::parse("DEFAULT").expect("prefix"),
            complete,
            restored_from: Some(ServiceId::observed("old").expect("id")),
            verified,
            streaming: false,
        })
    }

    #[test]
    fn before_an_action_only_what_holds_on_both_sides_is_recorded() {
        let env = EnvName::parse("live").expect("env");
        let entry = |l: &Ledger| l.entries.first().map(|e| (e.data.complete, e.data.verified));
        let cases = [
            // A restore: nothing before, a copy after → nothing until it is seen done.
            (None, copy(true, false), None),
            // A verify: not verified before → not verified until it is seen done.
            (copy(true, false), copy(true, true), Some((true, false))),
            // An unfence: complete before, not after → incomplete before it runs.
            (copy(true, true), copy(false, true), Some((false, true))),
        ];
        for (i, (before, after, want)) in cases.into_iter().enumerate() {
            let mut ledger = Ledger::default();
            let before = EnvLive { services: vec![svc("n", Status::Provisioned, before)] };
            let after = EnvLive { services: vec![svc("n", Status::Provisioned, after)] };
            ledger.weaken(&env, &before, &after);
            assert_eq!(entry(&ledger), want, "case {i}");
            ledger.record(&env, &after);
            assert!(ledger.entries.len() == 1, "case {i}: recorded after");
        }
    }

    /// A crash between a `link` upgrade's commit (the provider's record of the source
    /// consumed) and apply's record of it: the ledger still says the source holds the
    /// data; merge gives it to the copy, which needs its verify, and the source none.
    #[test]
    fn a_consumed_source_gives_its_data_to_the_copy() {
        let env = EnvName::parse("live").expect("env");
        let id = |s: &str| ServiceId::observed(s).expect("id");
        let mut old = svc("old", Status::Attached, None);
        old.prefix = Prefix::parse("DEFAULT").expect("prefix");
        old.fenced = true;
        let new = svc("new", Status::Provisioned, None);
        let before = EnvLive { services: vec![old.clone(), new.clone()] };
        let mut consumed = old.clone();
        consumed.consumed_by = Some(id("new"));
        let mut copied = new.clone();
        copied.data = copy(true, false).map(|d| Data { restored_from: Some(id("old")), ..d });
        let after = EnvLive { services: vec![consumed.clone(), copied] };
        let mut ledger = Ledger::default();
        ledger.weaken(&env, &before, &after);
        let held = |l: &Ledger, s: &str| l.entries.iter().find(|e| e.service.as_str() == s).map(|e| e.data.clone());
        assert!(held(&ledger, "old").is_some_and(|d| d.of.as_str() == "DEFAULT" && d.complete), "{ledger:?}");
        assert_eq!(held(&ledger, "new"), None);
        for recorded in [false, true] {
            if recorded {
                ledger.record(&env, &after);
            }
            let mut live = Live::empty();
            live.environments.insert(env.clone(), EnvLive { services: vec![consumed.clone(), new.clone()] });
            ledger.merge(&mut live);
            let s = &live.environments[&env].services;
            assert_eq!(s[0].effective_data(), None, "recorded: {recorded}");
            let d = s[1].data.clone().expect("the copy holds the data");
            assert_eq!((d.of.as_str(), d.complete, d.verified), ("DEFAULT", true, false), "recorded: {recorded}");
            assert_eq!(d.restored_from, Some(id("old")));
        }
    }

    #[test]
    fn merge_fills_in_what_it_knows_and_prune_drops_the_gone() {
        let env = EnvName::parse("live").expect("env");
        let mut ledger = Ledger::default();
        ledger.record(&env, &EnvLive { services: vec![svc("n", Status::Provisioned, copy(true, true))] });
        let mut live = Live::empty();
        live.environments.insert(
            env.clone(),
            EnvLive {
                services: vec![
                    svc("n", Status::Provisioned, None),
                    svc("x", Status::Provisioned, copy(true, true)),
                    svc("v", Status::Attached, copy(true, false)),
                ],
            },
        );
        ledger.merge(&mut live);
        let services = &live.environments[&env].services;
        assert_eq!(services[0].data, copy(true, true));
        assert_eq!(services[1].data, None, "a copy the ledger does not vouch for holds no known data");
        assert_eq!(services[2].data, copy(true, false), "what the application sees is as observed");
        live.environments.insert(env.clone(), EnvLive::default());
        ledger.prune(&live);
        assert!(ledger.entries.is_empty());
    }
}
