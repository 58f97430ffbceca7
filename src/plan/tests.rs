use super::*;
use crate::config::parse;
use std::path::Path;

pub(crate) fn env(yaml_env: &str, services: &str) -> (DesiredEnv, EnvLive) {
    let text = format!("version: 1\nenvironments:\n  live:\n{yaml_env}");
    let config = parse(Path::new("t.yaml"), &text).expect("config");
    let live: EnvLive = serde_json::from_str(&format!("{{\"services\": [{services}]}}")).expect("live");
    (config.desired().remove(0), live)
}

/// Why `plan` finds no plan for an environment.
fn refusal(yaml_env: &str, services: &str) -> String {
    let (d, l) = env(yaml_env, services);
    plan_env(&d, &l).expect_err("no plan").to_string()
}

fn ops(report: &EnvReport) -> Vec<String> {
    report.steps.iter().map(|s| serde_json::to_string(&s.action).expect("json")).collect()
}

#[test]
fn runbook_is_eleven_actions_with_six_inside_the_outage() {
    let (d, l) =
        env("    postgres: {DEFAULT: 17}\n", r#"{"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached"}"#);
    let r = plan_env(&d, &l).expect("plan");
    assert_eq!(
        ops(&r),
        [
            r#"{"op":"add","service":"+1","prefix":"NEW","version":17}"#,
            r#"{"op":"provision","service":"+1"}"#,
            r#"{"op":"fence","service":"svc-1"}"#,
            r#"{"op":"backup","service":"svc-1"}"#,
            r#"{"op":"restore","service":"+1","from":"svc-1"}"#,
            r#"{"op":"verify","service":"+1","against":"svc-1"}"#,
            r#"{"op":"rename","service":"svc-1","to":"OLD"}"#,
            r#"{"op":"detach","service":"svc-1"}"#,
            r#"{"op":"rename","service":"+1","to":"DEFAULT"}"#,
            r#"{"op":"deploy"}"#,
            r#"{"op":"delete","service":"svc-1"}"#,
        ]
    );
    assert_eq!(r.outage_actions, 6);
}

fn short(report: &EnvReport) -> Vec<String> {
    report.steps.iter().map(|s| s.action.to_string()).collect()
}

const OLD_ATTACHED: &str = r#"{"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached"}"#;

/// Half-done states of the runbook, leftovers and edge cases: each plans the rest.
#[test]
fn half_done_states_plan_the_rest() {
    let cases: &[(&str, &str, &str, &[&str])] = &[
        ("fresh environment", "    postgres: {DEFAULT: 17}\n", "", &["add +1 as DEFAULT (PostgreSQL 17)", "deploy"]),
        (
            "converged",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"a","version":17,"prefix":"DEFAULT","status":"attached"}"#,
            &[],
        ),
        (
            "after add",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached"},
               {"id":"n","version":17,"prefix":"NEW","status":"new"}"#,
            &[
                "provision n",
                "fence svc-1",
                "backup svc-1",
                "restore n from svc-1",
                "verify n against svc-1",
                "rename svc-1 → OLD",
                "detach svc-1",
                "rename n → DEFAULT",
                "deploy",
                "delete svc-1",
            ],
        ),
        (
            "after fence (backups are not observed: back up again)",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached","fenced":true},
               {"id":"n","version":17,"prefix":"NEW","status":"provisioned"}"#,
            &[
                "backup svc-1",
                "restore n from svc-1",
                "verify n against svc-1",
                "rename svc-1 → OLD",
                "detach svc-1",
                "rename n → DEFAULT",
                "deploy",
                "delete svc-1",
            ],
        ),
        (
            "after restore",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached","fenced":true},
               {"id":"n","version":17,"prefix":"NEW","status":"provisioned",
                "data":{"of":"DEFAULT","complete":true,"restored_from":"svc-1"}}"#,
            &[
                "verify n against svc-1",
                "rename svc-1 → OLD",
                "detach svc-1",
                "rename n → DEFAULT",
                "deploy",
                "delete svc-1",
            ],
        ),
        (
            "after detach",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"svc-1","version":16,"prefix":"OLD","status":"pending_detachment","fenced":true,
                "data":{"of":"DEFAULT","complete":true}},
               {"id":"n","version":17,"prefix":"NEW","status":"provisioned",
                "data":{"of":"DEFAULT","complete":true,"restored_from":"svc-1","verified":true}}"#,
            &["rename n → DEFAULT", "deploy", "delete svc-1"],
        ),
        (
            "after deploy",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"svc-1","version":16,"prefix":"OLD","status":"detached","fenced":true,
                "data":{"of":"DEFAULT","complete":true}},
               {"id":"n","version":17,"prefix":"DEFAULT","status":"attached",
                "data":{"of":"DEFAULT","complete":true,"restored_from":"svc-1","verified":true}}"#,
            &["delete svc-1"],
        ),
        (
            "keep_old keeps the retired original",
            "    upgrade: {keep_old: true}\n    postgres: {DEFAULT: 17}\n",
            r#"{"id":"svc-1","version":16,"prefix":"OLD","status":"detached","fenced":true,
                "data":{"of":"DEFAULT","complete":true}},
               {"id":"n","version":17,"prefix":"DEFAULT","status":"attached",
                "data":{"of":"DEFAULT","complete":true,"restored_from":"svc-1","verified":true}}"#,
            &[],
        ),
        (
            "keep_old keeps a detached original whose record was lost (an upgrade made by hand)",
            "    upgrade: {keep_old: true}\n    postgres: {DEFAULT: 17}\n",
            r#"{"id":"svc-1","version":16,"prefix":"OLD","status":"detached"},
               {"id":"n","version":17,"prefix":"DEFAULT","status":"attached"}"#,
            &[],
        ),
        (
            "without keep_old that original goes",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"svc-1","version":16,"prefix":"OLD","status":"detached"},
               {"id":"n","version":17,"prefix":"DEFAULT","status":"attached"}"#,
            &["delete svc-1"],
        ),
        (
            "keep_old keeps no empty service that is not detached",
            "    upgrade: {keep_old: true}\n    postgres: {DEFAULT: 17}\n",
            r#"{"id":"svc-1","version":16,"prefix":"OLD","status":"provisioned"},
               {"id":"n","version":17,"prefix":"DEFAULT","status":"attached"}"#,
            &["delete svc-1"],
        ),
        (
            "the copy lost completeness when its source was unfenced",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached"},
               {"id":"n","version":17,"prefix":"NEW","status":"provisioned",
                "data":{"of":"DEFAULT","complete":false,"restored_from":"svc-1","verified":true}}"#,
            &[
                "fence svc-1",
                "backup svc-1",
                "restore n from svc-1",
                "verify n against svc-1",
                "rename svc-1 → OLD",
                "detach svc-1",
                "rename n → DEFAULT",
                "deploy",
                "delete svc-1",
            ],
        ),
        (
            "a copy whose source is gone cannot be verified: copy again",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"a","version":16,"prefix":"DEFAULT","status":"attached"},
               {"id":"n","version":17,"prefix":"NEW","status":"provisioned",
                "data":{"of":"DEFAULT","complete":true,"restored_from":"deleted-long-ago"}}"#,
            &[
                "fence a",
                "backup a",
                "restore n from a",
                "verify n against a",
                "rename a → OLD",
                "detach a",
                "rename n → DEFAULT",
                "deploy",
                "delete a",
            ],
        ),
        (
            "leftovers of an abandoned upgrade are removed",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"a","version":17,"prefix":"DEFAULT","status":"attached"},
               {"id":"n","version":18,"prefix":"NEW_DEFAULT","status":"provisioned"},
               {"id":"o","version":16,"prefix":"OLD_DEFAULT","status":"detached","data":{"of":"DEFAULT","complete":true}}"#,
            &["delete n", "delete o"],
        ),
        (
            "a second prefix is added beside the first",
            "    postgres: {DEFAULT: 17, ANALYTICS: 17}\n",
            r#"{"id":"a","version":17,"prefix":"DEFAULT","status":"attached"}"#,
            &["add +1 as ANALYTICS (PostgreSQL 17)", "deploy"],
        ),
        (
            "services under undeclared prefixes are never touched",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"a","version":17,"prefix":"DEFAULT","status":"attached"},
               {"id":"legacy","version":12,"prefix":"LEGACY","status":"attached"}"#,
            &[],
        ),
        (
            "without fencing or verification, no fence (and the plan warns that writes may be lost)",
            "    upgrade: {fence_writes: false, verify: none}\n    postgres: {DEFAULT: 17}\n",
            OLD_ATTACHED,
            &[
                "add +1 as NEW (PostgreSQL 17)",
                "provision +1",
                "backup svc-1",
                "restore +1 from svc-1",
                "rename svc-1 → OLD",
                "detach svc-1",
                "rename +1 → DEFAULT",
                "deploy",
                "delete svc-1",
            ],
        ),
        (
            "verification compares with a quiet source, so it fences even without fence_writes",
            "    upgrade: {fence_writes: false}\n    postgres: {DEFAULT: 17}\n",
            OLD_ATTACHED,
            &[
                "add +1 as NEW (PostgreSQL 17)",
                "provision +1",
                "fence svc-1",
                "backup svc-1",
                "restore +1 from svc-1",
                "verify +1 against svc-1",
                "rename svc-1 → OLD",
                "detach svc-1",
                "rename +1 → DEFAULT",
                "deploy",
                "delete svc-1",
            ],
        ),
        (
            "without verification, no verify",
            "    upgrade: {verify: none, keep_old: true}\n    postgres: {DEFAULT: 17}\n",
            OLD_ATTACHED,
            &[
                "add +1 as NEW (PostgreSQL 17)",
                "provision +1",
                "fence svc-1",
                "backup svc-1",
                "restore +1 from svc-1",
                "rename svc-1 → OLD",
                "detach svc-1",
                "rename +1 → DEFAULT",
                "deploy",
            ],
        ),
        (
            "a fenced service of the right version is unfenced",
            "    postgres: {DEFAULT: 17}\n",
            r#"{"id":"a","version":17,"prefix":"DEFAULT","status":"attached","fenced":true}"#,
            &["unfence a"],
        ),
    ];
    for (name, yaml, services, want) in cases {
        let (d, l) = env(yaml, services);
        let r = plan_env(&d, &l).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(short(&r), *want, "{name}");
    }
}

#[test]
fn unmanaged_services_are_listed() {
    let (d, l) = env(
        "    postgres: {DEFAULT: 17}\n",
        r#"{"id":"a","version":17,"prefix":"DEFAULT","status":"attached"},
           {"id":"legacy","version":12,"prefix":"LEGACY","status":"attached"}"#,
    );
    let r = plan_env(&d, &l).expect("plan");
    assert_eq!(r.unmanaged, [ServiceId::observed("legacy").expect("id")]);
}

#[test]
fn downgrade_needs_allow_downgrade() {
    let (d, l) = env("    postgres: {DEFAULT: 15}\n", OLD_ATTACHED);
    let err = plan_env(&d, &l).expect_err("downgrade refused");
    assert!(err.to_string().contains("allow_downgrade"), "{err}");
    let (d, l) = env("    upgrade: {allow_downgrade: true}\n    postgres: {DEFAULT: 15}\n", OLD_ATTACHED);
    assert_eq!(plan_env(&d, &l).expect("plan").steps.len(), 11);
}

#[test]
fn data_nobody_declared_is_never_dropped() {
    // OLD is visible without data: it holds dataset OLD, which no prefix declares, so it
    // can neither stay nor go without losing what the application may have written.
    let (d, l) = env(
        "    postgres: {DEFAULT: 17}\n",
        r#"{"id":"svc-1","version":16,"prefix":"OLD","status":"pending_detachment","fenced":true},
           {"id":"n","version":17,"prefix":"DEFAULT","status":"attached"}"#,
    );
    let err = plan_env(&d, &l).expect_err("no plan");
    assert!(err.to_string().contains("svc-1"), "{err}");
}

/// The application's copy is the dataset whatever its record says: an attached copy
/// recorded incomplete (made while its source took writes) with a "complete" original
/// beside it is not a divergence to merge by hand; the original is stale and goes.
#[test]
fn the_applications_copy_is_the_dataset_and_its_original_stale() {
    let (d, l) = env(
        "    postgres: {DEFAULT: 17}\n",
        r#"{"id":"a","version":17,"prefix":"DEFAULT","status":"attached",
            "data":{"of":"DEFAULT","complete":false,"restored_from":"o","verified":true}},
           {"id":"o","version":16,"prefix":"OLD","status":"detached","data":{"of":"DEFAULT","complete":true}}"#,
    );
    let r = plan_env(&d, &l).expect("plan");
    assert_eq!(short(&r), ["delete o"]);
}

/// Issue 14, finding 3: data nobody declares, held only by a service under a declared
/// prefix it cannot stay under, is a dead end found before any search, not a search that
/// gives up after seconds with advice to split the change.
#[test]
fn undeclared_data_under_a_declared_prefix_is_a_dead_end_named_at_once() {
    let (d, l) = env(
        "    postgres: {CACHE: 17, DEFAULT: 15}\n",
        r#"{"id":"c","version":16,"prefix":"CACHE","status":"attached","data":{"of":"LEGACY","complete":true}}"#,
    );
    let err = plan_env(&d, &l).expect_err("no plan");
    let text = err.to_string();
    assert!(text.contains("LEGACY") && text.contains("does not declare") && !text.contains("gave up"), "{text}");
    let (ctx, start) = super::rules::Ctx::new(&d, &l).expect("ctx");
    assert_eq!(search::lower_bound(&ctx, &start).len, search::UNREACHABLE, "the bound sees the dead end");
}

/// A fenced service pgconverge may not touch blocks every deploy for good: said at once.
#[test]
fn an_unmanaged_fenced_service_blocks_every_deploy_and_says_so() {
    let (d, l) = env(
        "    postgres: {DEFAULT: 17}\n",
        r#"{"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached"},
           {"id":"x","version":14,"prefix":"REPORTS","status":"attached","fenced":true}"#,
    );
    let err = plan_env(&d, &l).expect_err("no plan");
    assert!(err.to_string().contains("x is attached and fenced, and pgconverge does not manage it"), "{err}");
}

/// Copies that all missed the application's writes, none of them in use, cannot become a
/// complete copy again: a dead end that says which copies to choose between.
#[test]
fn a_dataset_left_only_in_incomplete_copies_says_so() {
    let (d, l) = env(
        "    postgres: {DEFAULT: 17}\n",
        r#"{"id":"a","version":17,"prefix":"NEW","status":"provisioned","data":{"of":"DEFAULT","complete":false}},
           {"id":"b","version":16,"prefix":"OLD","status":"detached","data":{"of":"DEFAULT","complete":false}}"#,
    );
    let err = plan_env(&d, &l).expect_err("no plan");
    assert!(err.to_string().contains("every copy of DEFAULT (a, b) is incomplete"), "{err}");
}

/// Two copies of a dataset that no attached service holds: the deploy the goal needs
/// attaches both, and from then on neither can be proven complete. Said at once.
#[test]
fn two_copies_waiting_for_the_same_deploy_are_a_dead_end_named_at_once() {
    let err = refusal(
        "    postgres: {A: 15, B: 16}\n",
        r#"{"id":"s0","version":15,"prefix":"NEW","status":"pending_detachment","fenced":true},
           {"id":"s1","version":18,"prefix":"OLD_A","status":"provisioned","data":{"of":"B","complete":true,"restored_from":"s0"}},
           {"id":"s2","version":15,"prefix":"X","status":"provisioned","data":{"of":"B","complete":true,"restored_from":"s1","verified":true}},
           {"id":"s4","version":14,"prefix":"A","status":"detached","data":{"of":"A","complete":true}}"#,
    );
    assert!(err.contains("s1, s2 all hold B and are not attached yet"), "{err}");
}

/// Data nobody declares, held by a service pgconverge must remove and by two it does not
/// manage that will all take writes: no copy can justify the delete. Said at once.
#[test]
fn undeclared_data_other_writers_spoil_is_a_dead_end_named_at_once() {
    let err = refusal(
        "    postgres: {A: 18}\n",
        r#"{"id":"s0","version":18,"prefix":"C","status":"pending_detachment","data":{"of":"X","complete":true,"verified":true}},
           {"id":"s1","version":16,"prefix":"NEW_B","status":"attached","fenced":true,"data":{"of":"A","complete":false,"restored_from":"s0","verified":true}},
           {"id":"s2","version":15,"prefix":"NEW_A","status":"pending_detachment","data":{"of":"X","complete":true}},
           {"id":"s3","version":15,"prefix":"OLD_B","status":"new","data":{"of":"X","complete":true}},
           {"id":"s4","version":15,"prefix":"X","status":"provisioned","data":{"of":"X","complete":true}}"#,
    );
    assert!(err.contains("s2 holds data the config does not declare") && err.contains("s3, s4 hold it too"), "{err}");
}

/// Without the fence but with verification, a copy of an incomplete copy can never be
/// verified, and only a verified copy (or an original) may be shown: a dead end.
#[test]
fn with_verification_an_incomplete_copy_that_cannot_be_shown_is_a_dead_end() {
    let err = refusal(
        "    postgres: {A: 15, B: 15}\n    upgrade: {fence_writes: false, verify: checksums}\n",
        r#"{"id":"s0","version":14,"prefix":"NEW","status":"detached","data":{"of":"A","complete":false,"verified":true}}"#,
    );
    assert!(err.contains("every copy of A (s0) is incomplete"), "{err}");
}

/// Without the fence but with verification, two copies the next deploy attaches can
/// stay side by side only where the goal allows: here neither may stay under the
/// prefix it sits under, so one would have to leave, which takes a verified copy that
/// can no longer be made. Said at once.
#[test]
fn without_the_fence_two_copies_waiting_for_the_same_deploy_are_a_dead_end_with_verification() {
    let err = refusal(
        "    postgres: {A: 17, B: 16}\n    upgrade: {fence_writes: false, verify: checksums, allow_downgrade: true}\n",
        r#"{"id":"s0","version":17,"prefix":"X","status":"provisioned","data":{"of":"A","complete":false,"verified":true}},
           {"id":"s1","version":17,"prefix":"C","status":"provisioned","data":{"of":"A","complete":true}}"#,
    );
    assert!(err.contains("s0, s1 all hold A and are not attached yet"), "{err}");
}

/// Undeclared data whose managed holder is attached: the unmanaged copy pending
/// detachment is hidden by the very deploy the managed one must wait for, so it cannot
/// stand in for it. Said at once.
#[test]
fn an_unmanaged_copy_pending_detachment_cannot_stand_in_for_an_attached_one() {
    let err = refusal(
        "    postgres: {A: 17, B: 16}\n",
        r#"{"id":"s0","version":18,"prefix":"OLD","status":"attached","data":{"of":"X","complete":true}},
           {"id":"s3","version":15,"prefix":"A","status":"attached"},
           {"id":"s4","version":14,"prefix":"X","status":"pending_detachment"}"#,
    );
    assert!(err.contains("s0 (OLD) holds data of X, which the config does not declare"), "{err}");
}

/// A declared prefix held by a service pending detachment, whose every way out (the
/// retired prefix; the temporary one takes only the declared major) is held by another
/// pending detachment: no deploy can ever show the prefix. Said at once.
#[test]
fn a_prefix_jammed_by_services_pending_detachment_is_a_dead_end_named_at_once() {
    let err = refusal(
        "    postgres: {A: 18, B: 18}\n",
        r#"{"id":"s0","version":17,"prefix":"NEW_B","status":"pending_detachment","data":{"of":"B","complete":true,"verified":true}},
           {"id":"s1","version":14,"prefix":"C","status":"new"},
           {"id":"s2","version":16,"prefix":"A","status":"pending_detachment","fenced":true},
           {"id":"s3","version":16,"prefix":"OLD_A","status":"pending_detachment","fenced":true,"data":{"of":"A","complete":true}}"#,
    );
    assert!(err.contains("s2 under A is pending detachment"), "{err}");
}

/// With the fence on, an incomplete copy that can never be attached again is no source:
/// the only complete copy is newer than declared, a downgrade. Said at once.
#[test]
fn an_older_copy_that_missed_writes_does_not_hide_a_downgrade() {
    let err = refusal(
        "    postgres: {A: 14, B: 14}\n",
        r#"{"id":"s0","version":16,"prefix":"NEW_A","status":"detached","data":{"of":"A","complete":true,"verified":true}},
           {"id":"s1","version":14,"prefix":"B","status":"detached","data":{"of":"A","complete":false,"restored_from":"s0"}}"#,
    );
    assert!(err.contains("every usable copy of its data is on PostgreSQL 16 or newer"), "{err}");
}

/// Issue 14, finding 3: where the exact search runs out of budget, a valid plan by way of
/// a tidy state, labelled as not proven shortest. Three prefixes, an abandoned copy of one
/// under another's temporary prefix, a retired original of another still provisioned.
#[test]
fn when_the_exact_search_runs_out_a_valid_plan_comes_by_way_of_a_tidy_state() {
    let (d, l) = env(
        "    postgres: {A: 16, B: 15, C: 18}\n    upgrade: {strategy: logical, verify: checksums}\n",
        r#"{"id":"s0","version":15,"prefix":"NEW","status":"detached","data":{"of":"B","complete":true}},
           {"id":"s1","version":14,"prefix":"OLD_A","status":"provisioned","data":{"of":"A","complete":true}},
           {"id":"s2","version":16,"prefix":"C","status":"attached"}"#,
    );
    let (ctx, start) = super::rules::Ctx::new(&d, &l).expect("ctx");
    assert!(
        matches!(search::astar(&ctx, &start, search::EXACT_BUDGET), search::Outcome::GaveUp { .. }),
        "the exact search no longer runs out here: pick a harder state"
    );
    let r = plan_env(&d, &l).expect("a plan");
    assert!(!r.proven_shortest);
    let mut prediction = Prediction::new(&d, &l).expect("prediction");
    for (n, step) in r.steps.iter().enumerate() {
        let id = matches!(step.action, Action::Add { .. }).then(|| ServiceId::observed(&format!("n{n}")).expect("id"));
        prediction.advance(&step.action, id).expect("every step is allowed");
    }
    let end = prediction.expected();
    for (prefix, version) in &d.postgres {
        let holder = end.services.iter().find(|s| &s.prefix == prefix).expect("a holder");
        assert_eq!((holder.version, holder.status), (*version, Status::Attached), "{prefix}");
    }
    assert_eq!(end.services.len(), 3, "{:?}", end.services);
}

/// Issue 14, finding 4: with keep_old, the original kept by one upgrade holds OLD; the
/// next upgrade retires its own original under OLD_<major> and keeps both.
#[test]
fn keep_old_upgrades_twice_and_keeps_both_originals() {
    let (d, l) = env(
        "    upgrade: {keep_old: true}\n    postgres: {DEFAULT: 18}\n",
        r#"{"id":"svc-2","version":17,"prefix":"DEFAULT","status":"attached",
            "data":{"of":"DEFAULT","complete":true,"restored_from":"svc-1","verified":true}},
           {"id":"svc-1","version":16,"prefix":"OLD","status":"detached","fenced":true,
            "data":{"of":"DEFAULT","complete":true}}"#,
    );
    let r = plan_env(&d, &l).expect("a plan");
    let steps = short(&r);
    assert!(steps.contains(&"rename svc-2 → OLD_17".to_owned()), "{steps:?}");
    assert!(!steps.iter().any(|s| s.starts_with("delete")), "both originals are kept: {steps:?}");
    assert!(!steps.iter().any(|s| s.contains("svc-1")), "the kept original is left alone: {steps:?}");
}

/// Issue 14, finding 4: a deploy someone made between provision and restore attaches the
/// empty NEW; it is no dataset of its own, and the upgrade goes on.
#[test]
fn an_empty_new_service_attached_by_someone_elses_deploy_is_no_dataset() {
    let (d, l) = env(
        "    postgres: {DEFAULT: 17}\n",
        r#"{"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached"},
           {"id":"n","version":17,"prefix":"NEW","status":"attached"}"#,
    );
    let r = plan_env(&d, &l).expect("a plan");
    let steps = short(&r);
    assert!(steps.contains(&"delete svc-1".to_owned()) && steps.contains(&"deploy".to_owned()), "{steps:?}");
}

/// Issue 14, finding 1: an upgrade stopped after its deploy and before the delete of the
/// original, then the config moves on. The original has been stale since the deploy: the
/// next copy comes from the service the application writes to, fenced, never from the
/// original, and with logical replication too.
#[test]
fn a_retired_original_is_stale_and_never_a_copy_source() {
    let services = r#"{"id":"svc-2","version":17,"prefix":"DEFAULT","status":"attached","fenced":false,
            "data":{"of":"DEFAULT","complete":true,"restored_from":"svc-1","verified":true}},
           {"id":"svc-1","version":16,"prefix":"OLD","status":"detached","fenced":true,
            "data":{"of":"DEFAULT","complete":true,"restored_from":null,"verified":false}}"#;
    for strategy in ["dump_restore", "logical"] {
        let (d, l) = env(&format!("    upgrade: {{strategy: {strategy}}}\n    postgres: {{DEFAULT: 18}}\n"), services);
        let r = plan_env(&d, &l).expect("plan");
        let steps = short(&r);
        assert!(steps.contains(&"fence svc-2".to_owned()), "{strategy}: {steps:?}");
        for step in &steps {
            assert!(
                !(step.starts_with("backup svc-1") || step.contains("from svc-1") || step.contains("against svc-1")),
                "{strategy}: a copy from the stale original: {steps:?}"
            );
        }
        // The copy is taken (or, streaming, caught up) from the fenced svc-2.
        let fence = steps.iter().position(|s| s == "fence svc-2").expect("fence");
        assert!(steps.iter().any(|s| s.contains("from svc-2")), "{strategy}: {steps:?}");
        let done = steps.iter().position(|s| s == "backup svc-2" || s == "catch up +1").expect("the copy completes");
        let delete = steps.iter().position(|s| s == "delete svc-2").expect("svc-2 goes at the end");
        assert!(fence < done && done < delete, "{strategy}: {steps:?}");
    }
}

/// Issue 14, finding 2: an upgrade without fence or verify leaves the application's copy
/// recorded incomplete; turning the fence and verify back on and moving to the next major
/// plans the fenced runbook from that copy rather than reporting a dead end.
#[test]
fn an_unfenced_upgrade_can_be_followed_by_a_fenced_one() {
    let (d, l) = env(
        "    upgrade: {verify: counts}\n    postgres: {DEFAULT: 18}\n",
        r#"{"id":"svc-2","version":17,"prefix":"DEFAULT","status":"attached",
            "data":{"of":"DEFAULT","complete":false,"restored_from":"svc-1","verified":false}}"#,
    );
    let r = plan_env(&d, &l).expect("a plan");
    assert_eq!(
        short(&r),
        [
            "add +1 as NEW (PostgreSQL 18)",
            "provision +1",
            "fence svc-2",
            "backup svc-2",
            "restore +1 from svc-2",
            "verify +1 against svc-2",
            "rename svc-2 → OLD",
            "detach svc-2",
            "rename +1 → DEFAULT",
            "deploy",
            "delete svc-2",
        ]
    );
}

#[test]
fn environments_follow_rollout_then_file_order() {
    let text = "version: 1\nrollout: [live]\nenvironments:\n  a: {postgres: {DEFAULT: 17}}\n  live: {postgres: {DEFAULT: 17}}\n  b: {postgres: {DEFAULT: 17}}\n";
    let config = parse(Path::new("t.yaml"), text).expect("config");
    let report = plan(&config, &Live::empty(), &[]).expect("plan");
    let names: Vec<&str> = report.plan.environments.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["live", "a", "b"]);
    let only = [EnvName::parse("b").expect("name")];
    let report = plan(&config, &Live::empty(), &only).expect("plan");
    assert_eq!(report.plan.environments.len(), 1);
    let unknown = [EnvName::parse("zzz").expect("name")];
    assert!(matches!(plan(&config, &Live::empty(), &unknown), Err(PlanError::UnknownEnvironment(_))));
}

/// With a pooler, a copy inside the outage is inside the pause: the plan says so, for
/// dump_restore, and not for logical, whose copy streams before the fence.
#[test]
fn a_pooler_pausing_through_a_copy_is_warned_of() {
    let warnings = |strategy: &str| {
        let text = format!(
            "version: 1\nprovider:\n  local: {{pooler: pgbouncer}}\nupgrade: {{strategy: {strategy}}}\nenvironments:\n  live: {{postgres: {{DEFAULT: 17}}}}\n"
        );
        let config = parse(Path::new("t.yaml"), &text).expect("config");
        let live: Live = serde_json::from_str(
            r#"{"format_version":1,"environments":{"live":{"services":[{"id":"l","version":16,"prefix":"DEFAULT","status":"attached"}]}}}"#,
        )
        .expect("live");
        plan(&config, &live, &[]).expect("plan").rollout_warnings
    };
    let w = warnings("dump_restore");
    assert!(w.len() == 1 && w[0].contains("only a copy that fits in it can finish"), "{w:?}");
    assert!(warnings("logical").is_empty());
}

#[test]
fn rollout_warns_when_a_later_environment_runs_ahead() {
    let warnings = |rollout: &str, test_major: u32, test_prefix: &str| {
        let text = format!(
            "version: 1\n{rollout}environments:\n  test: {{postgres: {{{test_prefix}: 17}}}}\n  live: {{postgres: {{DEFAULT: 17}}}}\n"
        );
        let config = parse(Path::new("t.yaml"), &text).expect("config");
        let live: Live = serde_json::from_str(&format!(
            r#"{{"format_version":1,"environments":{{
              "test":{{"services":[{{"id":"t","version":{test_major},"prefix":"{test_prefix}","status":"attached"}}]}},
              "live":{{"services":[{{"id":"l","version":16,"prefix":"DEFAULT","status":"attached"}}]}}}}}}"#
        ))
        .expect("live");
        plan(&config, &live, &[]).expect("plan").rollout_warnings
    };
    // Both move to 17 in one change: live would run 17 before test has.
    let w = warnings("rollout: [test, live]\n", 16, "DEFAULT");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("`live` would run DEFAULT on PostgreSQL 17") && w[0].contains("promote through `test`"));
    // Test runs 17 already: the promotion happened.
    assert!(warnings("rollout: [test, live]\n", 17, "DEFAULT").is_empty());
    // The order is the rollout's: with live first, test is the one running ahead.
    let w = warnings("rollout: [live, test]\n", 16, "DEFAULT");
    assert!(w.len() == 1 && w[0].starts_with("`test` would run DEFAULT"), "{w:?}");
    // No rollout, or an earlier environment without that prefix: nothing to promote.
    assert!(warnings("", 16, "DEFAULT").is_empty());
    assert!(warnings("rollout: [test, live]\n", 16, "OTHER").is_empty());
}

mod optimality {
    use super::super::rules::{Ctx, State};
    use super::super::search::{astar, brute_force, Outcome, EXACT_BUDGET};
    use crate::config::{DesiredEnv, Strategy, Upgrade, Verify};
    use crate::model::{Data, EnvLive, EnvName, Major, Prefix, Service, ServiceId, Status};
    use proptest::prelude::*;

    const PREFIXES: [&str; 8] = ["A", "B", "NEW", "OLD", "NEW_A", "OLD_A", "NEW_B", "X"];
    const STATUSES: [Status; 5] =
        [Status::New, Status::Provisioned, Status::Attached, Status::PendingDetachment, Status::Detached];

    fn pfx(s: &str) -> Prefix {
        Prefix::parse(s).expect("prefix")
    }

    prop_compose! {
        fn service()(prefix in 0..PREFIXES.len(), version in 15u32..=17, status in 0..5usize,
                     fenced in any::<bool>(), data in proptest::option::of((0..3usize, any::<bool>(), any::<bool>())))
                     -> (usize, u32, Status, bool, Option<(usize, bool, bool)>) {
            (prefix, version, STATUSES[status], fenced, data)
        }
    }

    prop_compose! {
        pub(super) fn world()(declared in proptest::sample::subsequence(vec![0usize, 1], 1..=2),
                   versions in (15u32..=17, 15u32..=17),
                   services in proptest::collection::vec(service(), 0..=3),
                   fence_writes in any::<bool>(), verify in any::<bool>(), keep_old in any::<bool>(), strategy in 0..4usize,
                   allow_downgrade in any::<bool>(), walk in proptest::collection::vec(any::<prop::sample::Index>(), 0..8))
                   -> (DesiredEnv, EnvLive, Vec<prop::sample::Index>) {
            let names = ["A", "B"];
            let postgres = declared
                .iter()
                .map(|&i| (pfx(names[i]), Major::new(if i == 0 { versions.0 } else { versions.1 }).expect("major")))
                .collect();
            let (strategy, transfer) = super::STRATEGIES[strategy];
            let upgrade = Upgrade {
                strategy,
                transfer,
                fence_writes: fence_writes || strategy == Strategy::Logical,
                verify: if verify { Verify::Counts } else { Verify::None },
                // As the config allows: a kept original must be able to start.
                keep_old: keep_old && !transfer.consumes(),
                // As the config allows: pg_upgrade never downgrades.
                allow_downgrade: allow_downgrade && strategy != Strategy::PgUpgrade,
                ..Upgrade::default()
            };
            let mut live = EnvLive::default();
            for (n, (p, version, status, fenced, data)) in services.into_iter().enumerate() {
                if live.services.iter().any(|s| s.prefix.as_str() == PREFIXES[p]) {
                    continue;
                }
                live.services.push(Service {
                    id: ServiceId::observed(&format!("s{n}")).expect("id"),
                    version: Major::new(version).expect("major"),
                    prefix: pfx(PREFIXES[p]),
                    status,
                    fenced: fenced && status.visible(),
                    data: data.map(|(of, complete, verified)| Data {
                        of: pfx(["A", "B", "X"][of]),
                        complete,
                        restored_from: None,
                        verified,
                        streaming: false,
                    }),
                    consumed_by: None,
                });
            }
            let desired = DesiredEnv { name: EnvName::parse("e").expect("env"), postgres, upgrade };
            (desired, live, walk)
        }
    }

    /// Random valid actions from `start`: the half-done states apply can be left in.
    pub(super) fn wander(ctx: &Ctx, start: &State, walk: &[prop::sample::Index]) -> State {
        let mut st = start.clone();
        for ix in walk {
            let next = ctx.successors(&st);
            if next.is_empty() {
                break;
            }
            st = next[ix.index(next.len())].1.clone();
        }
        st
    }

    fn replay(ctx: &Ctx, start: &State, ops: &[super::super::rules::Op]) -> State {
        let mut st = start.clone();
        for op in ops {
            ctx.check(&st, op).unwrap_or_else(|r| panic!("plan breaks the rules at {op:?}: {r}"));
            st = ctx.effect(&st, op);
        }
        st
    }

    /// Random small worlds, wandered into half-done states: A* must match an exhaustive
    /// search on every one the exhaustive search can finish.
    #[test]
    fn astar_plans_are_valid_and_as_short_as_brute_force() {
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        // The same worlds on every run, so CI is repeatable; PGCONVERGE_EXPLORE=N tries N
        // times as many from a random seed, to look for new counterexamples.
        let explore: u32 = std::env::var("PGCONVERGE_EXPLORE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        let runner_cases = 400 * explore.max(1);
        let config =
            Config { cases: runner_cases, failure_persistence: None, max_shrink_iters: 200, ..Config::default() };
        let mut runner = if explore > 0 {
            TestRunner::new(config)
        } else {
            TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
        };
        let compared = std::cell::Cell::new(0);
        let found = std::cell::Cell::new(0);
        let result = runner.run(&world(), |(desired, live, walk)| {
            let (ctx, start) = Ctx::new(&desired, &live).expect("ctx");
            let start = wander(&ctx, &start, &walk);
            let exhaustive = brute_force(&ctx, &start, 20_000);
            if matches!(exhaustive, Outcome::GaveUp { .. }) {
                return Ok(());
            }
            match (exhaustive, astar(&ctx, &start, EXACT_BUDGET)) {
                (Outcome::Found { cost: want, .. }, Outcome::Found { ops, cost, .. }) => {
                    let end = replay(&ctx, &start, &ops);
                    prop_assert!(ctx.is_goal(&end), "plan does not reach the goal");
                    prop_assert_eq!(ops.len() as u32, cost.0);
                    prop_assert_eq!(cost, want, "A* is not optimal from {:?}", start);
                    prop_assert!(
                        super::super::search::lower_bound(&ctx, &start).len <= want.0,
                        "the bound overestimates"
                    );
                    prop_assert_eq!(
                        super::super::search::lower_bound(&ctx, &end).len,
                        0,
                        "the bound is not zero at the goal"
                    );
                    found.set(found.get() + 1);
                }
                (Outcome::Unreachable { .. }, Outcome::Unreachable { .. }) => {}
                (want, got) => prop_assert!(false, "brute force {:?} but A* {:?} from {:?}", want, got, start),
            }
            compared.set(compared.get() + 1);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        assert!(compared.get() >= runner_cases * 2 / 3, "only {} worlds were small enough to compare", compared.get());
        assert!(found.get() >= runner_cases / 3, "only {} worlds had a plan", found.get());
    }
}

/// The promise itself, as a property: on random worlds wandered into half-done and
/// disturbed states, every plan the search returns is replayed beside a model of the
/// application's writes (before every action, one write through each visible, unfenced
/// holder of a dataset), and the final holder of each dataset must hold
/// every write: those made before the plan (held by whatever copy the rules call complete)
/// and those made while it ran.
mod writes_kept {
    use super::super::rules::{Ctx, Id, Op, State};
    use super::super::search::{plan, Answer};
    use crate::config::{DesiredEnv, Upgrade, Verify};
    use crate::model::{Data, EnvLive, EnvName, Major, Prefix, Service, ServiceId, Status};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const PREFIXES: [&str; 12] =
        ["A", "B", "C", "NEW", "OLD", "NEW_A", "OLD_A", "NEW_B", "OLD_B", "NEW_C", "OLD_C", "X"];
    const STATUSES: [Status; 5] =
        [Status::New, Status::Provisioned, Status::Attached, Status::PendingDetachment, Status::Detached];

    prop_compose! {
        /// Three declared prefixes, each held by an attached original at some major (the
        /// runbook's start), and up to four more services of every kind: leftovers of
        /// earlier upgrades, stale originals, copies made from any of them. Then a random
        /// walk of valid actions: half-done and disturbed runbooks.
        fn world()(versions in proptest::collection::vec(15u32..=17, 3),
                   behind in proptest::collection::vec(0u32..=1, 3),
                   extra in proptest::collection::vec(
                       (0..PREFIXES.len(), 15u32..=17, 0..5usize, any::<bool>(),
                        proptest::option::of((0..4usize, any::<bool>(), proptest::option::of(0..7usize), any::<bool>()))),
                       1..=3),
                   strategy in 0..4usize, verify in any::<bool>(), keep_old in any::<bool>(),
                   walk in proptest::collection::vec(any::<prop::sample::Index>(), 0..14))
                   -> (DesiredEnv, EnvLive, Vec<prop::sample::Index>) {
            let pfx = |s: &str| Prefix::parse(s).expect("prefix");
            let names = ["A", "B", "C"];
            let postgres = names.iter().zip(&versions).map(|(n, v)| (pfx(n), Major::new(*v).expect("major"))).collect();
            let (strategy, transfer) = super::STRATEGIES[strategy];
            let upgrade = Upgrade {
                strategy,
                transfer,
                fence_writes: true,
                verify: if verify { Verify::Counts } else { Verify::None },
                keep_old: keep_old && !transfer.consumes(),
                ..Upgrade::default()
            };
            let mut live = EnvLive::default();
            for ((n, v), behind) in names.iter().zip(&versions).zip(&behind) {
                live.services.push(Service {
                    id: ServiceId::observed(&format!("o{n}")).expect("id"),
                    version: Major::new(v - behind).expect("major"),
                    prefix: pfx(n),
                    status: Status::Attached,
                    fenced: false,
                    data: None,
                    consumed_by: None,
                });
            }
            for (i, (p, version, status, fenced, data)) in extra.into_iter().enumerate() {
                if live.services.iter().any(|s| s.prefix.as_str() == PREFIXES[p]) {
                    continue;
                }
                let ids: Vec<ServiceId> = live.services.iter().map(|s| s.id.clone()).collect();
                let status = STATUSES[status];
                live.services.push(Service {
                    id: ServiceId::observed(&format!("s{i}")).expect("id"),
                    version: Major::new(version).expect("major"),
                    prefix: pfx(PREFIXES[p]),
                    status,
                    fenced: fenced && status.visible(),
                    data: data.map(|(of, complete, from, verified)| Data {
                        of: pfx(["A", "B", "C", "X"][of]),
                        complete,
                        restored_from: from.and_then(|f| ids.get(f).cloned()),
                        verified,
                        streaming: false,
                    }),
                    consumed_by: None,
                });
            }
            let desired = DesiredEnv { name: EnvName::parse("e").expect("env"), postgres, upgrade };
            (desired, live, walk)
        }
    }

    type Writes = BTreeSet<u32>;

    /// What each service (and each backup, and each streaming copy's source) holds.
    #[derive(Default)]
    struct Model {
        held: BTreeMap<Id, Writes>,
        backups: BTreeMap<Id, Writes>,
        next: u32,
        accepted: BTreeMap<u8, Writes>,
    }

    impl Model {
        /// Before the plan: write 0 of each dataset is on its current holder and on every
        /// copy (and backup) the rules call complete; incomplete ones lack it.
        fn start(st: &State) -> Model {
            let mut m = Model { next: 1, ..Model::default() };
            for s in &st.svcs {
                let w = match s.data {
                    Some(d) if d.complete => {
                        m.accepted.entry(d.of).or_default().insert(0);
                        Writes::from([0])
                    }
                    _ => Writes::new(),
                };
                m.held.insert(s.id, w);
                // A backup taken on the way to this state holds what the rules say it does.
                if let Some(b) = s.backup {
                    m.backups.insert(s.id, if b.complete { Writes::from([0]) } else { Writes::new() });
                }
            }
            // A copy that streams holds what its source holds (its initial copy is done,
            // and every change since has followed).
            for s in &st.svcs {
                if let Some(from) = s.data.filter(|d| d.streaming).and_then(|d| d.restored_from) {
                    let w = m.held.get(&from).cloned().unwrap_or_default();
                    m.held.insert(s.id, w);
                }
            }
            m
        }

        /// The application writes once through each service it sees that holds its data
        /// and is not fenced; a copy streaming from that service receives the write too.
        fn write(&mut self, st: &State) {
            // Every visible, unfenced holder: the application may write through any.
            for s in &st.svcs {
                let Some(d) = s.data.filter(|d| s.visible() && !d.streaming) else { continue };
                if s.fenced {
                    continue;
                }
                let w = self.next;
                self.next += 1;
                self.accepted.entry(d.of).or_default().insert(w);
                self.held.entry(s.id).or_default().insert(w);
                for r in
                    st.svcs.iter().filter(|r| r.data.is_some_and(|rd| rd.streaming && rd.restored_from == Some(s.id)))
                {
                    self.held.entry(r.id).or_default().insert(w);
                }
            }
        }

        fn apply(&mut self, op: &Op, after: &State) {
            let get = |m: &BTreeMap<Id, Writes>, id: Id| m.get(&id).cloned().unwrap_or_default();
            match *op {
                Op::Add { .. } => {
                    if let Some(s) = after.svcs.last() {
                        self.held.insert(s.id, Writes::new());
                    }
                }
                Op::Backup { service: id } => {
                    let w = get(&self.held, id);
                    self.backups.insert(id, w);
                }
                Op::Restore { service, from } => {
                    let w = get(&self.backups, from);
                    self.held.insert(service, w);
                }
                Op::Replicate { service, from } | Op::Upgrade { service, from } => {
                    let w = get(&self.held, from);
                    self.held.insert(service, w);
                }
                Op::Delete { service: id } => {
                    self.held.remove(&id);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn every_plan_keeps_every_write() {
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let explore: u32 = std::env::var("PGCONVERGE_EXPLORE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        let cases = 300 * explore.max(1);
        let config = Config { cases, failure_persistence: None, max_shrink_iters: 200, ..Config::default() };
        let mut runner = if explore > 0 {
            TestRunner::new(config)
        } else {
            TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
        };
        let checked = std::cell::Cell::new(0u32);
        let result = runner.run(&world(), |(desired, live, walk)| {
            let (ctx, start) = Ctx::new(&desired, &live).expect("ctx");
            let start = super::optimality::wander(&ctx, &start, &walk);
            let (Answer::Shortest(ops) | Answer::Valid(ops)) = plan(&ctx, &start) else { return Ok(()) };
            let mut model = Model::start(&start);
            let mut st = start.clone();
            for op in &ops {
                model.write(&st);
                st = ctx.effect(&st, op);
                model.apply(op, &st);
            }
            model.write(&st);
            for &(p, _) in &ctx.declared {
                let Some(want) = model.accepted.get(&p) else { continue };
                let holder = st.svcs.iter().find(|s| s.prefix == p).map(|s| s.id);
                let have = holder.and_then(|h| model.held.get(&h)).cloned().unwrap_or_default();
                let lost: Vec<&u32> = want.difference(&have).collect();
                proptest::prop_assert!(
                    lost.is_empty(),
                    "writes {:?} to {} lost by {:?} from {:?}",
                    lost,
                    ctx.prefixes[p as usize],
                    ops,
                    start
                );
            }
            checked.set(checked.get() + 1);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        assert!(checked.get() >= cases / 3, "only {} worlds had a plan to check", checked.get());
    }
}

/// Several prefixes migrating at once share one deploy; the outage starts at the first
/// fence and holds every other fence and all copying and renaming: 7n - 1 actions.
#[test]
fn prefixes_migrating_at_once_share_one_deploy() {
    let names = ["DEFAULT", "ANALYTICS", "CACHE", "SEARCH"];
    for n in 1..=names.len() {
        let mut yaml = String::from("    postgres:\n");
        let mut services = Vec::new();
        for (i, p) in names[..n].iter().enumerate() {
            yaml.push_str(&format!("      {p}: 17\n"));
            services.push(format!(r#"{{"id":"svc-{i}","version":16,"prefix":"{p}","status":"attached"}}"#));
        }
        let (d, l) = env(&yaml, &services.join(","));
        let r = plan_env(&d, &l).expect("plan");
        assert_eq!(r.steps.len(), 10 * n + 1, "{n} prefixes");
        assert_eq!(r.outage_actions as usize, 7 * n - 1, "{n} prefixes");
        let deploys = r.steps.iter().filter(|s| s.action == Action::Deploy).count();
        assert_eq!(deploys, 1);
        if n > 1 {
            let temporary = r
                .steps
                .iter()
                .any(|s| matches!(&s.action, Action::Add { prefix, .. } if prefix.as_str() == "NEW_DEFAULT"));
            assert!(temporary, "several migrating prefixes use NEW_<PREFIX>");
        }
    }
}

/// Regression: a copy whose source was deleted by an earlier upgrade made every later
/// apply stop after its first action, because the prediction named the source "(gone)".
#[test]
fn prediction_matches_a_copy_of_a_deleted_source() {
    let (d, l) = env(
        "    postgres: {DEFAULT: 18}\n",
        r#"{"id":"b","version":17,"prefix":"DEFAULT","status":"attached",
            "data":{"of":"DEFAULT","complete":true,"restored_from":"a","verified":true}}"#,
    );
    let mut p = Prediction::new(&d, &l).expect("prediction");
    let add = Action::Add {
        service: ServiceId::added(1),
        prefix: Prefix::parse("NEW").expect("prefix"),
        version: Major::new(18).expect("major"),
    };
    let expected = p.advance(&add, Some(ServiceId::observed("c").expect("id"))).expect("advance");
    let mut observed = l.clone();
    observed.services.push(crate::model::Service {
        id: ServiceId::observed("c").expect("id"),
        version: Major::new(18).expect("major"),
        prefix: Prefix::parse("NEW").expect("prefix"),
        status: Status::New,
        fenced: false,
        data: None,
        consumed_by: None,
    });
    assert_eq!(differences(&expected, &observed), Vec::<String>::new());
    observed.services[0].fenced = true;
    assert_eq!(differences(&expected, &observed).len(), 1);
}

/// Regression (found by the brute-force comparison): a restore over the only, incomplete
/// copy of A let the shortest plan drop A's data.
#[test]
fn restore_never_overwrites_the_last_copy_of_a_dataset() {
    let (d, l) = env(
        "    upgrade: {fence_writes: false, verify: none, allow_downgrade: true}\n    postgres: {A: 15, B: 15}\n",
        r#"{"id":"s0","version":16,"prefix":"B","status":"attached"},
           {"id":"s2","version":15,"prefix":"OLD","status":"provisioned","data":{"of":"A","complete":false}}"#,
    );
    let r = plan_env(&d, &l).expect("plan");
    assert!(
        !r.steps.iter().any(|s| matches!(&s.action, Action::Restore { service, .. } if service.as_str() == "s2")),
        "{:?}",
        short(&r)
    );
}

/// Regression (found by the brute-force comparison): the bound was not zero in a goal
/// state whose declared prefix holds other data while its own dataset does not exist.
#[test]
fn the_bound_is_zero_at_the_goal() {
    let (d, l) = env(
        "    upgrade: {fence_writes: false, verify: none}\n    postgres: {A: 16}\n",
        r#"{"id":"s0","version":16,"prefix":"A","status":"new","data":{"of":"B","complete":false}},
           {"id":"s1","version":15,"prefix":"B","status":"pending_detachment","data":{"of":"B","complete":true}}"#,
    );
    let r = plan_env(&d, &l).expect("plan");
    assert_eq!(short(&r), ["deploy"]);
}

/// The logical strategy's runbook: the copy streams before the fence, so the outage holds
/// only the catch-up, the verify, the renames and the detach before the deploy: no copy.
#[test]
fn logical_runbook_copies_before_the_fence() {
    let (d, l) = env("    upgrade: {strategy: logical}\n    postgres: {DEFAULT: 17}\n", OLD_ATTACHED);
    let r = plan_env(&d, &l).expect("plan");
    assert_eq!(
        short(&r),
        [
            "add +1 as NEW (PostgreSQL 17)",
            "provision +1",
            "replicate +1 from svc-1",
            "fence svc-1",
            "catch up +1",
            "verify +1 against svc-1",
            "rename svc-1 → OLD",
            "detach svc-1",
            "rename +1 → DEFAULT",
            "deploy",
            "delete svc-1",
        ]
    );
    assert_eq!(r.outage_actions, 5, "one fewer than dump_restore's 6: the copy is no longer inside");
    let inside: Vec<&str> = r.steps.iter().filter(|s| s.in_outage).map(|s| s.action.op_name()).collect();
    assert!(!inside.contains(&"replicate") && !inside.contains(&"backup"), "{inside:?}");
}

/// The pg_upgrade strategy's runbook: one `upgrade` where dump_restore backs up and
/// restores, inside the outage, since pg_upgrade needs the old server stopped.
#[test]
fn pg_upgrade_runbook_upgrades_in_one_action_inside_the_outage() {
    let (d, l) = env("    upgrade: {strategy: pg_upgrade}\n    postgres: {DEFAULT: 17}\n", OLD_ATTACHED);
    let r = plan_env(&d, &l).expect("plan");
    assert_eq!(
        short(&r),
        [
            "add +1 as NEW (PostgreSQL 17)",
            "provision +1",
            "fence svc-1",
            "upgrade +1 from svc-1",
            "verify +1 against svc-1",
            "rename svc-1 → OLD",
            "detach svc-1",
            "rename +1 → DEFAULT",
            "deploy",
            "delete svc-1",
        ]
    );
    assert_eq!(r.outage_actions, 5, "one fewer than dump_restore's 6: backup and restore are one action");
    let (ctx, st) = rules::Ctx::new(&d, &l).expect("ctx");
    let provisioned = |st: &rules::State| {
        let added = ctx.effect(st, &Op::Add { service: Id::Added(1), prefix: 1, version: 17 });
        ctx.effect(&added, &Op::Provision { service: Id::Added(1) })
    };
    let st = provisioned(&st);
    let upgrade = Op::Upgrade { service: Id::Added(1), from: Id::Observed(0) };
    let refused = ctx.check(&st, &upgrade).expect_err("the source takes writes");
    assert!(refused.0.contains("fence it before pg_upgrade stops it"), "{refused}");
}

/// `transfer: link`: the same runbook, the upgrade marked as having no way back. The
/// consumed source holds nothing, cannot be fenced, unfenced, copied from or into, and
/// leaves as the runbook's old server does; verify compares with what it held.
#[test]
fn a_consuming_upgrade_leaves_its_source_nothing_but_the_way_out() {
    let (d, l) =
        env("    upgrade: {strategy: pg_upgrade, transfer: link}\n    postgres: {DEFAULT: 17}\n", OLD_ATTACHED);
    let r = plan_env(&d, &l).expect("plan");
    let shape = short(&r);
    assert_eq!(shape[3], "upgrade +1 from svc-1");
    assert_eq!(shape.len(), 10, "{shape:?}");
    let risks: Vec<_> = r.steps.iter().filter_map(|s| s.risk).collect();
    assert!(risks.contains(&crate::plan::Risk::ConsumesSource), "{risks:?}");
    let (ctx, st) = rules::Ctx::new(&d, &l).expect("ctx");
    let mut st = st;
    for op in [
        Op::Add { service: Id::Added(1), prefix: 1, version: 17 },
        Op::Provision { service: Id::Added(1) },
        Op::Fence { service: Id::Observed(0) },
        Op::Upgrade { service: Id::Added(1), from: Id::Observed(0) },
    ] {
        ctx.check(&st, &op).expect("runbook step");
        st = ctx.effect(&st, &op);
    }
    let old = st.svcs.iter().find(|s| s.id == Id::Observed(0)).expect("old").clone();
    assert_eq!((old.data, old.consumed, old.fenced), (None, Some((0, Id::Added(1))), true));
    let new = st.svcs.iter().find(|s| s.id == Id::Added(1)).expect("new");
    assert!(new.data.is_some_and(|d| d.complete && d.of == 0), "{new:?}");
    let o = Id::Observed(0);
    for (op, why) in [
        (Op::Unfence { service: o }, "can never serve again"),
        (Op::Backup { service: o }, "holds no data"),
        (Op::Fence { service: o }, "not a visible, unfenced service holding data"),
    ] {
        let refused = ctx.check(&st, &op).expect_err(why);
        assert!(refused.0.contains(why), "{op:?}: {refused}");
    }
    ctx.check(&st, &Op::Verify { service: Id::Added(1), against: o }).expect("verify against what it held");
    ctx.check(&st, &Op::Rename { service: o, to: 2 }).expect("retired under OLD, named for what it held");
    // Through the snapshot and back: what apply checks its prediction against.
    let mut p = crate::plan::Prediction::new(&d, &l).expect("prediction");
    for step in &r.steps[..4] {
        p.advance(&step.action, step.action.stand_in()).expect("advance");
    }
    let seen = p.expected();
    let old = seen.services.iter().find(|s| s.id.as_str() == "svc-1").expect("old");
    assert_eq!(old.consumed_by.as_ref().map(|c| c.as_str()), Some("+1"));
    assert_eq!(old.effective_data(), None, "a consumed service holds nothing");
    let (_, again) = rules::Ctx::new(&d, &seen).expect("ctx from the snapshot");
    assert_eq!(again.svcs[0].consumed, Some((0, Id::Observed(1))));
}

/// Half-done logical upgrades: a copy still streaming is caught up, never deployed; its
/// source cannot be deleted under it; a dump_restore config finishes it too.
#[test]
fn a_streaming_copy_is_caught_up_before_anything_depends_on_it() {
    let streaming = r#"{"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached"},
        {"id":"b","version":17,"prefix":"NEW","status":"provisioned",
         "data":{"of":"DEFAULT","complete":false,"restored_from":"svc-1","streaming":true}}"#;
    for strategy in ["logical", "dump_restore"] {
        let (d, l) = env(&format!("    upgrade: {{strategy: {strategy}}}\n    postgres: {{DEFAULT: 17}}\n"), streaming);
        let r = plan_env(&d, &l).expect("plan");
        let s = short(&r);
        assert_eq!(&s[..3], ["fence svc-1", "catch up b", "verify b against svc-1"], "{strategy}: {s:?}");
        assert_eq!(s.len(), 8, "{strategy}: {s:?}");
    }
    let (d, l) = env("    upgrade: {strategy: logical}\n    postgres: {DEFAULT: 17}\n", streaming);
    let (ctx, st) = rules::Ctx::new(&d, &l).expect("ctx");
    assert!(ctx.check(&st, &Op::Deploy).is_err(), "no deploy while a copy streams");
    let mut detached = st.clone();
    let mut other_copy = detached.svcs[0].clone();
    other_copy.id = Id::Added(1);
    detached.svcs.push(other_copy);
    detached.svcs[0].status = Status::Detached;
    let refused = ctx.check(&detached, &Op::Delete { service: Id::Observed(0) }).expect_err("source of a stream");
    assert!(refused.0.contains("streams its copy from"), "{refused}");
    assert!(ctx.check(&st, &Op::CatchUp { service: Id::Observed(1) }).is_err(), "the source still takes writes");
}

/// The strategies, as the property tests draw them: pg_upgrade both leaving its source
/// as it was and consuming it.
const STRATEGIES: [(crate::config::Strategy, crate::config::Transfer); 4] = {
    use crate::config::{Strategy, Transfer};
    [
        (Strategy::DumpRestore, Transfer::Auto),
        (Strategy::Logical, Transfer::Auto),
        (Strategy::PgUpgrade, Transfer::Auto),
        (Strategy::PgUpgrade, Transfer::Link),
    ]
};

#[test]
fn each_strategy_copies_its_own_way_and_logical_needs_the_fence() {
    let (d, l) = env("    postgres: {DEFAULT: 17}\n", OLD_ATTACHED);
    assert!(!short(&plan_env(&d, &l).expect("plan")).iter().any(|s| s.starts_with("replicate")));
    for strategy in ["logical", "pg_upgrade"] {
        let (d, l) =
            env(&format!("    upgrade: {{strategy: {strategy}}}\n    postgres: {{DEFAULT: 17}}\n"), OLD_ATTACHED);
        let steps = short(&plan_env(&d, &l).expect("plan"));
        assert!(!steps.iter().any(|s| s.starts_with("backup") || s.starts_with("restore")), "{strategy}: {steps:?}");
    }
    let text = "version: 1\nupgrade: {strategy: pg_upgrade, allow_downgrade: true}\nenvironments:\n  live:\n    postgres: {DEFAULT: 17}\n";
    let e = parse(Path::new("t.yaml"), text).expect_err("pg_upgrade downgrading");
    assert!(e.to_string().contains("pg_upgrade cannot downgrade"), "{e}");
    let text = "version: 1\nupgrade: {strategy: logical, fence_writes: false}\nenvironments:\n  live:\n    postgres: {DEFAULT: 17}\n";
    let e = parse(Path::new("t.yaml"), text).expect_err("logical without a fence");
    assert!(e.to_string().contains("strategy logical needs fence_writes"), "{e}");
}

/// Found by `PGCONVERGE_EXPLORE`: the outage bound assumed only deletes follow the deploy,
/// so A* renamed an attached service inside the outage where the rename could wait.
#[test]
fn an_attached_service_may_be_renamed_after_the_deploy_outside_the_outage() {
    use super::rules::Ctx;
    use super::search::{astar, brute_force, Outcome, EXACT_BUDGET};
    let live: EnvLive = serde_json::from_str(
        r#"{"services":[
            {"id":"s0","version":16,"prefix":"OLD","status":"attached","fenced":true,
             "data":{"of":"B","complete":false,"restored_from":null,"verified":false}},
            {"id":"s1","version":17,"prefix":"NEW","status":"attached","fenced":false,"data":null}]}"#,
    )
    .expect("live");
    let yaml = "version: 1\nupgrade:\n  fence_writes: false\n  verify: none\n  keep_old: true\n  \
                allow_downgrade: true\nenvironments:\n  e:\n    postgres:\n      A: 17\n      B: 15\n";
    let desired = parse(Path::new("x.yaml"), yaml).expect("config").desired().remove(0);
    let (ctx, st) = Ctx::new(&desired, &live).expect("ctx");
    let (Outcome::Found { cost, .. }, Outcome::Found { cost: want, .. }) =
        (astar(&ctx, &st, EXACT_BUDGET), brute_force(&ctx, &st, 100_000))
    else {
        panic!("no plan");
    };
    assert_eq!(want, (7, 5));
    assert_eq!(cost, want);
}
