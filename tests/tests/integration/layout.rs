//! The README's claims about the code's own shape ("Architecture", "Layout"), read from the
//! sources with a Rust parser: the agent's modules import downwards only (no cycle, `node` and
//! `dataplane` never import each other, the reconciler knows neither, `model` and `sinks` at
//! the bottom), and the eBPF crate holds each hook's entry points in one file of its own that
//! nothing below imports, over modules without a cycle either. Paths written inside macro
//! invocations are not parsed, and so not counted.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, ensure};
use syn::visit::{self, Visit};

/// A crate's modules (the files and directories under `src/` but the crate roots), each with
/// the modules it names through `crate::`.
type Imports = BTreeMap<String, BTreeSet<String>>;

const CRATE_ROOTS: [&str; 2] = ["lib", "main"];
/// The eBPF crate's hook files and the attributes that make a function an entry point.
const EBPF_HOOKS: [&str; 4] = ["bridge", "container", "uplink", "vtep"];
const ENTRY_POINTS: [&str; 2] = ["classifier", "xdp"];

#[test]
fn the_agent_s_modules_import_downwards_only() -> Result<()> {
    let imports = module_imports(&source_dir("overlay-agent"))?;
    ensure_no_cycle(&imports)?;
    for (module, forbidden) in [
        ("node", ["dataplane", "reconcile"].as_slice()),
        ("dataplane", &["node", "reconcile"]),
        ("reconcile", &["node", "dataplane"]),
    ] {
        let named = named_by(&imports, module)?;
        for other in forbidden {
            ensure!(!named.contains(*other), "{module} imports {other}");
        }
    }
    for (module, allowed) in [("model", ["mac"].as_slice()), ("sinks", &["model"])] {
        let named = named_by(&imports, module)?;
        ensure!(
            named.iter().all(|other| allowed.contains(&other.as_str())),
            "{module} is at the bottom, yet imports {named:?}"
        );
    }
    Ok(())
}

#[test]
fn each_ebpf_hook_has_one_file_that_nothing_below_imports() -> Result<()> {
    let dir = source_dir("overlay-ebpf");
    let imports = module_imports(&dir)?;
    ensure_no_cycle(&imports)?;
    for module in imports.keys() {
        let entry_points = entry_points_of(&dir, module)?;
        let hook = EBPF_HOOKS.contains(&module.as_str());
        ensure!(
            hook != entry_points.is_empty(),
            "{module}: entry points {entry_points:?}, yet {} a hook file",
            if hook { "is" } else { "not" }
        );
        if !hook {
            let named = named_by(&imports, module)?;
            ensure!(
                named
                    .iter()
                    .all(|other| !EBPF_HOOKS.contains(&other.as_str())),
                "{module} imports a hook file: {named:?}"
            );
        }
    }
    Ok(())
}

fn source_dir(package: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(package)
        .join("src")
}

fn named_by<'a>(imports: &'a Imports, module: &str) -> Result<&'a BTreeSet<String>> {
    imports
        .get(module)
        .with_context(|| format!("no module {module} among {:?}", imports.keys()))
}

/// The modules of the crate whose sources are in `dir`, each with the other modules it names.
fn module_imports(dir: &Path) -> Result<Imports> {
    let mut files = Vec::new();
    rust_files(dir, &mut files)?;
    let module_of = |file: &Path| -> Option<String> {
        let first = file.strip_prefix(dir).ok()?.components().next()?;
        let name = first.as_os_str().to_str()?;
        let name = name.strip_suffix(".rs").unwrap_or(name);
        (!CRATE_ROOTS.contains(&name)).then(|| name.to_string())
    };
    let mut imports = Imports::new();
    for file in &files {
        if let Some(module) = module_of(file) {
            imports.entry(module).or_default();
        }
    }
    let modules: BTreeSet<String> = imports.keys().cloned().collect();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let mut named = CratePaths::default();
        named.visit_file(&parse(file)?);
        let named: Vec<String> = named
            .0
            .into_iter()
            .filter(|other| *other != module && modules.contains(other))
            .collect();
        imports.entry(module).or_default().extend(named);
    }
    Ok(imports)
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, files)?;
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
    Ok(())
}

fn parse(file: &Path) -> Result<syn::File> {
    let source =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    syn::parse_file(&source).with_context(|| format!("cannot parse {}", file.display()))
}

/// The names that follow `crate::`, in paths and in `use` trees.
#[derive(Default)]
struct CratePaths(BTreeSet<String>);

impl<'ast> Visit<'ast> for CratePaths {
    fn visit_path(&mut self, path: &'ast syn::Path) {
        let mut segments = path.segments.iter();
        if segments.next().is_some_and(|first| first.ident == "crate")
            && let Some(next) = segments.next()
        {
            self.0.insert(next.ident.to_string());
        }
        visit::visit_path(self, path);
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        if let syn::UseTree::Path(path) = &item.tree
            && path.ident == "crate"
        {
            first_names(&path.tree, &mut self.0);
        }
    }
}

/// The first name of each path in `tree`: `{a::b, c}` gives `a` and `c`.
fn first_names(tree: &syn::UseTree, names: &mut BTreeSet<String>) {
    match tree {
        syn::UseTree::Path(path) => names.insert(path.ident.to_string()),
        syn::UseTree::Name(name) => names.insert(name.ident.to_string()),
        syn::UseTree::Rename(rename) => names.insert(rename.ident.to_string()),
        syn::UseTree::Glob(_) => false,
        syn::UseTree::Group(group) => {
            group.items.iter().for_each(|tree| first_names(tree, names));
            false
        }
    };
}

/// Fails naming the first import cycle among `imports`' modules, if there is one.
fn ensure_no_cycle(imports: &Imports) -> Result<()> {
    let mut done = BTreeSet::new();
    for module in imports.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = find_cycle(imports, module, &mut path, &mut done) {
            anyhow::bail!("an import cycle: {}", cycle.join(" -> "));
        }
    }
    Ok(())
}

/// Depth first from `module`, with `path` the modules on the way there; returns a cycle met.
fn find_cycle(
    imports: &Imports,
    module: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(start) = path.iter().position(|seen| seen == module) {
        let mut cycle = path[start..].to_vec();
        cycle.push(module.to_string());
        return Some(cycle);
    }
    if done.contains(module) {
        return None;
    }
    path.push(module.to_string());
    for other in imports.get(module).into_iter().flatten() {
        if let Some(cycle) = find_cycle(imports, other, path, done) {
            return Some(cycle);
        }
    }
    path.pop();
    done.insert(module.to_string());
    None
}

/// The functions of `module` (its file, or the files of its directory) marked as entry points.
fn entry_points_of(dir: &Path, module: &str) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let directory = dir.join(module);
    if directory.is_dir() {
        rust_files(&directory, &mut files)?;
    } else {
        files.push(dir.join(format!("{module}.rs")));
    }
    let mut entry_points = Vec::new();
    for file in files {
        for item in parse(&file)?.items {
            if let syn::Item::Fn(function) = item
                && function.attrs.iter().any(|attribute| {
                    ENTRY_POINTS
                        .iter()
                        .any(|name| attribute.path().is_ident(name))
                })
            {
                entry_points.push(function.sig.ident.to_string());
            }
        }
    }
    Ok(entry_points)
}
