//! The layering of `trainer/src`, checked: ARCHITECTURE.md's table "Layers of
//! `trainer/src`" lists every top-level module (a file or a folder) in one layer, top to
//! bottom; a module may import (`crate::NAME`) from its own layer and the layers below,
//! never from one above, and no modules import each other in a circle. A new module has
//! to be placed in the table; an import that runs back up fails here with the file and
//! line. Test code (`#[cfg(test)]` modules) is not checked.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::common::repo;

/// Module -> its layer (0 = top), from the table in ARCHITECTURE.md.
fn layer_table() -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).unwrap();
    let start = text.find("## Layers of `trainer/src`").expect("ARCHITECTURE.md has no \"## Layers of `trainer/src`\" section");
    let mut layers = BTreeMap::new();
    let mut row = 0;
    for line in text[start..].lines().skip(1).skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 2 || cells[0] == "layer" || cells[0].starts_with("---") {
            continue;
        }
        for m in cells[1].split(',').map(|m| m.trim().trim_matches('`').trim_end_matches('/').trim_end_matches(".rs")) {
            assert!(layers.insert(m.to_string(), row).is_none(), "{m} is in two layers of the table");
        }
        row += 1;
    }
    assert!(row > 3, "the layer table was not found or is empty");
    layers
}

/// The top-level modules of `trainer/src` (lib.rs and main.rs as `main`).
fn modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            match (e.path().is_dir(), name.strip_suffix(".rs")) {
                (true, _) => Some(name),
                (false, Some("lib")) => None,
                (false, Some(stem)) => Some(stem.to_string()),
                (false, None) => None,
            }
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without its `#[cfg(test)]` module (by convention the file's last item).
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Every `crate::NAME` a line names, with `use crate::{a, b::c}` groups expanded.
fn crate_refs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first path segment of each item at the group's own brace depth.
            let (mut depth, mut at_item, mut name) = (0usize, true, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_item = true,
                    c if at_item && (c.is_alphanumeric() || c == '_') => name.push(c),
                    _ if at_item && !name.is_empty() => {
                        out.push(std::mem::take(&mut name));
                        at_item = false;
                    }
                    _ => {}
                }
            }
            if !name.is_empty() {
                out.push(name);
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.push(name);
        }
    }
    out
}

#[test]
fn no_module_of_trainer_src_imports_from_a_layer_above_its_own() {
    let src = repo().join("trainer/src");
    let table = layer_table();
    let present = modules(&src);
    let listed: BTreeSet<String> = table.keys().cloned().collect();
    let unplaced: Vec<_> = present.difference(&listed).collect();
    assert!(unplaced.is_empty(), "modules missing from ARCHITECTURE.md's layer table: {unplaced:?}");
    let gone: Vec<_> = listed.difference(&present).collect();
    assert!(gone.is_empty(), "the layer table lists modules that do not exist: {gone:?}");

    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in without_tests(&text).lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for target in crate_refs(code) {
                let Some(&to) = table.get(&target) else { continue };
                if target != module {
                    edges.entry(module.clone()).or_default().insert(target.clone());
                }
                if target != module && to < table[&module] {
                    violations.push(format!("trainer/src/{}:{}: `{module}` (layer {}) imports `{target}` (layer {to})", rel.display(), n + 1, table[&module]));
                }
            }
        }
    }
    assert!(violations.is_empty(), "imports that do not run down the layers of ARCHITECTURE.md:\n{}", violations.join("\n"));
    if let Some(circle) = find_circle(&edges) {
        panic!("modules that import each other in a circle: {}", circle.join(" -> "));
    }
}

/// A circle in the module graph, if there is one (depth-first search).
fn find_circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(n: &str, edges: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut circle = path[i..].to_vec();
            circle.push(n.to_string());
            return Some(circle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for next in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges.keys().find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

#[test]
fn the_checker_sees_grouped_and_nested_imports_and_circles() {
    let edges: BTreeMap<String, BTreeSet<String>> =
        [("a", "b"), ("b", "c"), ("c", "a")].iter().map(|(x, y)| (x.to_string(), BTreeSet::from([y.to_string()]))).collect();
    assert_eq!(find_circle(&edges).unwrap().len(), 4);
    assert_eq!(crate_refs("use crate::{engine::{Run, RunOptions}, jobs};"), vec!["engine", "jobs"]);
    assert_eq!(crate_refs("let x = crate::jobs::on_step(1); crate::engine::train()"), vec!["jobs", "engine"]);
}
