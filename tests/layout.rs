//! The layout `src/lib.rs` describes, checked against the code: every top-level module uses
//! only the modules listed below it (no import runs back up, so there is no circle), and the
//! `# Layout` section names every public module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom, as in `src/lib.rs`: each module may use only the ones after it.
const LAYERS: [&str; 14] = [
    "cli",
    "embed",
    "ops",
    "diagnose",
    "serve",
    "proxy",
    "upstream",
    "config",
    "credentials",
    "error",
    "asleep",
    "memory",
    "sync",
    "utc",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`src/proxy/jar.rs` → `proxy`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        name => Some(name.trim_end_matches(".rs").to_owned()),
    }
}

/// The modules named as `crate::NAME` in `text`, comments included (a doc link that runs
/// back up is as misleading as an import).
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        // `credproxy::crate::` cannot happen; `$crate::` and `the_crate::` are not ours.
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let name: String = text[at + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

fn uses() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let used = graph.entry(module.clone()).or_default();
        used.extend(crate_paths(&text).into_iter().filter(|m| *m != module));
    }
    graph
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let graph = uses();
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut wrong = Vec::new();
    for (module, used) in &graph {
        let Some(own) = rank(module) else {
            wrong.push(format!("{module} is not in the layer list"));
            continue;
        };
        for other in used {
            match rank(other) {
                Some(theirs) if theirs > own => {}
                Some(_) => wrong.push(format!("{module} uses {other}, which is above it")),
                None => wrong.push(format!("{module} uses crate::{other}, which is no module")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}\n{graph:#?}", wrong.join("\n"));
    // The list holds what exists, nothing more.
    for layer in LAYERS {
        assert!(graph.contains_key(layer), "no module {layer} under src/");
    }
}

#[test]
fn the_checker_sees_imports_that_run_back_up() {
    let text = "use crate::proxy::Proxy;\nuse super::x;\n// see [`crate::serve::run`]\nlet a = $crate::no; the_crate::no;";
    assert_eq!(
        crate_paths(text),
        BTreeSet::from(["proxy".to_owned(), "serve".to_owned()])
    );
}

#[test]
fn the_layout_section_names_every_public_module() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let (docs, code) = lib.split_once("\n\n#").unwrap_or((&lib, ""));
    for line in code
        .lines()
        .chain(lib.lines().filter(|l| l.starts_with("pub mod")))
    {
        if let Some(name) = line.trim().strip_prefix("pub mod ") {
            let name = name.trim_end_matches(';');
            assert!(
                docs.contains(&format!("[`{name}`]")),
                "lib.rs's layout does not name {name}"
            );
        }
    }
}
