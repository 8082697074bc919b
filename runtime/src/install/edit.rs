//! The installer's host-config edits as pure functions over text: `&str` in, `String` out,
//! no file system, so every edit is covered by golden tests over realistic files
//! (`runtime/tests/fixtures/install/`).
//!
//! containerd files are edited with `toml_edit`, which keeps comments, key order, quoting
//! and whitespace of everything the edit does not touch, byte for byte. Files this module
//! writes from scratch (drop-ins) are rendered by `toml_edit` too, so handler names that
//! need quoting (`runtimes."a.b"`) come out right. The k3s/rke2 templates are Go templates,
//! not TOML, so the handler is appended there as a marked block of text.
//!
//! Why the drop-in's `version` must equal the root config's (measured with containerd
//! 2.1.9): the merged config takes the `version` of the last file merged, so a v3 drop-in
//! under a v2 root drops all of the root's CRI settings, and a v2 drop-in under a v3 root
//! silently loses the drop-in's runtime handlers. Newer containerd refuses a higher
//! drop-in version outright. Each version has its own plugin table for the runtimes.
//!
//! Why a version 2 root config is edited in place instead ([`add_runtime`]): containerd
//! 1.6 and 1.7 merge an imported file by replacing each whole `plugins.<name>` section it
//! has (containerd 2.x merges them key by key). A drop-in that registers a handler under
//! `plugins."io.containerd.grpc.v1.cri"` therefore wipes the root's entire CRI section:
//! measured with Debian 12's containerd 1.6.20, the sandbox image, the CNI directories and
//! the default runtime `runc` were gone, and the CRI plugin refused to load ("no
//! corresponding runtime configured in `containerd.runtimes` for `containerd`
//! `default_runtime_name = "runc"`"), taking the node's CRI socket down with it.

use std::path::{Path, PathBuf};

use toml_edit::{value, Array, DocumentMut, Item, Table, Value};

/// containerd's config schema version, which decides the CRI plugin's table name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SchemaVersion {
    /// `version = 2`: containerd 1.x (and 2.x, which migrates it on load).
    V2,
    /// `version = 3`: containerd 2.x.
    V3,
}

impl SchemaVersion {
    pub const fn number(self) -> i64 {
        match self {
            SchemaVersion::V2 => 2,
            SchemaVersion::V3 => 3,
        }
    }

    /// The plugin table that holds `containerd.runtimes` in this version.
    pub const fn runtime_plugin(self) -> &'static str {
        match self {
            SchemaVersion::V2 => "io.containerd.grpc.v1.cri",
            SchemaVersion::V3 => "io.containerd.cri.v1.runtime",
        }
    }
}

/// Why an edit cannot be made. Every variant names the file, so the operator knows which
/// one to look at; the installer changes nothing when an edit fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("{path} is not valid TOML, so it was left untouched: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "{path} has no `version` key: containerd reads that as config version 1, which usernsguard \
         does not edit; expected `version = 2` (containerd 1.x) or `version = 3` (containerd 2.x)"
    )]
    NoVersion { path: PathBuf },
    #[error(
        "{path} has `version = {found}`: usernsguard edits containerd config version 2 (containerd 1.x) \
         or 3 (containerd 2.x) only"
    )]
    UnsupportedVersion { path: PathBuf, found: String },
    #[error("{path}: `{key}` is not {expected}, so it was left untouched")]
    Shape {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
}

fn parse(text: &str, path: &Path) -> Result<DocumentMut, EditError> {
    text.parse::<DocumentMut>().map_err(|e| EditError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim().replace('\n', " "),
    })
}

/// The schema version of a containerd root config.
pub fn containerd_schema(text: &str, path: &Path) -> Result<SchemaVersion, EditError> {
    let doc = parse(text, path)?;
    match doc.get("version") {
        None => Err(EditError::NoVersion {
            path: path.to_owned(),
        }),
        Some(item) => match item.as_integer() {
            Some(2) => Ok(SchemaVersion::V2),
            Some(3) => Ok(SchemaVersion::V3),
            _ => Err(EditError::UnsupportedVersion {
                path: path.to_owned(),
                found: item.to_string().trim().to_owned(),
            }),
        },
    }
}

/// What the installer registers: a runc-compatible handler running `binary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerSpec {
    pub handler: String,
    /// The runtime binary, as a host path.
    pub binary: PathBuf,
    /// containerd only: `options.SystemdCgroup`, copied from the default runtime so that
    /// pods of the new handler use the same cgroup driver as the kubelet (`None`: not set).
    pub systemd_cgroup: Option<bool>,
}

/// A handler as some config file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// containerd `runtime_type` (empty when unset).
    pub runtime_type: String,
    /// containerd `options.BinaryName` / CRI-O `runtime_path`; `None` when unset.
    pub binary: Option<String>,
}

fn table(item: Option<&Item>) -> Option<&Table> {
    item.and_then(Item::as_table)
}

fn runtimes_of(doc: &DocumentMut, version: SchemaVersion) -> Option<&Table> {
    let plugin = table(table(doc.get("plugins"))?.get(version.runtime_plugin()))?;
    table(table(plugin.get("containerd"))?.get("runtimes"))
}

/// How a containerd config file (any version) declares `handler`, if it does, under the
/// plugin table of `version`.
pub fn containerd_declared(
    text: &str,
    path: &Path,
    version: SchemaVersion,
    handler: &str,
) -> Result<Option<Declared>, EditError> {
    let doc = parse(text, path)?;
    let Some(rt) = runtimes_of(&doc, version).and_then(|r| table(r.get(handler))) else {
        return Ok(None);
    };
    Ok(Some(Declared {
        runtime_type: rt
            .get("runtime_type")
            .and_then(Item::as_str)
            .unwrap_or_default()
            .to_owned(),
        binary: table(rt.get("options"))
            .and_then(|o| o.get("BinaryName"))
            .and_then(Item::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
    }))
}

/// What one containerd file says about the default runtime: its name
/// (`default_runtime_name`) and, per runtime, `options.SystemdCgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupSettings {
    pub default_runtime: Option<String>,
    pub systemd_cgroup: Vec<(String, bool)>,
}

/// The cgroup-driver settings of one containerd file; merge files in containerd's order
/// and look up the default runtime's value with [`CgroupSettings::for_default`].
pub fn containerd_cgroup_settings(
    text: &str,
    path: &Path,
    version: SchemaVersion,
) -> Result<CgroupSettings, EditError> {
    let doc = parse(text, path)?;
    let plugin = table(doc.get("plugins")).and_then(|p| table(p.get(version.runtime_plugin())));
    let containerd = plugin.and_then(|p| table(p.get("containerd")));
    let mut out = CgroupSettings {
        default_runtime: containerd
            .and_then(|c| c.get("default_runtime_name"))
            .and_then(Item::as_str)
            .map(str::to_owned),
        systemd_cgroup: Vec::new(),
    };
    for (name, rt) in runtimes_of(&doc, version).into_iter().flat_map(|r| r.iter()) {
        if let Some(b) = table(rt.as_table().and_then(|t| t.get("options")))
            .and_then(|o| o.get("SystemdCgroup"))
            .and_then(Item::as_bool)
        {
            out.systemd_cgroup.push((name.to_owned(), b));
        }
    }
    Ok(out)
}

impl CgroupSettings {
    /// Merges a later file's settings over these.
    pub fn merge(&mut self, later: CgroupSettings) {
        if later.default_runtime.is_some() {
            self.default_runtime = later.default_runtime;
        }
        for (name, b) in later.systemd_cgroup {
            self.systemd_cgroup.retain(|(n, _)| *n != name);
            self.systemd_cgroup.push((name, b));
        }
    }

    /// `SystemdCgroup` of the default runtime (`runc` when the config names none).
    pub fn for_default(&self) -> Option<bool> {
        let name = self.default_runtime.as_deref().unwrap_or("runc");
        self.systemd_cgroup
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| *b)
    }
}

/// The handler's tables under `plugins.<runtime plugin>.containerd.runtimes`, as a
/// document of their own.
fn containerd_handler_doc(version: SchemaVersion, spec: &HandlerSpec) -> DocumentMut {
    let mut options = Table::new();
    options.insert("BinaryName", value(spec.binary.display().to_string()));
    if let Some(b) = spec.systemd_cgroup {
        options.insert("SystemdCgroup", value(b));
    }
    let mut rt = Table::new();
    rt.insert("runtime_type", value("io.containerd.runc.v2"));
    rt.insert("options", Item::Table(options));
    let mut runtimes = Table::new();
    runtimes.set_implicit(true);
    runtimes.insert(&spec.handler, Item::Table(rt));
    let mut containerd = Table::new();
    containerd.set_implicit(true);
    containerd.insert("runtimes", Item::Table(runtimes));
    let mut plugin = Table::new();
    plugin.set_implicit(true);
    plugin.insert("containerd", Item::Table(containerd));
    let mut plugins = Table::new();
    plugins.set_implicit(true);
    plugins.insert(version.runtime_plugin(), Item::Table(plugin));
    let mut doc = DocumentMut::new();
    doc.insert("plugins", Item::Table(plugins));
    doc
}

/// The first line of every file and block usernsguard writes for `handler`.
pub fn marker(handler: &str) -> String {
    format!("# usernsguard: runtime handler \"{handler}\"")
}

/// The whole drop-in file that registers the handler with containerd; `version` must be the
/// root config's ([`containerd_schema`]).
pub fn containerd_drop_in(version: SchemaVersion, spec: &HandlerSpec) -> String {
    let mut doc = containerd_handler_doc(version, spec);
    doc.insert("version", value(version.number()));
    // `version` first: it decides how containerd reads the rest.
    doc.sort_values_by(|a, _, b, _| (a.get() != "version").cmp(&(b.get() != "version")));
    let mut out = format!(
        "{}. Written by `usernsguard install`; `usernsguard uninstall` removes this file.\n\
         # Its `version` equals the root config's: containerd merges drop-ins of another version lossily.\n",
        marker(&spec.handler)
    );
    out.push_str(&doc.to_string());
    out
}

/// The table `key` of `parent`, created (implicit, so that it adds no header of its own)
/// when missing.
fn child_table<'a>(
    parent: &'a mut Table,
    key: &str,
    path: &Path,
    shown: &str,
) -> Result<&'a mut Table, EditError> {
    if !parent.contains_key(key) {
        let mut t = Table::new();
        t.set_implicit(true);
        parent.insert(key, Item::Table(t));
    }
    parent
        .get_mut(key)
        .and_then(Item::as_table_mut)
        .ok_or_else(|| EditError::Shape {
            path: path.to_owned(),
            key: shown.to_owned(),
            expected: "a table (not an inline table), so usernsguard cannot add a handler below it",
        })
}

/// Sets `key` to `v`, keeping the decoration (spacing, comments) of a value already there.
fn set_keeping_decor(t: &mut Table, key: &str, v: Value) {
    match t.get_mut(key).and_then(Item::as_value_mut) {
        Some(old) if old.to_string().trim() == v.to_string().trim() => {}
        Some(old) => {
            let decor = old.decor().clone();
            *old = v;
            *old.decor_mut() = decor;
        }
        None => {
            t.insert(key, value(v));
        }
    }
}

/// Starts the comment on a default runtime declared by [`add_runtime`]: how an uninstall
/// tells it from one the operator declared, whichever handler's install added it.
const DEFAULT_RUNTIME_MARKER: &str = "# usernsguard: containerd's built-in default runtime";

/// A version 2 root config with the handler registered in it (see the module docs for why
/// not in a drop-in): its tables are appended to the file, marked with a comment;
/// a table of this handler already there (usernsguard's own, from an earlier install) gets
/// its values set. Everything else stays byte for byte, and a root that already says
/// exactly this is returned unchanged.
///
/// `declare_default` names containerd's built-in default runtime (`runc`) when no file of
/// the config declares it: containerd 1.x drops its built-in `runtimes.runc` as soon as a
/// config declares any runtime (measured with 1.6.20: Debian's own config plus one handler
/// left the CRI plugin unable to load, "no corresponding runtime configured ... for
/// `default_runtime_name = "runc"`"), so it is declared beside the handler as the built-in
/// one is (`runtime_type = "io.containerd.runc.v2"`, every option at its default).
pub fn add_runtime(
    root: &str,
    path: &Path,
    version: SchemaVersion,
    spec: &HandlerSpec,
    declare_default: Option<&str>,
) -> Result<String, EditError> {
    let default_missing = match declare_default {
        Some(name) => runtimes_of(&parse(root, path)?, version).is_none_or(|r| !r.contains_key(name)),
        None => false,
    };
    if !default_missing && registers(root, path, version, spec)? {
        return Ok(root.to_owned());
    }
    let mut doc = parse(root, path)?;
    let plugin = version.runtime_plugin();
    let prefix = format!("plugins.\"{plugin}\"");
    let plugins = child_table(doc.as_table_mut(), "plugins", path, "plugins")?;
    let cri = child_table(plugins, plugin, path, &prefix)?;
    let containerd = child_table(cri, "containerd", path, &format!("{prefix}.containerd"))?;
    let runtimes = child_table(
        containerd,
        "runtimes",
        path,
        &format!("{prefix}.containerd.runtimes"),
    )?;
    if let (true, Some(name)) = (default_missing, declare_default) {
        let mut rt = Table::new();
        rt.decor_mut().set_prefix(format!(
            "\n{DEFAULT_RUNTIME_MARKER} \"{name}\", which containerd 1.x drops \
             once a config declares any runtime. Added by `usernsguard install` with \"{}\"; \
             `usernsguard uninstall` removes it.\n",
            spec.handler
        ));
        rt.insert("runtime_type", value("io.containerd.runc.v2"));
        rt.set_position(usize::MAX - 2);
        runtimes.insert(name, Item::Table(rt));
    }
    let key = format!("{prefix}.containerd.runtimes.{}", spec.handler);
    let new = !runtimes.contains_key(&spec.handler);
    if new {
        let mut rt = Table::new();
        rt.decor_mut().set_prefix(format!(
            "\n{}. Added by `usernsguard install`; `usernsguard uninstall` removes it.\n",
            marker(&spec.handler)
        ));
        // At the end of the file, where it is easy to see, rather than between the
        // operator's tables.
        rt.set_position(usize::MAX - 1);
        runtimes.insert(&spec.handler, Item::Table(rt));
    }
    let rt = runtimes
        .get_mut(&spec.handler)
        .and_then(Item::as_table_mut)
        .ok_or_else(|| EditError::Shape {
            path: path.to_owned(),
            key: key.clone(),
            expected: "a table",
        })?;
    set_keeping_decor(rt, "runtime_type", Value::from("io.containerd.runc.v2"));
    let options = child_table(rt, "options", path, &format!("{key}.options"))?;
    // `options` is a table of its own with a header; an implicit one would put its keys
    // under the handler's header as dotted keys.
    options.set_implicit(false);
    if new {
        options.set_position(usize::MAX);
    }
    set_keeping_decor(
        options,
        "BinaryName",
        Value::from(spec.binary.display().to_string()),
    );
    match spec.systemd_cgroup {
        Some(b) => set_keeping_decor(options, "SystemdCgroup", Value::from(b)),
        None => {
            options.remove("SystemdCgroup");
        }
    }
    Ok(doc.to_string())
}

/// Whether a containerd config file has a `plugins.<plugin>` section (which containerd 1.x
/// lets replace the same section of every file merged before it).
pub fn has_plugin_section(text: &str, path: &Path, plugin: &str) -> Result<bool, EditError> {
    let doc = parse(text, path)?;
    Ok(table(doc.get("plugins")).is_some_and(|p| p.contains_key(plugin)))
}

/// Whether `text` registers the handler exactly as `spec` says.
fn registers(text: &str, path: &Path, version: SchemaVersion, spec: &HandlerSpec) -> Result<bool, EditError> {
    let doc = parse(text, path)?;
    let Some(rt) = runtimes_of(&doc, version).and_then(|r| table(r.get(&spec.handler))) else {
        return Ok(false);
    };
    let options = table(rt.get("options"));
    let binary = spec.binary.display().to_string();
    Ok(
        rt.get("runtime_type").and_then(Item::as_str) == Some("io.containerd.runc.v2")
            && options.and_then(|o| o.get("BinaryName")).and_then(Item::as_str) == Some(binary.as_str())
            && options
                .and_then(|o| o.get("SystemdCgroup"))
                .and_then(Item::as_bool)
                == spec.systemd_cgroup,
    )
}

/// `root` without the handler's tables and the default runtime's that [`add_runtime`]
/// declared with it (`also`): its inverse, for a root config someone else changed after
/// the install. Tables above them stay, possibly empty.
pub fn remove_runtime(
    root: &str,
    path: &Path,
    version: SchemaVersion,
    handler: &str,
    also: &[String],
) -> Result<String, EditError> {
    let mut doc = parse(root, path)?;
    let Some(runtimes) = doc
        .get_mut("plugins")
        .and_then(Item::as_table_mut)
        .and_then(|p| p.get_mut(version.runtime_plugin()))
        .and_then(Item::as_table_mut)
        .and_then(|p| p.get_mut("containerd"))
        .and_then(Item::as_table_mut)
        .and_then(|c| c.get_mut("runtimes"))
        .and_then(Item::as_table_mut)
    else {
        return Ok(root.to_owned());
    };
    let mut removed = runtimes.remove(handler).is_some();
    // The default `runc` usernsguard declared (containerd 1.x needs it once a runtimes table
    // exists), with this handler or with another one, stays while any other runtime is left
    // (another handler's install, or the operator's, relies on it) and goes with the last.
    let declared_by_us = |name: &str, item: &Item| {
        also.iter().any(|a| a == name)
            || item.as_table().is_some_and(|t| {
                t.decor()
                    .prefix()
                    .and_then(|p| p.as_str())
                    .is_some_and(|p| p.contains(DEFAULT_RUNTIME_MARKER))
            })
    };
    let ours: Vec<String> = runtimes
        .iter()
        .filter(|(name, item)| declared_by_us(name, item))
        .map(|(name, _)| name.to_owned())
        .collect();
    if ours.len() == runtimes.len() {
        for name in ours {
            removed |= runtimes.remove(&name).is_some();
        }
    }
    Ok(if removed { doc.to_string() } else { root.to_owned() })
}

/// The runtimes a containerd config file declares under the plugin table of `version`.
pub fn containerd_runtimes(
    text: &str,
    path: &Path,
    version: SchemaVersion,
) -> Result<Vec<String>, EditError> {
    let doc = parse(text, path)?;
    Ok(runtimes_of(&doc, version)
        .map(|r| r.iter().map(|(k, _)| k.to_owned()).collect())
        .unwrap_or_default())
}

fn imports_array<'a>(doc: &'a DocumentMut, path: &Path) -> Result<Option<&'a Array>, EditError> {
    match doc.get("imports") {
        None => Ok(None),
        Some(item) => item.as_array().map(Some).ok_or_else(|| EditError::Shape {
            path: path.to_owned(),
            key: "imports".into(),
            expected: "an array of strings",
        }),
    }
}

/// The `imports` entries of a containerd config, as written.
pub fn containerd_imports(text: &str, path: &Path) -> Result<Vec<String>, EditError> {
    let doc = parse(text, path)?;
    Ok(imports_array(&doc, path)?
        .map(|a| a.iter().filter_map(|v| v.as_str()).map(str::to_owned).collect())
        .unwrap_or_default())
}

/// `root` with `entry` in its `imports` (created after the top-level keys when missing);
/// `root` itself, unchanged, when the entry is already there.
pub fn add_import(root: &str, path: &Path, entry: &str) -> Result<String, EditError> {
    let mut doc = parse(root, path)?;
    match imports_array(&doc, path)? {
        Some(a) if a.iter().any(|v| v.as_str() == Some(entry)) => return Ok(root.to_owned()),
        Some(_) => {
            let a = doc["imports"].as_array_mut().expect("checked above");
            let multiline = a.trailing().as_str().is_some_and(|t| t.contains('\n'))
                || a.iter().any(|v| {
                    v.decor()
                        .prefix()
                        .and_then(|p| p.as_str())
                        .is_some_and(|p| p.contains('\n'))
                });
            if multiline {
                // Keep one entry per line, indented like the last one.
                // Only the indentation: a comment in the prefix belongs to the line above.
                let indent = a
                    .iter()
                    .last()
                    .and_then(|v| v.decor().prefix().and_then(|p| p.as_str()))
                    .and_then(|p| p.rsplit_once('\n'))
                    .map(|(_, indent)| format!("\n{indent}"))
                    .unwrap_or_else(|| "\n  ".into());
                let mut v = Value::from(entry);
                v.decor_mut().set_prefix(indent);
                a.push_formatted(v);
                a.set_trailing_comma(true);
            } else {
                a.push(entry);
            }
        }
        None => {
            let mut a = Array::new();
            a.push(entry);
            doc.insert("imports", value(a));
        }
    }
    Ok(doc.to_string())
}

/// `root` without `entry` in `imports` (the inverse of [`add_import`], for a root config
/// that someone else changed after the install); the key is left, possibly empty.
pub fn remove_import(root: &str, path: &Path, entry: &str) -> Result<String, EditError> {
    let mut doc = parse(root, path)?;
    if !imports_array(&doc, path)?.is_some_and(|a| a.iter().any(|v| v.as_str() == Some(entry))) {
        return Ok(root.to_owned());
    }
    let a = doc["imports"].as_array_mut().expect("checked above");
    a.retain(|v| v.as_str() != Some(entry));
    Ok(doc.to_string())
}

/// Whether containerd's `imports` glob `pattern` (as written, relative to `root_dir`)
/// names `file`.
pub fn import_matches(pattern: &str, root_dir: &Path, file: &Path) -> bool {
    let full = if Path::new(pattern).is_absolute() {
        PathBuf::from(pattern)
    } else {
        root_dir.join(pattern)
    };
    let full = clean(&full);
    let (Some(dir), Some(name)) = (full.parent(), full.file_name()) else {
        return false;
    };
    file.parent() == Some(dir)
        && file
            .file_name()
            .is_some_and(|f| wildcard(&name.to_string_lossy(), &f.to_string_lossy()))
}

/// `path` with `.` and `..` resolved lexically, as Go's `filepath.Clean` does.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for comp in path.components() {
        match comp {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Go's `filepath.Match` for `*` and `?` within one path component.
pub fn wildcard(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && n[0] != b'/' && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// What k3s and rke2 put at the top of a template that extends their own config.
pub const BASE_TEMPLATE: &str = "{{ template \"base\" . }}";

fn block_end(handler: &str) -> String {
    format!("# usernsguard: end of runtime handler \"{handler}\"")
}

/// The marked block that registers `spec` in a k3s/rke2 template.
fn template_block(version: SchemaVersion, spec: &HandlerSpec) -> String {
    format!(
        "{}. Added by `usernsguard install`; `usernsguard uninstall` removes this block.\n{}{}\n",
        marker(&spec.handler),
        containerd_handler_doc(version, spec),
        block_end(&spec.handler)
    )
}

/// Where the marked block of `handler` sits in `text`, from its first line to the end of
/// its last (newline included), if present.
fn find_block(text: &str, handler: &str) -> Option<std::ops::Range<usize>> {
    let start_marker = format!("{}.", marker(handler));
    let start = text
        .match_indices(&start_marker)
        .map(|(i, _)| i)
        .find(|&i| i == 0 || text.as_bytes()[i - 1] == b'\n')?;
    let end_marker = block_end(handler);
    let rel = text[start..].find(&end_marker)?;
    let mut end = start + rel + end_marker.len();
    if text[end..].starts_with('\n') {
        end += 1;
    }
    Some(start..end)
}

/// The k3s/rke2 containerd template with the handler registered.
///
/// No template yet: a new one that renders k3s's own config (`{{ template "base" . }}`) and
/// adds the handler, so every setting k3s manages keeps being managed by k3s. An existing
/// template (the operator's) gets the block appended, or its block for this handler
/// replaced; nothing else in it changes.
pub fn k3s_template(existing: Option<&str>, version: SchemaVersion, spec: &HandlerSpec) -> String {
    let block = template_block(version, spec);
    match existing {
        None => format!("{BASE_TEMPLATE}\n\n{block}"),
        Some(text) => match find_block(text, &spec.handler) {
            Some(r) => format!("{}{block}{}", &text[..r.start], &text[r.end..]),
            None => {
                let sep = if text.is_empty() || text.ends_with("\n\n") {
                    ""
                } else if text.ends_with('\n') {
                    "\n"
                } else {
                    "\n\n"
                };
                format!("{text}{sep}{block}")
            }
        },
    }
}

/// `text` without the handler's block (and the blank line [`k3s_template`] put before it).
pub fn remove_template_block(text: &str, handler: &str) -> String {
    let Some(r) = find_block(text, handler) else {
        return text.to_owned();
    };
    let mut start = r.start;
    if text[..start].ends_with("\n\n") {
        start -= 1;
    }
    format!("{}{}", &text[..start], &text[r.end..])
}

/// Whether `text` (a k3s/rke2 template) carries usernsguard's block for `handler`.
pub fn has_template_block(text: &str, handler: &str) -> bool {
    find_block(text, handler).is_some()
}

/// How a CRI-O config file declares `handler`, if it does.
pub fn crio_declared(text: &str, path: &Path, handler: &str) -> Result<Option<Declared>, EditError> {
    let doc = parse(text, path)?;
    let rt = table(doc.get("crio"))
        .and_then(|c| table(c.get("runtime")))
        .and_then(|r| table(r.get("runtimes")))
        .and_then(|r| table(r.get(handler)));
    Ok(rt.map(|rt| Declared {
        runtime_type: rt
            .get("runtime_type")
            .and_then(Item::as_str)
            .unwrap_or_default()
            .to_owned(),
        binary: rt
            .get("runtime_path")
            .and_then(Item::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
    }))
}

/// The CRI-O drop-in (`crio.conf.d/`) that registers the handler.
pub fn crio_drop_in(spec: &HandlerSpec) -> String {
    let mut rt = Table::new();
    rt.insert("runtime_path", value(spec.binary.display().to_string()));
    rt.insert("runtime_type", value("oci"));
    let mut runtimes = Table::new();
    runtimes.set_implicit(true);
    runtimes.insert(&spec.handler, Item::Table(rt));
    let mut runtime = Table::new();
    runtime.set_implicit(true);
    runtime.insert("runtimes", Item::Table(runtimes));
    let mut crio = Table::new();
    crio.set_implicit(true);
    crio.insert("runtime", Item::Table(runtime));
    let mut doc = DocumentMut::new();
    doc.insert("crio", Item::Table(crio));
    format!(
        "{}. Written by `usernsguard install`; `usernsguard uninstall` removes this file.\n{doc}",
        marker(&spec.handler)
    )
}

#[cfg(test)]
mod tests;
