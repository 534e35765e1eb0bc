//! Row-level access rules, declared in table metadata and enforced below SQL.
//!
//! A transform may declare who reads which of its rows:
//!
//! ```yaml
//! access:                      # roles not named here read no rows of this table
//!   - { role: manager, rows: all }
//!   - { role: rep, rows: "region = {user.region}" }
//! ```
//!
//! [`restrict`] builds a user's query session from the snapshot's session: every table name is
//! bound to a view `SELECT * FROM <table> WHERE <rule>` over the stored table, and the stored
//! table itself is given no name the user can write. Whatever SQL the user sends — joins,
//! subqueries, CTEs, fully qualified names, cube tables (`cubes.*` are built on the restricted
//! tables), `EXPLAIN` — can only reach rows through those views. A rule may refer to other
//! tables, and then reads them *as restricted for the same user* (tables are bound in the
//! transforms' dependency order), so `customer_id IN (SELECT customer_id FROM dim_customer)`
//! means "the customers this user may see" and the region logic is written once.
//!
//! Rules fail closed: a role without a rule reads nothing of a table that has rules; a rule
//! naming an attribute the user lacks is an error; the `quarantine` table (raw rows of every
//! table) is readable only by a role no rule restricts. `{user.NAME}` becomes a quoted string
//! literal, so attribute values cannot inject SQL.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::catalog::TableProvider;
use datafusion::datasource::ViewTable;
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::SessionContext;
use serde_saphyr::Spanned;

use crate::cube::CubeSet;
use crate::error::{Diagnostic, QueryError, Result};
use crate::etl::TransformSet;
use crate::etl::spec::AccessSpec;
use crate::warehouse::{CATALOG, WAREHOUSE_SCHEMA};

/// Who is asking: a user of `users.yaml` with a role and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub role: String,
    pub attributes: BTreeMap<String, String>,
}

/// One resolved rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    pub role: String,
    pub rows: Rows,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rows {
    All,
    /// An SQL condition with `{user.NAME}` placeholders.
    Where(String),
}

/// Checks rules as written; problems become diagnostics with positions.
pub fn resolve_rules(file: &Path, table: &str, specs: &[AccessSpec], errors: &mut Vec<Diagnostic>) -> Vec<AccessRule> {
    let mut rules: Vec<AccessRule> = Vec::new();
    for spec in specs {
        let role = spec.role.value.trim().to_string();
        let at = |s: &Spanned<String>, message: String, hint: Option<String>| {
            crate::project::diagnostic_at(file, s, format!("table '{table}' › access › role '{role}'"), message, hint)
        };
        if rules.iter().any(|r| r.role == role) {
            errors.push(at(&spec.role, format!("role '{role}' has two rules"), Some("write one rule per role".into())));
            continue;
        }
        let text = spec.rows.value.trim();
        let rows = if text.eq_ignore_ascii_case("all") {
            Rows::All
        } else {
            let probe = placeholders().replace_all(text, "'x'");
            if probe.contains('{') || probe.contains('}') {
                errors.push(at(&spec.rows, format!("'{text}' has a placeholder other than {{user.NAME}}"), None));
            } else if let Err(e) = datafusion::sql::sqlparser::parser::Parser::new(&datafusion::sql::sqlparser::dialect::GenericDialect {})
                .try_with_sql(&probe)
                .and_then(|mut p| p.parse_expr())
            {
                errors.push(at(&spec.rows, format!("`rows` is not an SQL condition: {e}"), Some("write `all` or a condition such as region = {user.region}".into())));
            }
            Rows::Where(text.to_string())
        };
        rules.push(AccessRule { role, rows });
    }
    rules
}

fn placeholders() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"\{user\.([A-Za-z_][A-Za-z0-9_]*)\}").expect("static regex"))
}

/// A rule's condition with the user's values quoted in.
fn bind(table: &str, condition: &str, who: &Principal) -> Result<String> {
    let mut missing = None;
    let text = placeholders().replace_all(condition, |c: &regex::Captures| {
        let name = &c[1];
        let value = match name {
            "name" => Some(who.user.clone()),
            "role" => Some(who.role.clone()),
            _ => who.attributes.get(name).cloned(),
        };
        match value {
            Some(v) => format!("'{}'", v.replace('\'', "''")),
            None => {
                missing = Some(name.to_string());
                "NULL".into()
            }
        }
    });
    if let Some(name) = missing {
        return Err(QueryError::new(format!(
            "the access rule of table '{table}' for role '{}' needs the attribute '{name}', which user '{}' does not have",
            who.role, who.user
        ))
        .with_hint(Some(format!("crmcube user add {} --role {} --attr {name}=VALUE", who.user, who.role)))
        .into());
    }
    Ok(text.into_owned())
}

/// What `who` may read of `table`: None = every row.
///
/// The lifetime value tables a load fits (no transform of their own) follow `customer_value`,
/// the table of the same customers: `customer_clv` rows under its rule (both have
/// `customer_id`), and the one-row `clv_model` (population parameters, no customer's data) for
/// every role with a rule there.
fn rule_for<'a>(transforms: &'a TransformSet, table: &str, who: &Principal) -> Option<Option<&'a Rows>> {
    static ALL: Rows = Rows::All;
    let governing = match table {
        "customer_clv" | "clv_model" => "customer_value",
        other => other,
    };
    let rules = transforms.get(governing)?.access.as_ref()?;
    let rule = rules.iter().find(|r| r.role == who.role).map(|r| &r.rows);
    Some(if table == "clv_model" { rule.map(|_| &ALL) } else { rule })
}

/// Whether any table restricts `who`'s role (such a user does not read the quarantine).
pub fn is_restricted(transforms: &TransformSet, who: &Principal) -> bool {
    transforms.transforms.iter().any(|t| !matches!(rule_for(transforms, &t.name, who), None | Some(Some(Rows::All))))
}

/// `who`'s session over the same snapshot as `snapshot_ctx`: tables bound to their rule views,
/// cube tables built on those, and where the rollup rule writes its decisions (for `--explain`).
///
/// With `rewrites` (the snapshot's manifest and the rewrites asked for), the session gets the
/// rollup rule. A restricted user never reads rollups (they aggregate rows the user may not
/// see), nor any other table no transform governs; eager aggregation is kept for everyone, as
/// it regroups the rows the user's own fact view returns.
pub async fn restrict(
    snapshot_ctx: &SessionContext,
    transforms: &TransformSet,
    cubes: &CubeSet,
    who: &Principal,
    rewrites: Option<(&crate::warehouse::Snapshot, crate::rollup::Rewrites)>,
) -> Result<(SessionContext, crate::rollup::Notes)> {
    let state = SessionStateBuilder::new()
        .with_config(snapshot_ctx.copied_config())
        .with_runtime_env(snapshot_ctx.runtime_env())
        .with_default_features()
        .build();
    let ctx = SessionContext::new_with_state(state);
    let schema = snapshot_ctx
        .catalog(CATALOG)
        .and_then(|c| c.schema(WAREHOUSE_SCHEMA))
        .ok_or_else(|| crate::error::Error::Internal("the snapshot session has no warehouse schema".into()))?;
    // Dependency order first (a rule may read tables bound before it), then the rest.
    let mut names: Vec<String> = transforms.transforms.iter().map(|t| t.name.clone()).filter(|n| schema.table_exist(n)).collect();
    let mut rest: Vec<String> = schema.table_names().into_iter().filter(|n| !names.contains(n)).collect();
    rest.sort();
    names.extend(rest);
    let restricted = is_restricted(transforms, who);
    for name in names {
        let Some(stored) = schema.table(&name).await? else { continue };
        let condition = match rule_for(transforms, &name, who) {
            None if restricted && transforms.get(&name).is_none() => Some("FALSE".to_string()),
            None | Some(Some(Rows::All)) => None,
            Some(None) => Some("FALSE".to_string()),
            Some(Some(Rows::Where(c))) => Some(bind(&name, c, who)?),
        };
        let provider: Arc<dyn TableProvider> = match condition {
            None => stored,
            Some(condition) => {
                // The stored table gets a name for as long as the rule is planned, never after.
                let hidden = format!("__stored_{name}");
                ctx.register_table(hidden.as_str(), stored)?;
                let planned = ctx.sql(&format!("SELECT * FROM \"{hidden}\" WHERE {condition}")).await;
                ctx.deregister_table(hidden.as_str())?;
                let plan = planned
                    .map_err(|e| QueryError::new(format!("the access rule of table '{name}' for role '{}' does not plan: {e}", who.role)))?
                    .into_unoptimized_plan();
                Arc::new(ViewTable::new(plan, None))
            }
        };
        ctx.register_table(name.as_str(), provider)?;
    }
    crate::query::sql::register_cubes(&ctx, cubes).await?;
    let notes = match rewrites {
        Some((snapshot, with)) => {
            let with = crate::rollup::Rewrites { rollups: with.rollups && !restricted, ..with };
            crate::rollup::install_with(&ctx, cubes, snapshot, with).await?
        }
        None => Default::default(),
    };
    Ok((ctx, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep() -> Principal {
        Principal { user: "bo".into(), role: "rep".into(), attributes: [("region".to_string(), "O'East".to_string())].into() }
    }

    #[test]
    fn placeholders_become_quoted_literals() {
        assert_eq!(bind("t", "region = {user.region} AND {user.name} <> ''", &rep()).unwrap(), "region = 'O''East' AND 'bo' <> ''");
        let e = bind("t", "x = {user.team}", &rep()).unwrap_err().to_string();
        assert!(e.contains("'team'") && e.contains("--attr team="), "{e}");
    }
}
