//! The agent's modules import downwards only, and the eBPF crate's modules never import each
//! other both ways: read from the sources, so a new arrow that points back up fails here
//! rather than in a review. Unit tests (the `mod tests` a file ends with) are left out.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Imports the design forbids: (importer, imported).
const FORBIDDEN: [(&str, &str); 11] = [
    ("node", "dataplane"),
    ("dataplane", "node"),
    ("node", "options"),
    ("dataplane", "options"),
    ("node", "reconcile"),
    ("dataplane", "reconcile"),
    ("subnet", "node"),
    ("subnet", "dataplane"),
    ("reconcile", "node"),
    ("reconcile", "dataplane"),
    ("model", "subnet"),
];

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("the crate's sources are readable") {
        let path = entry.expect("a readable directory entry").path();
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
    files
}

/// A file's code without its unit tests (the `mod tests` every file ends with) and comments.
fn code_of(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("a readable source file");
    let code = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    code.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `code` names through `crate::`, in paths and in `use crate::{…}`
/// groups.
fn crate_imports(code: &str) -> BTreeSet<String> {
    let mut imported = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            imported.extend(group_heads(group));
        } else {
            imported.insert(identifier(rest));
        }
    }
    imported.retain(|name| !name.is_empty());
    imported
}

/// The first path segment of every item of a `{…}` group, up to its closing brace.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let (mut depth, mut item_start) = (0, true);
    for (at, character) in group.char_indices() {
        match character {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            _ if item_start && !character.is_whitespace() => {
                heads.push(identifier(&group[at..]));
                item_start = false;
            }
            _ => {}
        }
    }
    heads
}

fn identifier(text: &str) -> String {
    text.chars()
        .take_while(|character| character.is_alphanumeric() || *character == '_')
        .collect()
}

/// The top-level module of `path` in the crate whose sources are under `src`; none for the
/// crate root.
fn top_module(src: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// Each top-level module of the crate at `src` with the top-level modules it imports.
fn module_graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    for path in sources(src) {
        let Some(module) = top_module(src, &path) else {
            continue;
        };
        let imports = crate_imports(&code_of(&path));
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(imports.into_iter().filter(|imported| *imported != module));
    }
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_from(graph: &Graph, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((module, path)) = stack.pop() {
        for next in graph.get(&module).into_iter().flatten() {
            if next == start {
                return Some([path.clone(), vec![next.clone()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
            }
        }
    }
    None
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

#[test]
fn the_agent_s_modules_import_downwards_only() {
    let graph = module_graph(&crate_src("overlay-agent"));
    assert!(
        graph
            .get("node")
            .is_some_and(|imports| imports.contains("model")),
        "the graph is read: node builds on model\n{graph:#?}"
    );
    for (importer, imported) in FORBIDDEN {
        assert!(
            !graph
                .get(importer)
                .is_some_and(|imports| imports.contains(imported)),
            "{importer} imports {imported}\n{graph:#?}"
        );
    }
    for module in graph.keys() {
        assert_eq!(cycle_from(&graph, module), None, "{graph:#?}");
    }
}

#[test]
fn the_ebpf_crate_s_modules_form_no_cycle() {
    let graph = module_graph(&crate_src("overlay-ebpf"));
    assert!(
        graph
            .get("container")
            .is_some_and(|imports| imports.contains("encap")),
        "the graph is read: the container hook encapsulates\n{graph:#?}"
    );
    for module in graph.keys() {
        assert_eq!(cycle_from(&graph, module), None, "{graph:#?}");
    }
}

#[test]
fn the_reader_finds_a_cycle_and_a_group_import() {
    let code = "use crate::{a::b, c::{d, e}};\nfn f() { crate::g::h(); }";
    assert_eq!(
        crate_imports(code),
        BTreeSet::from(["a".into(), "c".into(), "g".into()])
    );
    let graph = Graph::from([
        ("a".into(), BTreeSet::from(["b".into()])),
        ("b".into(), BTreeSet::from(["a".into()])),
    ]);
    assert_eq!(
        cycle_from(&graph, "a"),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
}
