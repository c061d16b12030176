//! The library's modules form no import cycle: each `crate::<module>` path
//! (outside comments and test modules) is an edge, and the graph must be acyclic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Items re-exported at the crate root, by the module that defines them.
const ROOT_ITEMS: &[(&str, &str)] = &[
    ("Cache", "cache"),
    ("Config", "config"),
    ("ServerSpec", "config"),
    ("CacheConfig", "config"),
    ("Error", "error"),
    ("Result", "error"),
    ("Invalidator", "invalidate"),
    ("Removed", "invalidate"),
    ("RemovedItem", "invalidate"),
    ("CacheTags", "layer"),
    ("SkipCache", "layer"),
    ("PageBody", "layer"),
    ("PageCache", "layer"),
    ("PageCacheLayer", "layer"),
    ("Bypass", "policy"),
    ("CacheStats", "stats"),
    ("ServerStats", "stats"),
    ("IndexUsage", "stats"),
    ("BypassCount", "stats"),
    ("ServerReport", "stats"),
];

fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("file under src");
    let first = relative
        .components()
        .next()
        .expect("non-empty path")
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    first.trim_end_matches(".rs").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crate::x` paths in code (not comments, not `#[cfg(test)]` modules).
fn dependencies(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut deps = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        for (i, _) in line.match_indices("crate::") {
            let name: String = line[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let module = ROOT_ITEMS
                .iter()
                .find(|(item, _)| *item == name)
                .map_or(name.clone(), |(_, module)| (*module).to_owned());
            deps.insert(module);
        }
    }
    deps
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" || module == "reference_tests" {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read source");
        let mut deps = dependencies(&text);
        deps.remove(&module);
        graph.entry(module).or_default().extend(deps);
    }
    assert!(graph.contains_key("put") && graph.contains_key("lock"));
    assert!(
        graph["lock"].is_empty(),
        "lock.rs must stay a leaf: {:?}",
        graph["lock"]
    );
    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(start) = path.iter().position(|n| n == node) {
            panic!("import cycle: {} -> {node}", path[start..].join(" -> "));
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node.to_owned());
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done);
    }
}
