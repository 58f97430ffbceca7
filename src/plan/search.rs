//! Optimal search over the rules: A* on (actions, actions inside the write outage),
//! compared lexicographically, with an admissible lower bound on the actions still needed
//! and symmetry reduction over the names of added services.
//!
//! Optimality rests on `lower_bound` never overestimating; the brute-force tests at the
//! bottom check that against an exhaustive search on random small states.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use super::rules::{Ctx, DataS, Goal, Id, Op, Role, State, Svc, P};
use crate::config::Verify;
use crate::model::Status;

/// States the exact search expands before it hands over to the fallbacks: about half a
/// second on the 2-core machine of the benchmarks, several times what the runbook with
/// five prefixes migrating at once needs. A count rather than a time, so that the same
/// state gives the same plan on every machine.
pub const EXACT_BUDGET: usize = 15_000;

/// States each fallback search may expand (`by_waypoint`: each leg).
pub const FALLBACK_BUDGET: usize = 5_000;

/// The cost of a plan: its length, then how many actions run inside the write outage.
pub type Cost = (u32, u32);

#[derive(Debug)]
pub enum Outcome {
    Found {
        ops: Vec<Op>,
        cost: Cost,
        expanded: usize,
    },
    /// Every reachable state was explored and none is the goal.
    Unreachable {
        expanded: usize,
    },
    /// The expansion limit was hit.
    GaveUp {
        expanded: usize,
    },
}

/// The outage cost of one step: 1 when the action runs while writes are already blocked
/// and they stay blocked after it (the actions strictly between a fence and its deploy).
pub fn step_outage(ctx: &Ctx, before: &State, after: &State) -> u32 {
    u32::from(ctx.in_outage(before) && ctx.in_outage(after))
}

/// A key equal for states that differ only in the numbers of added services.
pub fn canonical(st: &State) -> Vec<Svc> {
    let blank = |s: &Svc| {
        let mut k = s.clone();
        if matches!(k.id, Id::Added(_)) {
            k.id = Id::Added(0);
        }
        if let Some(d) = k.data.as_mut() {
            if matches!(d.restored_from, Some(Id::Added(_))) {
                d.restored_from = Some(Id::Added(0));
            }
        }
        k
    };
    let mut added: Vec<&Svc> = st.svcs.iter().filter(|s| matches!(s.id, Id::Added(_))).collect();
    if added.is_empty() {
        return st.svcs.clone();
    }
    added.sort_by_cached_key(|s| blank(s));
    let rename = |id: Id| match id {
        Id::Added(_) => Id::Added(added.iter().position(|s| s.id == id).map_or(u16::MAX, |i| i as u16 + 1)),
        obs => obs,
    };
    let mut out: Vec<Svc> = st.svcs.iter().filter(|s| matches!(s.id, Id::Observed(_))).cloned().collect();
    out.extend(added.iter().map(|s| (*s).clone()));
    for s in &mut out {
        s.id = rename(s.id);
        if let Some(d) = s.data.as_mut() {
            d.restored_from = d.restored_from.map(rename);
        }
    }
    out
}

/// A fast hash for the search's own keys (FxHash's multiply-rotate): the search hashes
/// every state it meets, and SipHash's protection against chosen keys buys little for
/// keys whose number the budgets bound.
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u8(&mut self, x: u8) {
        self.write_u64(u64::from(x));
    }

    fn write_u16(&mut self, x: u16) {
        self.write_u64(u64::from(x));
    }

    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
}

struct Node {
    state: State,
    parent: Option<(usize, Op)>,
    g: Cost,
}

/// A* from `start` to the goal, giving up after `limit` expansions.
pub fn astar(ctx: &Ctx, start: &State, limit: usize) -> Outcome {
    let h = |st: &State| {
        let b = lower_bound(ctx, st);
        (b.len, outage_lower_bound(ctx, st, b))
    };
    search(ctx, start, h, limit)
}

/// Weighted A* (the bound counted `weight` times): a valid plan, found far sooner, but
/// not proven shortest. The fallback when `astar` gives up.
pub fn weighted(ctx: &Ctx, start: &State, weight: u32, limit: usize) -> Outcome {
    let h = |st: &State| {
        let b = lower_bound(ctx, st);
        (b.len.saturating_mul(weight), outage_lower_bound(ctx, st, b).saturating_mul(weight))
    };
    search(ctx, start, h, limit)
}

/// The fallback when `astar` runs out: the shortest way to a tidy state (every declared
/// dataset attached under its own prefix, whatever its version: `Goal::Tidy`), then the
/// shortest way from there to the goal. Where one search over both wanders among
/// interleavings its bound cannot tell apart, each leg is short and its bound close, and
/// the second is the runbook's case. Every goal state is tidy, so a first leg that finds
/// no tidy state proves no plan exists; the plan found is valid by the rules, not proven
/// shortest.
pub fn by_waypoint(ctx: &Ctx, start: &State, limit: usize) -> Outcome {
    let tidy = Ctx { goal: Goal::Tidy, ..ctx.clone() };
    let (first, cost, expanded) = match astar(&tidy, start, limit) {
        Outcome::Found { ops, cost, expanded } => (ops, cost, expanded),
        other => return other,
    };
    let waypoint = first.iter().fold(start.clone(), |st, op| ctx.effect(&st, op));
    match astar(ctx, &waypoint, limit) {
        Outcome::Found { ops, cost: rest, expanded: more } => Outcome::Found {
            ops: first.into_iter().chain(ops).collect(),
            cost: (cost.0 + rest.0, cost.1 + rest.1),
            expanded: expanded + more,
        },
        // Another tidy state might still lead on: not a proof.
        Outcome::Unreachable { expanded: more } | Outcome::GaveUp { expanded: more } => {
            Outcome::GaveUp { expanded: expanded + more }
        }
    }
}

/// What the planner settles on.
#[derive(Debug)]
pub enum Answer {
    /// No plan is shorter (nor, among as short, has fewer actions in the outage).
    Shortest(Vec<Op>),
    /// A valid plan, found by a fallback once the exact search ran out of budget.
    Valid(Vec<Op>),
    /// No sequence of the allowed actions reaches the goal.
    Unreachable,
    /// Every search ran out of budget; `expanded` by the exact one.
    GaveUp { expanded: usize },
}

/// The exact search within its budget; past it, a plan by way of a tidy state, then one
/// led harder by the bound.
pub fn plan(ctx: &Ctx, start: &State) -> Answer {
    let expanded = match astar(ctx, start, EXACT_BUDGET) {
        Outcome::Found { ops, .. } => return Answer::Shortest(ops),
        Outcome::Unreachable { .. } => return Answer::Unreachable,
        Outcome::GaveUp { expanded } => expanded,
    };
    let fallbacks: [&dyn Fn() -> Outcome; 2] =
        [&|| by_waypoint(ctx, start, FALLBACK_BUDGET), &|| weighted(ctx, start, 4, FALLBACK_BUDGET)];
    for fallback in fallbacks {
        match fallback() {
            Outcome::Found { ops, .. } => return Answer::Valid(ops),
            Outcome::Unreachable { .. } => return Answer::Unreachable,
            Outcome::GaveUp { .. } => {}
        }
    }
    Answer::GaveUp { expanded }
}

/// Exhaustive uniform-cost search: the reference the tests hold A* to.
pub fn brute_force(ctx: &Ctx, start: &State, limit: usize) -> Outcome {
    search(ctx, start, |_| (0, 0), limit)
}

fn search(ctx: &Ctx, start: &State, h: impl Fn(&State) -> Cost, limit: usize) -> Outcome {
    let mut nodes = vec![Node { state: start.clone(), parent: None, g: (0, 0) }];
    let mut best: HashMap<Vec<Svc>, (Cost, usize), BuildHasherDefault<Fx>> = HashMap::default();
    best.insert(canonical(start), ((0, 0), 0));
    // Ordered by f, then outage, then the deeper node (fewer ties explored), then age.
    let mut open = BinaryHeap::new();
    open.push(Reverse((h(start), Reverse(0u32), 0usize)));
    let mut expanded = 0;
    while let Some(Reverse((_, _, ix))) = open.pop() {
        let g = nodes[ix].g;
        let key = canonical(&nodes[ix].state);
        if best.get(&key).is_some_and(|&(c, i)| c < g || (c == g && i != ix)) {
            continue; // superseded by a cheaper path to the same state
        }
        if ctx.is_goal(&nodes[ix].state) {
            let mut ops = Vec::new();
            let mut at = ix;
            while let Some((parent, op)) = nodes[at].parent {
                ops.push(op);
                at = parent;
            }
            ops.reverse();
            return Outcome::Found { ops, cost: g, expanded };
        }
        expanded += 1;
        if expanded > limit {
            return Outcome::GaveUp { expanded };
        }
        let state = nodes[ix].state.clone();
        for (op, next) in ctx.successors(&state) {
            let cost = (g.0 + 1, g.1 + step_outage(ctx, &state, &next));
            match best.entry(canonical(&next)) {
                Entry::Occupied(e) if e.get().0 <= cost => continue,
                Entry::Occupied(mut e) => {
                    e.insert((cost, nodes.len()));
                }
                Entry::Vacant(e) => {
                    e.insert((cost, nodes.len()));
                }
            }
            let (h_len, h_out) = h(&next);
            if h_len >= UNREACHABLE {
                continue;
            }
            let f = (cost.0 + h_len, cost.1 + h_out);
            open.push(Reverse((f, Reverse(cost.0), nodes.len())));
            nodes.push(Node { state: next, parent: Some((ix, op)), g: cost });
        }
    }
    Outcome::Unreachable { expanded }
}

/// The bound of a state from which the goal cannot be reached.
pub const UNREACHABLE: u32 = u32::MAX / 4;

/// A managed service holding data no prefix declares that can never be settled: such
/// data cannot be copied (only declared datasets are), moved (no prefix but the one it
/// sits under may hold it) or lose its last copy, so some holder must be able to stay:
/// under the declared prefix it sits under, at that prefix's version, attached or still
/// to be attached, while that prefix's own dataset exists nowhere (once it exists, it
/// always will); or a service pgconverge does not manage, visible now or from the next
/// deploy, holds it too, beside which the managed copies may go (one pending detachment
/// is hidden by the deploy a managed holder that is attached or pending must wait for).
/// Returns the first managed holder when none can.
pub fn stranded(ctx: &Ctx, st: &State) -> Option<Id> {
    let can_stay = |s: &Svc| {
        if ctx.unmanaged(s) {
            // Visible now or from the next deploy, which attaches every new service and
            // hides those pending detachment.
            return s.visible() || matches!(s.status, Status::New | Status::Provisioned);
        }
        ctx.declared_version(s.prefix) == Some(s.version)
            && matches!(s.status, Status::New | Status::Provisioned | Status::Attached)
            && !ctx.dataset_exists(st, s.prefix)
    };
    st.svcs.iter().filter(|s| !ctx.unmanaged(s)).find_map(|s| {
        let x = s.data.map(|d| d.of).filter(|x| !ctx.is_declared(*x))?;
        let holders = st.svcs.iter().filter(|o| o.data.is_some_and(|d| d.of == x));
        // A managed holder that must wait for a deploy to be deleted (attached or pending
        // detachment) needs a copy still visible after that deploy.
        let waits = holders
            .clone()
            .any(|o| !ctx.unmanaged(o) && matches!(o.status, Status::Attached | Status::PendingDetachment));
        let helps = |o: &&Svc| can_stay(o) && !(waits && ctx.unmanaged(o) && o.status == Status::PendingDetachment);
        (!holders.clone().any(|o| helps(&o))).then_some(s.id)
    })
}

/// With the fence on, a managed service holding data no prefix declares that it cannot
/// keep, which two services pgconverge does not manage also hold and will write to from
/// the next deploy on (they are attached or about to be, and are never fenced): from then
/// on every copy is stale for good, so no copy can ever justify deleting this one, and
/// being attached or pending detachment it cannot be deleted before that deploy.
pub fn spoiled(ctx: &Ctx, st: &State) -> Option<(Id, Vec<Id>)> {
    if !ctx.fence_writes {
        return None;
    }
    st.svcs.iter().filter(|s| !ctx.unmanaged(s)).find_map(|s| {
        let x = s.data.map(|d| d.of).filter(|x| !ctx.is_declared(*x))?;
        let waits = matches!(s.status, Status::Attached | Status::PendingDetachment);
        let may_stay = ctx.declared_version(s.prefix) == Some(s.version) && !ctx.dataset_exists(st, s.prefix);
        let writers: Vec<Id> = st
            .svcs
            .iter()
            .filter(|o| o.data.is_some_and(|d| d.of == x) && ctx.unmanaged(o))
            .filter(|o| matches!(o.status, Status::New | Status::Provisioned | Status::Attached))
            .map(|o| o.id)
            .collect();
        (waits && !may_stay && writers.len() >= 2).then_some((s.id, writers))
    })
}

/// A declared dataset no visible service holds, held by two or more services still to be
/// attached: the deploy the goal needs attaches them all (none can be deleted or copied
/// over before it, since no visible copy exists), and from then on each takes writes past
/// the others, so no copy is ever complete again. With the fence on, that is a dead end:
/// the application's copy must be complete. With it off but verification on, every
/// holder but the final one must then leave, which takes a verified copy (never made
/// from an incomplete one), or stay where the goal allows it: under another declared
/// prefix at that prefix's version. A dead end when two cannot stay, or when the one
/// that cannot is not of the declared version and so cannot be the final holder.
pub fn split_at_deploy(ctx: &Ctx, st: &State) -> Option<(P, Vec<Id>)> {
    if !ctx.fence_writes && ctx.verify == Verify::None {
        return None;
    }
    ctx.declared.iter().find_map(|&(p, v)| {
        let holders = st.svcs.iter().filter(|s| s.data.is_some_and(|d| d.of == p));
        if holders.clone().any(Svc::visible) {
            return None;
        }
        let waiting: Vec<&Svc> = holders.filter(|s| matches!(s.status, Status::New | Status::Provisioned)).collect();
        if waiting.len() < 2 {
            return None;
        }
        let ids = || (p, waiting.iter().map(|s| s.id).collect());
        if ctx.fence_writes {
            return Some(ids());
        }
        let may_stay = |s: &&&Svc| s.prefix != p && ctx.declared_version(s.prefix) == Some(s.version);
        let leaving: Vec<&&Svc> = waiting.iter().filter(|s| !may_stay(s)).collect();
        match leaving[..] {
            [] => None,
            [only] if only.version == v => None,
            _ => Some(ids()),
        }
    })
}

/// A declared prefix whose service is pending detachment and cannot leave it: every
/// deploy must show the prefix's data under the prefix, and the next one hides that
/// service, so it must first be renamed into its upgrade's temporary prefix (if of the
/// declared version), its retired prefix or a kept one. Services pending detachment with
/// the same data can only move among those same prefixes and cannot be deleted before a
/// deploy; when they fill every place it could go, and cannot make room by moving among
/// themselves, no deploy is ever allowed.
pub fn jammed(ctx: &Ctx, st: &State) -> Option<(P, Id)> {
    ctx.declared.iter().enumerate().find_map(|(k, &(p, v))| {
        let jam = |s: &Svc| s.status == Status::PendingDetachment && s.data.is_some_and(|d| d.of == p);
        let holder = st.svcs.iter().find(|s| s.prefix == p).filter(|s| jam(s))?;
        let (t, r) = ctx.temp_of[k];
        let kept = ctx.kept.iter().filter(|&&(q, _)| ctx.roles[q as usize] == Role::Retired(Some(p)));
        // Each place, with the one major a service needs to move there (None: any).
        let places: Vec<(P, Option<u32>)> =
            [(p, None), (t, Some(v)), (r, None)].into_iter().chain(kept.map(|&(q, m)| (q, Some(m)))).collect();
        let mut stuck: Vec<(P, u32)> = places
            .iter()
            .filter_map(|&(q, _)| st.svcs.iter().find(|s| s.prefix == q && jam(s)))
            .map(|s| (s.prefix, s.version))
            .collect();
        // Leniently, a service that can move anywhere is out of the way for good, its
        // place free: the jam stands only if nothing can ever move.
        loop {
            let free = |q: P| !stuck.iter().any(|&(x, _)| x == q);
            let mobile = stuck.iter().position(|&(_, version)| {
                places.iter().any(|&(q, need)| q != p && free(q) && need.is_none_or(|m| m == version))
            });
            let Some(i) = mobile else { break };
            stuck.remove(i);
            if !stuck.iter().any(|&(x, _)| x == p) {
                return None;
            }
        }
        Some((p, holder.id))
    })
}

/// A declared dataset whose every usable copy is on a server newer than its declared
/// version, with downgrades not allowed: no copy can ever reach a server of that version.
/// With the fence on, an incomplete copy that no deploy can attach (detached) and an
/// incomplete backup are no use: what is copied from them is incomplete, never trusted.
pub fn too_new(ctx: &Ctx, st: &State, p: u8, v: u32) -> Option<u32> {
    if ctx.allow_downgrade || !ctx.dataset_exists(st, p) {
        return None;
    }
    let usable = |s: &&Svc| {
        let dead = |complete: bool| ctx.fence_writes && !complete;
        s.data.is_some_and(|d| d.of == p && !(dead(d.complete || d.streaming) && s.status == Status::Detached))
            || s.backup.is_some_and(|b| b.of == p && !dead(b.complete))
    };
    let oldest = st.svcs.iter().filter(usable).map(|s| s.version).min()?;
    (oldest > v).then_some(oldest)
}

/// A declared dataset that exists only in copies the rules call incomplete, none of them
/// the application's. With the fence on, nothing can make a complete copy again, and
/// nothing may drop the incomplete ones. With it off but verification on, the same holds
/// unless a holder that stays or becomes attached may be shown as it is (an original, or
/// verified already): an incomplete copy is never verified, and only a deploy that shows
/// such a holder can leave one holder visible, the application's, complete again.
pub fn only_incomplete(ctx: &Ctx, st: &State, p: u8) -> bool {
    let holders = st.svcs.iter().filter(|s| s.data.is_some_and(|d| d.of == p));
    if holders.clone().next().is_none() {
        return false;
    }
    let hope = st.svcs.iter().any(|s| {
        s.data.is_some_and(|d| d.of == p && (d.complete || d.streaming))
            || s.backup.is_some_and(|b| b.of == p && b.complete)
    });
    if hope {
        return false;
    }
    if ctx.fence_writes {
        return true;
    }
    let showable = |s: &Svc| {
        matches!(s.status, Status::New | Status::Provisioned | Status::Attached)
            && s.data.is_some_and(|d| d.verified || d.restored_from.is_none())
    };
    ctx.verify != Verify::None && !holders.clone().any(showable)
}

/// What `lower_bound` finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// No plan from here is shorter.
    pub len: u32,
    /// A plan exactly `len` long runs at most this many actions after its deploy: deletes,
    /// and renames and verifies of services attached already.
    pub late: u32,
}

/// A lower bound on the actions still needed to reach the goal. Every action but deploy
/// acts on one service, so the bound adds up, per service, the fewest actions that
/// service must still undergo whatever becomes of it; per dataset, the backup or catch-up
/// (and fence) a copy still needs; and one deploy where something must still appear or
/// disappear. A copy costs two actions, backup and restore or replicate and catch-up, or
/// one, an upgrade by pg_upgrade.
pub fn lower_bound(ctx: &Ctx, st: &State) -> Bounds {
    let dead = stranded(ctx, st).is_some()
        || spoiled(ctx, st).is_some()
        || split_at_deploy(ctx, st).is_some()
        || jammed(ctx, st).is_some()
        || ctx.declared.iter().any(|&(p, v)| only_incomplete(ctx, st, p) || too_new(ctx, st, p, v).is_some());
    if dead {
        return Bounds { len: UNREACHABLE, late: 0 };
    }
    let verify_cost = u32::from(ctx.verify != Verify::None);
    let exists: Vec<bool> = ctx.declared.iter().map(|&(p, _)| ctx.dataset_exists(st, p)).collect();
    let n = ctx.declared.len();
    // Each declared prefix ends with exactly one holder, each service holds at most one:
    // an assignment, solved exactly by dynamic programming over the set of prefixes
    // already given a holder (a handful of prefixes per environment).
    let full = (1usize << n) - 1;
    // Per set of assigned prefixes: the least cost, and among assignments of that cost the
    // most actions that may follow the deploy (the outage bound needs that maximum).
    let mut best: Vec<Option<(u32, Reverse<u32>)>> = vec![None; full + 1];
    best[0] = Some((0, Reverse(0)));
    let mut deploy = false;
    for s in st.svcs.iter().filter(|s| !ctx.unmanaged(s)) {
        let (go, deletes) = cost_to_go(ctx, s);
        let hold: Vec<Option<(u32, u32)>> = ctx
            .declared
            .iter()
            .enumerate()
            .map(|(k, &(p, v))| cost_to_hold(ctx, s, p, v, exists[k], verify_cost))
            .collect();
        let can_stay_visible = s.status == Status::Attached && hold.iter().any(Option::is_some);
        deploy |= s.visible() && !can_stay_visible;
        let mut next: Vec<Option<(u32, Reverse<u32>)>> = vec![None; full + 1];
        let mut offer = |m: usize, c: (u32, Reverse<u32>)| {
            if next[m].is_none_or(|old| c < old) {
                next[m] = Some(c);
            }
        };
        for (mask, cell) in best.iter().enumerate() {
            let Some((base, Reverse(del))) = *cell else { continue };
            offer(mask, (base + go, Reverse(del + u32::from(deletes))));
            for (k, c) in hold.iter().enumerate() {
                if let Some((c, late)) = c.filter(|_| mask & (1 << k) == 0) {
                    offer(mask | (1 << k), (base + c, Reverse(del + late)));
                }
            }
        }
        best = next;
    }
    let mut assigned: Option<(u32, Reverse<u32>)> = None;
    for (mask, cell) in best.iter().enumerate() {
        let Some((cost, del)) = *cell else { continue };
        let added: u32 =
            (0..n).filter(|k| mask & (1 << k) == 0).map(|k| cost_of_new(ctx, st, k, exists[k], verify_cost)).sum();
        let c = (cost + added, del);
        if assigned.is_none_or(|a| c < a) {
            assigned = Some(c);
        }
    }
    let (mut total, Reverse(late)) = assigned.unwrap_or((0, Reverse(0)));
    for (k, &(p, v)) in ctx.declared.iter().enumerate() {
        let attached_candidate = st.svcs.iter().any(|s| {
            s.status == Status::Attached
                && ctx.goal_version(s.version, v)
                && !ctx.unmanaged(s)
                && (!exists[k] || s.data.is_none_or(|d| d.of == p))
        });
        deploy |= !attached_candidate;
        if exists[k] && needs_copy(ctx, st, p, v) {
            let usable_backup =
                st.svcs.iter().any(|s| s.backup.is_some_and(|b| b.of == p && (b.complete || !ctx.fence_writes)));
            // A copy already streaming needs its catch-up, which the restore-or-replicate
            // of `cost_to_hold` stands for; a copy yet to be made needs a backup first, or
            // its catch-up after the replicate.
            let streaming = st.svcs.iter().any(|s| s.data.is_some_and(|d| d.of == p && d.streaming));
            if !usable_backup {
                // pg_upgrade copies in one action, which `cost_to_hold` counts.
                total += u32::from(!streaming && !ctx.pg_upgrade); // backup, or a catch-up
                let quiet_source = st
                    .svcs
                    .iter()
                    .any(|s| s.data.is_some_and(|d| d.of == p && d.complete) && (s.fenced || !s.visible()));
                total += u32::from(ctx.fence_writes && !quiet_source); // fence
            }
        }
    }
    if deploy && fenced_for_good(ctx, st).is_some() {
        return Bounds { len: UNREACHABLE, late: 0 };
    }
    Bounds { len: total + u32::from(deploy), late }
}

/// An attached, fenced service that pgconverge does not manage: it stays visible and
/// fenced through every deploy, which deploy refuses, and nothing may unfence it.
pub fn fenced_for_good(ctx: &Ctx, st: &State) -> Option<Id> {
    st.svcs.iter().find(|s| ctx.unmanaged(s) && s.status == Status::Attached && s.fenced).map(|s| s.id)
}

/// A lower bound on the actions still to run inside the write outage, valid for every
/// completion exactly `len` (= `lower_bound`) long: only those matter once plans are
/// compared by length first. Such a completion runs no action the bound did not count:
/// one deploy, and no unfence of a fenced visible service that cannot end as anyone's
/// holder. Writes therefore stay blocked from now until that single deploy, and every
/// action but the deploy and those that may follow it (`Bounds::late`) runs inside the
/// outage.
pub fn outage_lower_bound(ctx: &Ctx, st: &State, b: Bounds) -> u32 {
    let verify_cost = u32::from(ctx.verify != Verify::None);
    let blocked = st.svcs.iter().filter(|s| s.visible() && s.fenced && !ctx.unmanaged(s)).any(|f| {
        !ctx.declared.iter().any(|&(p, v)| cost_to_hold(ctx, f, p, v, ctx.dataset_exists(st, p), verify_cost).is_some())
    });
    if !blocked {
        return 0;
    }
    b.len.saturating_sub(1 + b.late)
}

/// Fewest actions on a service yet to be added that ends as the holder of the `k`th
/// declared prefix.
fn cost_of_new(ctx: &Ctx, st: &State, k: usize, exists: bool, verify_cost: u32) -> u32 {
    let (p, _) = ctx.declared[k];
    if !exists {
        return 1; // add
    }
    let taken = st.svcs.iter().find(|s| s.prefix == p && s.visible() && s.data.is_some_and(|d| d.of == p));
    // The prefix is taken by the application's copy, which may leave it only once a
    // replacement is ready: unless another service already holds a copy that can become
    // that replacement, the new one must be added under a temporary prefix and renamed
    // into place. (Making any other service the replacement costs it a restore that the
    // bound does not count, so the rename may be counted.)
    let other_replacement = st.svcs.iter().any(|o| {
        Some(o.id) != taken.map(|t| t.id)
            && !ctx.unmanaged(o)
            && matches!(o.status, Status::New | Status::Provisioned)
            && o.data.is_some_and(|d| d.of == p)
    });
    1 + 2 + verify_cost + u32::from(taken.is_some() && !other_replacement)
}

/// No service of the right version already holds a good enough copy of `p`.
fn needs_copy(ctx: &Ctx, st: &State, p: u8, v: u32) -> bool {
    !st.svcs.iter().any(|s| {
        ctx.goal_version(s.version, v)
            && matches!(s.status, Status::New | Status::Provisioned | Status::Attached)
            && s.data.is_some_and(|d| d.of == p && (d.complete || !ctx.fence_writes))
    })
}

/// Fewest actions on `s` if it is to end gone (or kept detached, with keep_old), and
/// whether one of them is its delete.
fn cost_to_go(ctx: &Ctx, s: &Svc) -> (u32, bool) {
    let declared_data = s.data.is_some_and(|d| ctx.is_declared(d.of));
    let delete = !(ctx.keep_old && (declared_data || ctx.retired_original(s)));
    let detach = u32::from(s.status == Status::Attached);
    (u32::from(delete) + detach + u32::from(must_rename_away(ctx, s)), delete)
}

/// A visible service under its own declared prefix must leave that prefix before the
/// deploy that hides it, or that deploy would hide the dataset.
fn must_rename_away(ctx: &Ctx, s: &Svc) -> bool {
    s.visible() && ctx.is_declared(s.prefix) && s.data.is_some_and(|d| d.of == s.prefix)
}

/// Fewest actions on `s` if it is to end as the application's copy of `p` at version `v`,
/// and how many of them may run after the deploy (the rename and verify of a service
/// attached already); `None` if it cannot.
fn cost_to_hold(ctx: &Ctx, s: &Svc, p: u8, v: u32, exists: bool, verify_cost: u32) -> Option<(u32, u32)> {
    if !ctx.goal_version(s.version, v) || !matches!(s.status, Status::New | Status::Provisioned | Status::Attached) {
        return None;
    }
    let rename = u32::from(s.prefix != p);
    let mut verify = 0;
    let mut c = rename + u32::from(s.fenced);
    if exists {
        let good: Option<DataS> = s.data.filter(|d| d.of == p && (d.complete || !ctx.fence_writes));
        match good {
            Some(d) => verify = u32::from(d.restored_from.is_some() && !d.verified) * verify_cost,
            None if s.status == Status::Attached => return None,
            None => c += u32::from(s.status == Status::New) + 1 + verify_cost,
        }
    }
    let late = if s.status == Status::Attached { rename + verify } else { 0 };
    Some((c + verify, late))
}
