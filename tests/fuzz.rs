//! Hostile input to every reader: arbitrary bytes and mutated valid files must give a
//! result or an error, never a panic. (Time is bounded by the readers' size limits and
//! the planner's expansion limit.)

use std::path::Path;

use pgconverge::model::Live;
use pgconverge::plan::Plan;
use pgconverge::{config, plan};
use proptest::prelude::*;

fn example(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)).expect("example")
}

/// Flips, drops, duplicates and inserts bytes of a valid file.
fn mutate(mut bytes: Vec<u8>, edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
    for (at, kind, byte) in edits {
        if bytes.is_empty() {
            bytes.push(*byte);
            continue;
        }
        let i = at.index(bytes.len());
        match kind % 4 {
            0 => bytes[i] = *byte,
            1 => {
                bytes.remove(i);
            }
            2 => bytes.insert(i, *byte),
            _ => bytes.truncate(i),
        }
    }
    bytes
}

fn check_config(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Ok(c) = config::parse(Path::new("fuzz.yaml"), text) {
            let _ = plan::plan(&c, &Live::empty(), &[]);
        }
    }
}

fn check_json(bytes: &[u8]) {
    if let Ok(live) = serde_json::from_slice::<Live>(bytes) {
        let _ = live.validate();
        let _ = live.digest();
    }
    let _ = serde_json::from_slice::<Plan>(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_reader_survives_arbitrary_text(text in "\\PC{0,400}") {
        check_config(text.as_bytes());
    }

    #[test]
    fn config_reader_survives_mutations(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<u8>()), 1..12)) {
        check_config(&mutate(example("pgconverge.yaml"), &edits));
    }

    #[test]
    fn snapshot_and_plan_readers_survive_mutations(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<u8>()), 1..12)) {
        check_json(&mutate(example("live.json"), &edits));
    }

    #[test]
    fn compose_retag_survives_mutations(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<u8>()), 1..12)) {
        let compose = b"# dev\nservices:\n  web:\n    image: app:1\n  db:\n    image: \"postgres:13.5-alpine\" # db\n    ports: [\"5432:5432\"]\nvolumes: {pg: {}}\n";
        let bytes = mutate(compose.to_vec(), &edits);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let major = serde_json::from_str("17").expect("major");
            if let Ok(Some(r)) = pgconverge::localdev::retag(text, "db", major) {
                // An edit changes the one tag and converges.
                prop_assert_eq!(r.text.len() as isize - text.len() as isize, r.to.len() as isize - r.from.len() as isize);
                prop_assert!(matches!(pgconverge::localdev::retag(&r.text, "db", major), Ok(None)));
            }
        }
    }

    #[test]
    fn mutated_snapshots_plan_or_fail_cleanly(edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..1, b'0'..=b'9'), 1..4)) {
        // Digit flips keep the JSON valid: versions and ids change, the planner must cope.
        let bytes = mutate(example("live.json"), &edits);
        if let Ok(live) = serde_json::from_slice::<Live>(&bytes) {
            let text = String::from_utf8(example("pgconverge.yaml")).expect("utf-8");
            let c = config::parse(Path::new("pgconverge.yaml"), &text).expect("config");
            let _ = plan::plan(&c, &live, &[]);
        }
    }
}
