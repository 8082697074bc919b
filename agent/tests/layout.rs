//! The code's shape, checked: module dependencies in both crates form no cycle, `main.rs` is
//! only argument parsing, the one fake API server lives under `agent/src/testing/`, and the
//! README's layout and "where things live" table describe the tree as it is.
//!
//! The module graph is read from the source text (no `cargo-modules`, which would need a
//! rust-analyzer build in CI): a module depends on another when its non-test code names a
//! path into it (`crate::a::b`, `super::b`, or a child module `b::`). Test code (`#[cfg(test)]`
//! items, `tests.rs` files, the `testing` module) is left out: tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every `.rs` file under `dir`, relative to the repository, sorted.
fn rust_files(dir: &str) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let root = repo().canonicalize().unwrap();
    let mut out = Vec::new();
    let start = root.join(dir);
    if start.exists() {
        walk(&root, &start, &mut out);
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// A small lexer: code with comments removed and string/char contents blanked
// ---------------------------------------------------------------------------------------------

/// The source with comments deleted and the insides of string and char literals replaced
/// by spaces, so braces and paths in them are not mistaken for code.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && !ident_before(b, i)
        {
            // Raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c as char);
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            out.push_str("\"\"");
            i = j + close.len();
        } else if c == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                if b[j] == b'\\' {
                    j += 1;
                }
                if b[j] == b'\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j + 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{1F}') or a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..].iter().position(|&x| x == b'\'').map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    out.push_str("' '");
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    out
}

fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// The code without `#[cfg(test)]` / `#[cfg(any(test, ...))]` items.
fn without_test_items(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(").filter(|_| true) {
        let attr_end = rest[at..].find(']').map(|p| at + p + 1).unwrap();
        let attr = &rest[at..attr_end];
        if !(attr == "#[cfg(test)]" || attr.starts_with("#[cfg(any(test")) {
            out.push_str(&rest[..attr_end]);
            rest = &rest[attr_end..];
            continue;
        }
        out.push_str(&rest[..at]);
        // Skip the item: up to its `;` or through its balanced `{...}`, whichever comes first.
        let item = &rest[attr_end..];
        let semi = item.find(';').unwrap_or(item.len());
        let brace = item.find('{').unwrap_or(item.len());
        let end = if semi < brace {
            semi + 1
        } else {
            let mut depth = 0;
            let mut end = item.len();
            for (k, ch) in item[brace..].char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = brace + k + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            end
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Module graph
// ---------------------------------------------------------------------------------------------

/// `crate::a::b` style module path of a source file of a library rooted at `src`.
fn module_of(src: &str, file: &str) -> Option<String> {
    let rel = file.strip_prefix(src)?.strip_suffix(".rs")?;
    if rel == "lib" {
        return Some("crate".into());
    }
    if rel == "main" || rel.starts_with("bin/") {
        return None;
    }
    let rel = rel.strip_suffix("/mod").unwrap_or(rel);
    Some(format!("crate::{}", rel.replace('/', "::")))
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Expands a use tree starting at `s` (`a::b::{c, d::e}`) into full paths, and returns how
/// many bytes it spans.
fn paths_at(s: &str) -> (Vec<String>, usize) {
    let b = s.as_bytes();
    let mut i = 0;
    let mut prefix = String::new();
    loop {
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        if i == start {
            break;
        }
        if !prefix.is_empty() {
            prefix.push_str("::");
        }
        prefix.push_str(&s[start..i]);
        if s[i..].starts_with("::") {
            i += 2;
            if s[i..].starts_with('{') {
                // A group: split at top-level commas.
                let mut depth = 0;
                let mut item_start = i + 1;
                let mut out = Vec::new();
                let mut j = i;
                while j < b.len() {
                    match b[j] {
                        b'{' => depth += 1,
                        b'}' | b',' if depth == 1 => {
                            let item = s[item_start..j].trim();
                            if !item.is_empty() {
                                let (sub, _) = paths_at(item);
                                out.extend(sub.into_iter().map(|p| format!("{prefix}::{p}")));
                            }
                            item_start = j + 1;
                            if b[j] == b'}' {
                                return (out, j + 1);
                            }
                        }
                        b'}' => depth -= 1,
                        _ => {}
                    }
                    j += 1;
                }
                return (out, j);
            }
            continue;
        }
        break;
    }
    (vec![prefix], i)
}

/// The deepest module in `modules` that `path` (absolute, `crate::...`) names.
fn resolve(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let segs: Vec<&str> = path.split("::").collect();
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|p| modules.contains(p))
}

/// Module dependency edges of the library at `src` (e.g. `agent/src/`).
fn module_graph(src: &str) -> BTreeMap<String, BTreeSet<String>> {
    let files: Vec<(String, String)> = rust_files(src)
        .into_iter()
        .filter(|f| !f.ends_with("/tests.rs") && !f.contains("/testing"))
        .filter_map(|f| module_of(src, &f).map(|m| (m, f)))
        .collect();
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &files {
        let code = without_test_items(&code_only(&read(&repo().join(file))));
        let parent = module.rsplit_once("::").map(|(p, _)| p.to_owned());
        let children: BTreeSet<&str> = modules
            .iter()
            .filter_map(|m| m.strip_prefix(&format!("{module}::")))
            .filter(|rest| !rest.contains("::"))
            .collect();
        let b = code.as_bytes();
        let deps = graph.entry(module.clone()).or_default();
        let mut i = 0;
        while i < b.len() {
            if !is_ident(b[i]) || (i > 0 && (is_ident(b[i - 1]) || b[i - 1] == b':')) {
                i += 1;
                continue;
            }
            let (paths, len) = paths_at(&code[i..]);
            for p in paths {
                let absolute = if p == "super" {
                    parent.clone()
                } else if let Some(rest) = p.strip_prefix("super::") {
                    parent.as_ref().map(|par| format!("{par}::{rest}"))
                } else if p.starts_with("crate::") {
                    Some(p.clone())
                } else if let Some(rest) = p.strip_prefix("self::") {
                    Some(format!("{module}::{rest}"))
                } else if children.contains(p.split("::").next().unwrap()) && p.contains("::") {
                    Some(format!("{module}::{p}"))
                } else {
                    None
                };
                if let Some(target) = absolute.and_then(|a| resolve(&a, &modules)) {
                    if &target != module {
                        deps.insert(target);
                    }
                }
            }
            i += len.max(1);
        }
    }
    graph
}

/// A cycle in `graph`, if there is one, as the list of modules around it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(n.to_owned(), Mark::Active);
        stack.push(n.to_owned());
        for next in graph.get(n).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Active => {
                    let from = stack.iter().position(|s| s == next).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(next, graph, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(n.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in graph.keys() {
        if marks.get(n).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(n, graph, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn module_dependencies_have_no_cycle_in_either_crate() {
    for src in ["agent/src/", "runtime/src/"] {
        let graph = module_graph(src);
        assert!(graph.len() > 5, "{src}: found only {:?}", graph.keys());
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{src}: module cycle {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_agent_layers_point_one_way() {
    let graph = module_graph("agent/src/");
    let layer = |m: &str| -> u8 {
        match m.split("::").nth(1).unwrap_or("") {
            "" => 6, // lib.rs declares modules only
            "cmd" => 5,
            "node" | "controller" => 4,
            "http" => 3,
            "metrics" | "health" | "telemetry" | "payload" => 2,
            "crd" => 1,
            other => panic!("{m}: top-level module {other} has no layer; add it here"),
        }
    };
    for (from, deps) in &graph {
        for to in deps {
            let same_top = from.split("::").nth(1) == to.split("::").nth(1);
            assert!(
                same_top || layer(from) > layer(to),
                "{from} depends on {to}: dependencies must point from cmd to node/controller to \
                 http to metrics/health/telemetry/payload to crd, never back, and never between \
                 node and controller"
            );
        }
    }
}

/// The checker itself: a cycle through `super::` and one through `crate::` are found, test
/// code and strings are not read as dependencies.
#[test]
fn the_cycle_checker_sees_cycles_and_ignores_tests_and_strings() {
    let code = r##"
use crate::a::b;
let s = "crate::c::d {";
let r = r#"crate::e"#;
// crate::f
#[cfg(test)]
mod tests { use crate::g; }
"##;
    let cleaned = without_test_items(&code_only(code));
    assert!(cleaned.contains("crate::a::b"), "{cleaned}");
    for gone in ["crate::c", "crate::e", "crate::f", "crate::g"] {
        assert!(!cleaned.contains(gone), "{gone} in {cleaned}");
    }
    assert_eq!(paths_at("a::{b, c::{d, e}}, x").0, ["a::b", "a::c::d", "a::c::e"]);
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("crate::a", vec!["crate::b"]),
        ("crate::b", vec!["crate::c"]),
        ("crate::c", vec!["crate::a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        find_cycle(&g).unwrap(),
        ["crate::a", "crate::b", "crate::c", "crate::a"]
    );
}

#[test]
fn main_rs_only_parses_arguments_and_dispatches() {
    let main = code_only(&read(&repo().join("agent/src/main.rs")));
    for line in main.lines() {
        let t = line.trim_start();
        assert!(
            !(t.starts_with("mod ") || t.starts_with("pub mod ")),
            "main.rs declares a module ({t}): code belongs in the library"
        );
    }
    assert!(
        main.lines().filter(|l| l.starts_with("fn ")).count() <= 4,
        "main.rs grew functions beyond main and its exit-code helpers"
    );
}

#[test]
fn the_fake_api_server_lives_only_under_testing() {
    let mut offenders = Vec::new();
    for dir in ["agent", "runtime"] {
        for file in rust_files(dir) {
            if file.starts_with("agent/src/testing") || file == "agent/tests/layout.rs" {
                continue;
            }
            let text = read(&repo().join(&file));
            for needle in ["mock::pair", "tower_test::", "next_request()"] {
                if text.contains(needle) {
                    offenders.push(format!("{file}: {needle}"));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "fake API server code outside agent/src/testing: {offenders:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// README
// ---------------------------------------------------------------------------------------------

/// The fenced block under `## Layout` of the README.
fn readme_section(heading: &str) -> String {
    let readme = read(&repo().join("README.md"));
    let start = readme
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README has no `## {heading}` section"));
    let rest = &readme[start + heading.len() + 5..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    rest[..end].to_owned()
}

#[test]
fn readme_layout_lists_exactly_the_rust_files_of_the_tree() {
    let section = readme_section("Layout");
    let listed: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.ends_with(".rs"))
        .map(str::to_owned)
        .collect();
    let actual: BTreeSet<String> = ["agent", "runtime"].iter().flat_map(|d| rust_files(d)).collect();
    let missing: Vec<_> = actual.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&actual).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "README `## Layout` is not the tree: not listed {missing:?}; listed but absent {stale:?}"
    );
}

/// `(name, file)` rows of the "Where things live" table.
fn where_things_live() -> Vec<(String, String)> {
    readme_section("Where things live")
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            assert!(cells.len() >= 3, "row {l:?}: expected | name | what | file |");
            let unquote = |s: &str| s.trim_matches('`').to_owned();
            (unquote(cells[0]), unquote(cells[cells.len() - 1]))
        })
        .collect()
}

#[test]
fn every_where_things_live_row_points_at_the_file_that_defines_the_name() {
    let rows = where_things_live();
    assert!(rows.len() > 30, "{} rows", rows.len());
    let mut wrong = Vec::new();
    for (name, file) in &rows {
        let path = repo().join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            wrong.push(format!("{name}: {file} does not exist"));
            continue;
        };
        // `usernsguard.io/userns.<handler>` is defined by its prefix.
        let needle = name.split('<').next().unwrap();
        if !text.contains(needle) {
            wrong.push(format!("{name}: {file} does not contain {needle:?}"));
        }
    }
    assert!(wrong.is_empty(), "README \"Where things live\": {wrong:#?}");
}

#[test]
fn where_things_live_has_a_row_for_every_name_the_code_defines() {
    use usernsguard_agent::crd::names;
    use usernsguard_runtime::{Check, Reason};
    let names_listed: BTreeSet<String> = where_things_live().into_iter().map(|(n, _)| n).collect();
    let mut expected: Vec<String> = Vec::new();
    expected.extend(Reason::ALL.iter().map(|r| r.as_str().to_owned()));
    expected.extend(Check::ALL.iter().map(|c| c.as_str().to_owned()));
    expected.extend(["RuntimeProfile", "SelfTest", "NodeReport"].map(String::from));
    expected.push(format!("{}<handler>", names::USERNS_LABEL_PREFIX));
    expected.push(format!("{}<handler>", names::RUNTIME_LABEL_PREFIX));
    expected.extend(usernsguard_agent::metrics::METRIC_NAMES.map(String::from));
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_usernsguard"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let commands = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap();
    expected.extend(
        commands
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| *c != "help")
            .map(|c| format!("usernsguard {c}")),
    );
    let missing: Vec<_> = expected.iter().filter(|n| !names_listed.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "README \"Where things live\" lacks rows for {missing:?}"
    );
}
