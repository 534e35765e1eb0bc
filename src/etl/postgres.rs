//! PostgreSQL sources: a table or query of a live OLTP database, staged as CSV for the load.
//!
//! At the start of a load each PostgreSQL source runs `COPY (SELECT …) TO STDOUT (FORMAT csv,
//! HEADER)` and writes what comes back to `<warehouse>/staging/<table>.csv`. From there it is an
//! export file like any other: surveyed (its checksum, recorded in the snapshot as
//! `postgres:<table>`, decides whether anything changed), read, cleaned, and quarantined with the
//! staged copy's line numbers and raw text. Rows come ordered by the table's key, so unchanged
//! data stages byte-identical and a full table whose rows did not change is kept.
//!
//! An incremental source with a `watermark:` reads only rows past the stored watermark: the
//! condition `"<column>" > '<watermark>'` runs in the database, so a night's cost follows the
//! night's changes, not the table's size. The connection is plain TCP or a Unix socket without
//! TLS (a database on the warehouse's host or a trusted network); the URL may name environment
//! variables (`${PGPASSWORD}`) so passwords stay out of the YAML, and is shown without its
//! password in every message.

use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use tokio::io::AsyncWriteExt;

use super::spec::PostgresSpec;
use super::validate::{SourceTransform, Transform};
use crate::error::{DataError, Error, Result};

/// Session settings that make the text of dates, times and numbers the same on every server.
const SESSION: &str = "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'iso_8601'; SET TimeZone = 'UTC'; \
                       SET client_encoding = 'UTF8'; SET extra_float_digits = 1";

/// The connection settings of a URL, after `${NAME}` environment variables are filled in.
pub fn config(url: &str) -> std::result::Result<tokio_postgres::Config, String> {
    let expanded = expand(url)?;
    expanded.parse::<tokio_postgres::Config>().map_err(|e| format!("not a PostgreSQL connection string ({e}): {}", redacted(url)))
}

/// Whether a URL parses, without filling in environment variables (`crmcube check` may run
/// where they are not set).
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    if url.contains("${") {
        return Ok(());
    }
    config(url).map(|_| ())
}

/// `${NAME}` replaced by the environment variable NAME; an unset variable is an error.
fn expand(url: &str) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = url;
    while let Some(start) = rest.find("${") {
        let end = rest[start..].find('}').ok_or_else(|| format!("'${{' without a closing '}}' in {}", redacted(url)))? + start;
        let name = &rest[start + 2..end];
        let value = std::env::var(name).map_err(|_| format!("the connection string names the environment variable {name}, which is not set"))?;
        out.push_str(&rest[..start]);
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The URL as it may be shown: a password in it replaced by `***`.
pub fn redacted(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let after = &url[scheme_end + 3..];
        let at = after.find('@');
        if let Some(at) = at
            && let Some(colon) = after[..at].find(':')
        {
            return format!("{}://{}:***{}", &url[..scheme_end], &after[..colon], &after[at..]);
        }
        return url.to_string();
    }
    // key=value form: hide password=…
    url.split_whitespace()
        .map(|kv| if kv.to_ascii_lowercase().starts_with("password=") { "password=***" } else { kv })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How the snapshot's file ledger names a database source's staged rows.
pub fn ledger_key(table: &str) -> String {
    format!("postgres:{table}")
}

/// Whether a ledger entry is a database source's (see [`ledger_key`]).
pub fn is_ledger_key(key: &str) -> bool {
    key.starts_with("postgres:")
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The SELECT a source runs: its declared columns (by their `from:` names) from the table or
/// query, past the watermark when one is given, ordered by the key.
pub fn select(spec: &SourceTransform, pg: &PostgresSpec, watermark: Option<&str>) -> String {
    let from = match (&pg.table, &pg.query) {
        (Some(t), _) => t.value.split('.').map(quote_ident).collect::<Vec<_>>().join("."),
        (None, Some(q)) => format!("({}) AS crmcube_source", q.value.trim().trim_end_matches(';')),
        (None, None) => unreachable!("validated: a postgres source has a table or a query"),
    };
    let from_name = |name: &str| spec.columns.iter().find(|c| c.name == name).map(|c| c.from.clone()).unwrap_or_else(|| name.to_string());
    let columns: Vec<String> = spec.columns.iter().map(|c| quote_ident(&c.from)).collect();
    let mut sql = format!("SELECT {} FROM {from}", columns.join(", "));
    if let (Some(w), Some(value)) = (&spec.watermark, watermark) {
        sql.push_str(&format!(" WHERE {} > {}", quote_ident(&from_name(w)), quote_literal(value)));
    }
    if !spec.key.is_empty() {
        sql.push_str(&format!(" ORDER BY {}", spec.key.iter().map(|k| quote_ident(&from_name(k))).collect::<Vec<_>>().join(", ")));
    }
    sql
}

/// A source's rows, staged.
pub struct Staged {
    pub path: PathBuf,
    /// The SELECT returned no row (the file is the header alone).
    pub empty: bool,
}

/// Runs a source's SELECT and writes its rows as CSV with a header to `<dir>/<table>.csv`.
pub async fn stage(t: &Transform, spec: &SourceTransform, pg: &PostgresSpec, watermark: Option<&str>, dir: &Path) -> Result<Staged> {
    let shown = redacted(&pg.url.value);
    let fail = |message: String| -> Error { DataError::Input { file: t.file.clone(), line: None, message }.into() };
    let config = config(&pg.url.value).map_err(|e| fail(format!("PostgreSQL source of table '{}': {e}", t.name)))?;
    // An unreachable server is a failed run (exit 1, worth a retry), not bad data.
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
        Error::io(
            &t.file,
            std::io::Error::other(format!(
                "PostgreSQL source of table '{}': cannot connect to {shown}: {}; check `source.postgres.url` and that the server is up",
                t.name,
                describe(&e)
            )),
        )
    })?;
    let connection = tokio::spawn(connection);
    let sql = select(spec, pg, watermark);
    let query_error = |e: tokio_postgres::Error| {
        fail(format!("PostgreSQL source of table '{}' ({shown}): {}; the load ran: {sql}", t.name, describe(&e)))
    };
    client.batch_execute(SESSION).await.map_err(query_error)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(format!("{}.csv", t.name));
    let partial = dir.join(format!("{}.csv.partial", t.name));
    let mut file = tokio::fs::File::create(&partial).await.map_err(|e| Error::io(&partial, e))?;
    let stream = client.copy_out(&format!("COPY ({sql}) TO STDOUT (FORMAT csv, HEADER true)")).await.map_err(query_error)?;
    futures::pin_mut!(stream);
    // The header is one line (column names hold no line break): rows follow its first '\n'.
    let (mut written, mut header_end) = (0usize, None);
    while let Some(chunk) = stream.try_next().await.map_err(query_error)? {
        if header_end.is_none() {
            header_end = chunk.iter().position(|b| *b == b'\n').map(|i| written + i + 1);
        }
        written += chunk.len();
        file.write_all(&chunk).await.map_err(|e| Error::io(&partial, e))?;
    }
    file.flush().await.map_err(|e| Error::io(&partial, e))?;
    drop(file);
    drop(client);
    let _ = connection.await;
    std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
    Ok(Staged { path, empty: header_end.is_none_or(|end| end == written) })
}

/// A driver error as a person reads it: the server's message with its detail and hint, or the
/// connection failure with its cause.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = db.message().to_string();
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_in_both_url_forms() {
        assert_eq!(redacted("postgres://crm:s3cret@db:5432/crm"), "postgres://crm:***@db:5432/crm");
        assert_eq!(redacted("postgres://crm@db/crm"), "postgres://crm@db/crm");
        assert_eq!(redacted("host=db user=crm password=s3cret dbname=crm"), "host=db user=crm password=*** dbname=crm");
    }

    #[test]
    fn unset_variables_are_named() {
        let e = expand("postgres://crm:${CRMCUBE_TEST_SURELY_UNSET}@db/crm").unwrap_err();
        assert!(e.contains("CRMCUBE_TEST_SURELY_UNSET"), "{e}");
        assert_eq!(expand("postgres://crm@db/crm").unwrap(), "postgres://crm@db/crm");
        assert!(check_url("postgres://crm:${X}@db/crm").is_ok());
        assert!(check_url("postgres://crm@db:notaport/crm").is_err());
    }
}
