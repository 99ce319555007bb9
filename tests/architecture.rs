//! The module graph has no cycles: a module names (`crate::x`) only modules below it. Read
//! from the sources, comments left out, so a new `use` that closes a cycle fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module → the top-level modules it names, with one place each names it.
fn graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut g: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a component");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(&file).expect("source is UTF-8");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                // `crate::{a::X, b}` names every module of the group.
                let names: Vec<String> = match rest.strip_prefix('{') {
                    Some(group) => group
                        .split(['}', ';'])
                        .next()
                        .unwrap_or("")
                        .split(',')
                        .map(|part| ident(part.trim()))
                        .collect(),
                    None => vec![ident(rest)],
                };
                for name in names {
                    if !name.is_empty() && name != module && name != "self" {
                        g.entry(module.clone())
                            .or_default()
                            .entry(name)
                            .or_insert_with(|| format!("{}:{}", rel.display(), n + 1));
                    }
                }
            }
        }
    }
    g
}

/// The leading identifier of `s` (a module name).
fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
        .collect()
}

#[test]
fn module_graph_has_no_import_cycles() {
    let g = graph();
    assert!(
        g.contains_key("hub") && g.contains_key("core"),
        "the sources were read"
    );
    // Depth-first search; a back edge is a cycle, reported with where each step is named.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<String> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let cycle: Vec<String> = path[at..]
                .iter()
                .zip(path[at + 1..].iter().chain(std::iter::once(&m.to_string())))
                .map(|(a, b)| format!("{a} -> {b} ({})", g[a][b]))
                .collect();
            return Some(cycle.join(", "));
        }
        if !done.insert(m.to_string()) {
            return None;
        }
        path.push(m.to_string());
        for next in g.get(m).into_iter().flat_map(|e| e.keys()) {
            if let Some(c) = visit(next, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(cycle) = visit(m, &g, &mut Vec::new(), &mut done) {
            panic!("import cycle: {cycle}");
        }
    }
}
