//! The project: `crmcube.yaml` and the one YAML loader every metadata file goes through.
//!
//! A project is a folder with `crmcube.yaml` naming its sources, transforms, cubes and warehouse
//! folders. The repository root is itself the sample project, so `crmcube load` works from a
//! fresh clone. [`load_yaml`] is the single place the YAML library is called: it attaches the
//! file, line and column to every parse error, so the rest of the crate never sees the library.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_saphyr::Spanned;

use crate::error::{Diagnostic, Error, Result, SpecErrors};

/// The name of the project file.
pub const PROJECT_FILE: &str = "crmcube.yaml";

/// `crmcube.yaml` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectSpec {
    pub version: u32,
    pub name: String,
    /// Folder holding the OLTP exports (source globs are relative to it).
    #[serde(default = "default_sources")]
    pub sources: PathBuf,
    #[serde(default = "default_transforms")]
    pub transforms: PathBuf,
    #[serde(default = "default_cubes")]
    pub cubes: PathBuf,
    #[serde(default = "default_warehouse")]
    pub warehouse: PathBuf,
    /// Saved cube queries (`crmcube query -f NAME`).
    #[serde(default = "default_queries")]
    pub queries: PathBuf,
    /// Users of the Flight SQL server (`crmcube user add`), with argon2 password hashes.
    #[serde(default = "default_users")]
    pub users: PathBuf,
    /// How customer lifetime value is measured (time unit, horizon, discount, observation end).
    #[serde(default)]
    pub lifetime_value: crate::analytics::clv::Settings,
}

fn default_sources() -> PathBuf {
    "sample-data".into()
}
fn default_transforms() -> PathBuf {
    "transforms".into()
}
fn default_cubes() -> PathBuf {
    "cubes".into()
}
fn default_warehouse() -> PathBuf {
    "warehouse".into()
}
fn default_queries() -> PathBuf {
    "queries".into()
}
fn default_users() -> PathBuf {
    "users.yaml".into()
}

/// A located project: its root folder and the resolved folders.
#[derive(Debug, Clone)]
pub struct Project {
    pub root: PathBuf,
    pub name: String,
    pub sources: PathBuf,
    pub transforms: PathBuf,
    pub cubes: PathBuf,
    pub warehouse: PathBuf,
    pub queries: PathBuf,
    pub users: PathBuf,
    pub lifetime_value: crate::analytics::clv::Settings,
}

impl Project {
    /// Finds `crmcube.yaml` in `start` or the nearest parent folder and loads it.
    pub fn discover(start: &Path) -> Result<Self> {
        let start = start.canonicalize().map_err(|e| Error::io(start, e))?;
        let mut dir = Some(start.as_path());
        while let Some(d) = dir {
            if d.join(PROJECT_FILE).is_file() {
                return Self::open(d);
            }
            dir = d.parent();
        }
        Err(SpecErrors(vec![Diagnostic {
            file: start.join(PROJECT_FILE),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("no {PROJECT_FILE} found here or in any parent folder"),
            hint: Some("run crmcube from a project folder, or pass --project DIR".into()),
        }])
        .into())
    }

    /// Loads the project whose root folder is `root`.
    pub fn open(root: &Path) -> Result<Self> {
        let spec: ProjectSpec = load_yaml(&root.join(PROJECT_FILE))?;
        let mut errors = Vec::new();
        check_version(&root.join(PROJECT_FILE), spec.version, &mut errors);
        for (key, message) in spec.lifetime_value.problems() {
            errors.push(Diagnostic {
                file: root.join(PROJECT_FILE),
                line: 0,
                column: 0,
                key: format!("lifetime_value.{key}"),
                message,
                hint: Some("see README, \"Predicted lifetime value\"".into()),
            });
        }
        if !errors.is_empty() {
            return Err(SpecErrors(errors).into());
        }
        Ok(Self {
            root: root.to_path_buf(),
            name: spec.name,
            sources: root.join(spec.sources),
            transforms: root.join(spec.transforms),
            cubes: root.join(spec.cubes),
            warehouse: root.join(spec.warehouse),
            queries: root.join(spec.queries),
            users: root.join(spec.users),
            lifetime_value: spec.lifetime_value,
        })
    }

    /// A path shown to users: relative to the project root when it is inside it.
    pub fn display_path(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root).map(Path::to_path_buf).unwrap_or_else(|_| path.to_path_buf())
    }
}

/// Reads and parses one YAML metadata file; errors carry file, line and column.
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_yaml(path, &text)
}

/// Parses YAML text that came from `path` (used by [`load_yaml`] and by tests).
pub fn parse_yaml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    serde_saphyr::from_str::<T>(text).map_err(|e| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
        SpecErrors(vec![Diagnostic {
            file: path.to_path_buf(),
            line,
            column,
            key: String::new(),
            message: yaml_message(&e),
            hint: None,
        }])
        .into()
    })
}

/// The library's message without its rendered source snippet (we print our own position).
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let full = e.to_string();
    let first = full.lines().next().unwrap_or_default().trim();
    // The rendered form may start with a position prefix such as "line 3 column 5: ".
    first.to_string()
}

/// Lists the `*.yaml`/`*.yml` files of a metadata folder in name order.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads every YAML file of a metadata folder; files that do not parse become diagnostics
/// (paths shown relative to the project) so that one run reports every broken file.
pub fn load_folder<T: DeserializeOwned>(project: &Project, dir: &Path) -> Result<(Vec<(PathBuf, T)>, Vec<Diagnostic>)> {
    let mut specs = Vec::new();
    let mut errors = Vec::new();
    for path in yaml_files(dir)? {
        let shown = project.display_path(&path);
        match load_yaml::<T>(&path) {
            Ok(spec) => specs.push((shown, spec)),
            Err(Error::Spec(SpecErrors(d))) => errors.extend(d.into_iter().map(|x| Diagnostic { file: shown.clone(), ..x })),
            Err(e) => return Err(e),
        }
    }
    Ok((specs, errors))
}

/// A diagnostic at the position of a YAML value.
pub fn diagnostic_at<T>(file: &Path, at: &Spanned<T>, key: String, message: String, hint: Option<String>) -> Diagnostic {
    Diagnostic {
        file: file.to_path_buf(),
        line: at.referenced.line(),
        column: at.referenced.column(),
        key,
        message,
        hint,
    }
}

/// Every metadata file starts with `version: 1`.
pub fn check_version(file: &Path, version: u32, errors: &mut Vec<Diagnostic>) {
    if version != 1 {
        errors.push(Diagnostic {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
            key: "version".into(),
            message: format!("unsupported version {version}; this crmcube reads version 1"),
            hint: Some("write `version: 1`".into()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Small {
        version: u32,
        name: String,
    }

    #[test]
    fn unknown_key_error_names_file_line_and_key() {
        let err = parse_yaml::<Small>(Path::new("x.yaml"), "version: 1\nname: a\nnmae: b\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("x.yaml:3:"), "{msg}");
        assert!(msg.contains("nmae"), "{msg}");
    }
}
