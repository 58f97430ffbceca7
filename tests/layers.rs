//! The crate's modules import one another in one direction (docs/architecture.md): no
//! module reaches, directly or through others, back into one that imports it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code names as `crate::<module>`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read src").flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src");
            let first = rel.components().next().expect("a name").as_os_str().to_string_lossy();
            let module = first.trim_end_matches(".rs").to_owned();
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            let deps = graph.entry(module.clone()).or_default();
            for line in text.lines().map(|l| l.split("//").next().unwrap_or("")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String =
                        line[i + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                    if !name.is_empty() && name != module {
                        deps.insert(name);
                    }
                }
            }
        }
    }
    graph
}

/// A path `from` → … → `to` through the graph, if there is one.
fn path(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut queue = vec![vec![from.to_owned()]];
    while let Some(route) = queue.pop() {
        let last = route.last().expect("non-empty").clone();
        for next in graph.get(&last).into_iter().flatten() {
            let mut longer = route.clone();
            longer.push(next.clone());
            if next == to {
                return Some(longer);
            }
            if seen.insert(next.clone()) {
                queue.push(longer);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let graph = imports();
    assert!(graph.len() >= 10 && graph.contains_key("plan") && graph.contains_key("provider"), "{graph:?}");
    assert!(graph["apply"].contains("provider"), "the scan finds imports: {graph:?}");
    let circles: Vec<String> = graph.keys().filter_map(|m| path(&graph, m, m)).map(|route| route.join(" → ")).collect();
    assert!(circles.is_empty(), "import circles: {circles:#?}");
}

#[test]
fn the_pure_core_touches_no_effect() {
    let graph = imports();
    let effects = ["apply", "cli", "state", "provider", "process", "binaries", "atomic", "interrupt", "progress"];
    for pure in ["model", "config", "plan", "render", "ledger", "init"] {
        let wrong: Vec<&&str> = effects.iter().filter(|e| graph[pure].contains(**e)).collect();
        assert!(wrong.is_empty(), "{pure} imports {wrong:?}");
    }
}
