//! `crmcube scan`: reads unknown exports and writes draft transforms, as the old analytical-CRM
//! transformers scanned OLTP structures into metadata.
//!
//! For each file it finds the encoding (UTF-8, else GBK; a BOM is skipped), the format (JSON
//! lines or CSV), the CSV delimiter (the candidate that splits the first records into the same
//! number of fields most often) and whether the first line is a header (every field distinct
//! text that is not a number or date). Then per column, over up to [`SAMPLE_ROWS`] records: the
//! type (boolean, integer, decimal with its scale, float, date, timestamp with the chrono
//! formats that read its values, else text) — chosen when at least [`TYPE_SHARE`] of the
//! non-blank values parse, so a few dirty values become quarantined rows rather than a text
//! column — whether blanks occur (nullable), and for short lists of text values whether their
//! case varies (`case: lower`) with the values seen as a comment. Across the files: a key (the
//! first column whose values are all present and distinct, else the first such pair) and
//! references (a column whose distinct values are, nearly all, another file's key values).
//!
//! The draft is a starting point: business rules (ranges, allowed values, duplicate rules) are
//! left for the analyst, and `crmcube check` validates the result like any transform.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Error, Result};
use crate::etl::parse::{parse_date, parse_decimal, parse_timestamp};
use crate::etl::spec::{ColumnType, SourceEncoding};

/// Records read per file for types and keys.
pub const SAMPLE_ROWS: usize = 200_000;
/// Share of a column's non-blank values that must parse for it to get a type.
pub const TYPE_SHARE: f64 = 0.95;
/// Share of a column's values (rows) found among another table's keys for a reference.
pub const REFERENCE_SHARE: f64 = 0.9;

const DATE_FORMATS: &[&str] = &["%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%Y/%m/%d", "%d.%m.%Y", "%d-%m-%Y", "%Y%m%d"];
const TIMESTAMP_FORMATS: &[&str] = &[
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M",
    "%d/%m/%Y %H:%M:%S",
    "%d/%m/%Y %H:%M",
    "%m/%d/%Y %H:%M:%S",
    "%Y/%m/%d %H:%M:%S",
];

/// What scan found in one export file.
#[derive(Debug, Clone)]
pub struct ScannedFile {
    /// The file, and its path relative to the sources folder when it is under it.
    pub file: PathBuf,
    pub source_path: String,
    /// A database table instead of a file: (connection URL for the draft, schema.table).
    pub database: Option<(String, String)>,
    pub table: String,
    pub encoding: SourceEncoding,
    pub jsonl: bool,
    pub delimiter: char,
    pub header: bool,
    /// Records read (all, or the first [`SAMPLE_ROWS`]).
    pub rows: usize,
    pub columns: Vec<ScannedColumn>,
    pub key: Vec<String>,
    /// When key values repeat: the date or timestamp column whose latest value wins.
    pub latest_by: Option<String>,
    /// (column, table, key column)
    pub references: Vec<(String, String, String)>,
}

#[derive(Debug, Clone)]
pub struct ScannedColumn {
    pub name: String,
    /// The header name or JSON key, when it differs from `name`.
    pub from: String,
    pub ty: ColumnType,
    pub formats: Vec<String>,
    pub scale: Option<u32>,
    pub nullable: bool,
    pub lower: bool,
    /// Distinct values of a short text list (after lower-casing when `lower`).
    pub values: Vec<String>,
    /// Non-blank values that do not parse as `ty` (they will be quarantined).
    pub misfits: usize,
}

/// Scans a file or every `.csv`/`.tsv`/`.txt`/`.jsonl`/`.ndjson` file of a folder.
pub fn scan(path: &Path, sources_dir: &Path) -> Result<Vec<ScannedFile>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().and_then(|e| e.to_str()).is_some_and(|e| ["csv", "tsv", "txt", "jsonl", "ndjson"].contains(&e.to_ascii_lowercase().as_str())))
            .collect();
        f.sort();
        f
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder to scan")));
    };
    if files.is_empty() {
        return Err(DataError::Input { file: path.to_path_buf(), line: None, message: "no .csv, .tsv, .txt, .jsonl or .ndjson file to scan here".into() }.into());
    }
    let mut scanned = Vec::new();
    let mut records = Vec::new();
    for f in &files {
        let (s, r) = scan_file(f, sources_dir)?;
        scanned.push(s);
        records.push(r);
    }
    // Table names must differ (orders.csv and orders.jsonl).
    let mut seen = BTreeMap::<String, usize>::new();
    for s in &mut scanned {
        let n = seen.entry(s.table.clone()).or_default();
        *n += 1;
        if *n > 1 {
            s.table = format!("{}_{}", s.table, n);
        }
    }
    find_references(&mut scanned, &records);
    Ok(scanned)
}

/// The text fields of a file's records, by column.
type Records = Vec<Vec<Option<String>>>;

fn scan_file(file: &Path, sources_dir: &Path) -> Result<(ScannedFile, Records)> {
    let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
    let stripped = bytes.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(&bytes);
    let encoding = if std::str::from_utf8(stripped).is_ok() { SourceEncoding::Utf8 } else { SourceEncoding::Gbk };
    let text = crate::etl::extract::decode(&bytes, encoding, file)?;
    // The draft's path is relative to the sources folder when the file is in it (compared as
    // absolute paths: the command may name the file relative to the current folder).
    let absolute = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let source_path = absolute(file)
        .strip_prefix(absolute(sources_dir))
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_else(|_| file.file_name().unwrap_or_default().to_string_lossy().to_string());
    let stem = file.file_stem().unwrap_or_default().to_string_lossy().to_string();
    let table = snake(&stem);
    let jsonl = matches!(file.extension().and_then(|e| e.to_str()), Some("jsonl" | "ndjson")) || text.trim_start().starts_with('{');

    let (names, rows, delimiter, header) = if jsonl {
        let (names, rows) = json_rows(&text);
        (names, rows, ',', true)
    } else {
        csv_rows(&text)
    };
    if names.is_empty() {
        return Err(DataError::Input { file: file.to_path_buf(), line: None, message: "no record to scan: the file is empty".into() }.into());
    }
    let n = rows.len();
    let mut by_column: Records = vec![Vec::with_capacity(n); names.len()];
    for r in &rows {
        for (i, c) in by_column.iter_mut().enumerate() {
            c.push(r.get(i).cloned().flatten().map(|v| v.trim().to_string()).filter(|v| !v.is_empty()));
        }
    }
    let mut used = BTreeSet::new();
    let columns: Vec<ScannedColumn> = names
        .iter()
        .zip(&by_column)
        .map(|(from, values)| {
            let mut name = snake(from);
            while !used.insert(name.clone()) {
                name.push('_');
            }
            profile(name, from.clone(), values)
        })
        .collect();
    let key = find_key(&columns, &by_column);
    let latest_by = find_latest_by(&columns, &by_column, &key);
    Ok((ScannedFile { file: file.to_path_buf(), source_path, database: None, table, encoding, jsonl, delimiter, header, rows: n, columns, key, latest_by, references: Vec::new() }, by_column))
}

/// Column names and records of a JSON-lines file (keys in first-seen order).
fn json_rows(text: &str) -> (Vec<String>, Vec<Vec<Option<String>>>) {
    let mut names: Vec<String> = Vec::new();
    let mut objects = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(SAMPLE_ROWS) {
        let Ok(obj) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line) else { continue };
        for k in obj.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
        objects.push(obj);
    }
    let rows = objects
        .iter()
        .map(|o| {
            names
                .iter()
                .map(|k| match o.get(k) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(v) => Some(v.to_string()),
                })
                .collect()
        })
        .collect();
    (names, rows)
}

/// Names, records, delimiter and header flag of a CSV text.
fn csv_rows(text: &str) -> (Vec<String>, Vec<Vec<Option<String>>>, char, bool) {
    let read = |delimiter: u8, limit: usize| -> Vec<Vec<String>> {
        csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(false)
            .flexible(true)
            .from_reader(text.as_bytes())
            .records()
            .filter_map(|r| r.ok())
            .filter(|r| !(r.len() == 1 && r.get(0).is_some_and(|f| f.trim().is_empty())))
            .take(limit)
            .map(|r| r.iter().map(str::to_string).collect())
            .collect()
    };
    // The delimiter whose most common field count (> 1) covers the most of the first records.
    let mut best = (b',', 0usize, 0usize);
    for d in [b',', b';', b'\t', b'|'] {
        let records = read(d, 100);
        let mut widths = BTreeMap::<usize, usize>::new();
        for r in &records {
            *widths.entry(r.len()).or_default() += 1;
        }
        if let Some((width, count)) = widths.into_iter().filter(|(w, _)| *w > 1).max_by_key(|(w, c)| (*c, *w))
            && (count, width) > (best.1, best.2)
        {
            best = (d, count, width);
        }
    }
    let (delimiter, _, width) = best;
    let mut records = read(delimiter, SAMPLE_ROWS + 1);
    if records.is_empty() {
        return (Vec::new(), Vec::new(), delimiter as char, true);
    }
    let width = width.max(1);
    let first = &records[0];
    let distinct: BTreeSet<&str> = first.iter().map(|f| f.trim()).collect();
    let header = first.len() == width
        && distinct.len() == first.len()
        && first.iter().all(|f| {
            let f = f.trim();
            !f.is_empty() && parse_decimal(f, 6).is_none() && f.parse::<f64>().is_err() && date_formats(f).is_empty()
        });
    let names: Vec<String> = if header { records.remove(0).iter().map(|f| f.trim().to_string()).collect() } else { (1..=width).map(|i| format!("column_{i}")).collect() };
    let rows = records.into_iter().map(|r| r.into_iter().map(Some).collect()).collect();
    (names, rows, delimiter as char, header)
}

fn date_formats(v: &str) -> Vec<&'static str> {
    DATE_FORMATS.iter().copied().filter(|f| parse_date(v, &[f.to_string()]).is_some()).collect()
}

fn timestamp_formats(v: &str) -> Vec<&'static str> {
    TIMESTAMP_FORMATS.iter().copied().filter(|f| parse_timestamp(v, &[f.to_string()]).is_some()).collect()
}

/// Type, formats, nullability and case of one column's values.
fn profile(name: String, from: String, values: &[Option<String>]) -> ScannedColumn {
    let present: Vec<&str> = values.iter().flatten().map(String::as_str).collect();
    let nullable = present.len() < values.len();
    let mut column = ScannedColumn { name, from, ty: ColumnType::String, formats: Vec::new(), scale: None, nullable, lower: false, values: Vec::new(), misfits: 0 };
    if present.is_empty() {
        return column;
    }
    let enough = |ok: usize| ok as f64 >= TYPE_SHARE * present.len() as f64;
    let count = |f: &dyn Fn(&str) -> bool| present.iter().filter(|v| f(v)).count();

    let booleans = count(&|v| ["true", "false", "yes", "no"].contains(&v.to_ascii_lowercase().as_str()));
    // Integers keep their leading zeros and long digit strings (codes, phone numbers) as text.
    let is_integer = |v: &str| {
        let digits = v.strip_prefix('-').unwrap_or(v);
        !digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit()) && !(digits.len() > 1 && digits.starts_with('0'))
    };
    let leading_zero_codes = present.iter().any(|v| v.len() > 1 && v.starts_with('0') && v.bytes().all(|b| b.is_ascii_digit()));
    let integers = count(&is_integer);
    let fraction_digits = |v: &str| v.rsplit_once('.').map(|(_, f)| f.trim_end_matches(|c: char| !c.is_ascii_digit()).len() as u32).unwrap_or(0);
    let scale = present.iter().filter(|v| parse_decimal(v, 6).is_some()).map(|v| fraction_digits(v)).max().unwrap_or(0);
    let decimals = count(&|v| parse_decimal(v, scale.max(2)).is_some());
    let floats = count(&|v| v.parse::<f64>().is_ok_and(f64::is_finite));

    let (ty, misfit) = if enough(booleans) {
        (ColumnType::Boolean, present.len() - booleans)
    } else if enough(integers) && !leading_zero_codes {
        (ColumnType::Integer, present.len() - integers)
    } else if enough(decimals) && scale <= 4 && !leading_zero_codes {
        column.scale = (scale > 2).then_some(scale);
        (ColumnType::Decimal, present.len() - decimals)
    } else if enough(floats) && !leading_zero_codes {
        (ColumnType::Float, present.len() - floats)
    } else if let Some((formats, ok)) = cover(&present, date_formats) {
        column.formats = formats;
        (ColumnType::Date, present.len() - ok)
    } else if let Some((formats, ok)) = cover(&present, timestamp_formats) {
        column.formats = formats;
        (ColumnType::Timestamp, present.len() - ok)
    } else {
        (ColumnType::String, 0)
    };
    column.ty = ty;
    column.misfits = misfit;
    if ty == ColumnType::String {
        let distinct: BTreeSet<&str> = present.iter().copied().collect();
        let folded: BTreeSet<String> = distinct.iter().map(|v| v.to_lowercase()).collect();
        if folded.len() <= 12 && present.len() >= 20 && folded.len() * 4 <= present.len() {
            column.lower = folded.len() < distinct.len();
            column.values = if column.lower { folded.into_iter().collect() } else { distinct.iter().map(|v| v.to_string()).collect() };
        }
    }
    column
}

/// The fewest formats (greedily, most values first) that read enough of the values, and how
/// many they read; None when they cannot.
fn cover(present: &[&str], formats_of: fn(&str) -> Vec<&'static str>) -> Option<(Vec<String>, usize)> {
    let per_value: Vec<Vec<&'static str>> = present.iter().map(|v| formats_of(v)).collect();
    let readable = per_value.iter().filter(|f| !f.is_empty()).count();
    if (readable as f64) < TYPE_SHARE * present.len() as f64 {
        return None;
    }
    let mut chosen: Vec<&'static str> = Vec::new();
    let mut left: Vec<&Vec<&'static str>> = per_value.iter().filter(|f| !f.is_empty()).collect();
    while !left.is_empty() {
        // The format reading most of the values still unread (ties: the earlier in the list,
        // so 03/04/2024 reads day first when nothing tells).
        let mut counts = BTreeMap::<usize, (usize, &'static str)>::new();
        for f in &left {
            for fmt in f.iter() {
                let rank = DATE_FORMATS.iter().chain(TIMESTAMP_FORMATS).position(|x| x == fmt).unwrap_or(usize::MAX);
                counts.entry(rank).or_insert((0, fmt)).0 += 1;
            }
        }
        let (_, (_, best)) = counts.into_iter().max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.0.cmp(&a.0)))?;
        chosen.push(best);
        left.retain(|f| !f.contains(&best));
    }
    Some((chosen.into_iter().map(str::to_string).collect(), readable))
}

/// The first column whose values are all present and distinct, else the first such pair among
/// the first four columns; none when neither exists.
fn find_key(columns: &[ScannedColumn], values: &Records) -> Vec<String> {
    let unique = |idx: &[usize]| {
        let mut seen = BTreeSet::new();
        (0..values.first().map_or(0, Vec::len)).all(|r| {
            let key: Option<Vec<&String>> = idx.iter().map(|i| values[*i][r].as_ref()).collect();
            key.is_some_and(|k| seen.insert(k))
        })
    };
    let keyable = |i: usize| !matches!(columns[i].ty, ColumnType::Float | ColumnType::Boolean | ColumnType::Decimal);
    if let Some(i) = (0..columns.len()).filter(|i| keyable(*i)).find(|i| unique(&[*i])) {
        return vec![columns[i].name.clone()];
    }
    let first = columns.len().min(4);
    for a in 0..first {
        for b in a + 1..first {
            if keyable(a) && keyable(b) && unique(&[a, b]) {
                return vec![columns[a].name.clone(), columns[b].name.clone()];
            }
        }
    }
    // An export that repeats changed rows (a customer re-exported when it changes): an id column
    // without blanks whose values are nearly all distinct.
    let rows = values.first().map_or(0, Vec::len);
    let id_like = |n: &str| n == "id" || n.ends_with("_id") || n.ends_with("_no") || n.ends_with("_code");
    (0..columns.len())
        .filter(|i| keyable(*i) && id_like(&columns[*i].name) && !columns[*i].nullable)
        .find(|i| values[*i].iter().flatten().collect::<BTreeSet<_>>().len() as f64 >= 0.9 * rows as f64)
        .map(|i| vec![columns[i].name.clone()])
        .unwrap_or_default()
}

/// For a key with repeated values, the column telling which repeat is the latest: a date or
/// timestamp column named like `updated_at`, `modified`, `changed_at`.
fn find_latest_by(columns: &[ScannedColumn], values: &Records, key: &[String]) -> Option<String> {
    let idx: Vec<usize> = key.iter().filter_map(|k| columns.iter().position(|c| &c.name == k)).collect();
    let rows = values.first().map_or(0, Vec::len);
    let mut seen = BTreeSet::new();
    let repeated = (0..rows).any(|r| !seen.insert(idx.iter().map(|i| values[*i][r].as_ref()).collect::<Vec<_>>()));
    if !repeated {
        return None;
    }
    columns
        .iter()
        .filter(|c| matches!(c.ty, ColumnType::Date | ColumnType::Timestamp))
        .find(|c| ["updat", "modif", "chang", "last"].iter().any(|w| c.name.contains(w)))
        .map(|c| c.name.clone())
}

/// A column references another file's single-column key when nearly all its values (by rows)
/// are that key's values and its name is the key's name or ends in `id`.
fn find_references(files: &mut [ScannedFile], records: &[Records]) {
    let keys: Vec<(usize, usize, BTreeSet<&String>)> = files
        .iter()
        .enumerate()
        .filter(|(_, f)| f.key.len() == 1)
        .map(|(fi, f)| {
            let ci = f.columns.iter().position(|c| c.name == f.key[0]).expect("key is a column");
            (fi, ci, records[fi][ci].iter().flatten().collect())
        })
        .collect();
    let mut found = vec![Vec::new(); files.len()];
    for (fi, f) in files.iter().enumerate() {
        for (ci, c) in f.columns.iter().enumerate() {
            if f.key.len() == 1 && f.key[0] == c.name {
                continue;
            }
            let present: Vec<&String> = records[fi][ci].iter().flatten().collect();
            if present.iter().collect::<BTreeSet<_>>().len() < 2 {
                continue;
            }
            for (ki, kc, key_values) in &keys {
                let target = &files[*ki];
                let key_name = &target.columns[*kc].name;
                if *ki == fi || !(c.name == *key_name || c.name.ends_with("id")) || target.columns[*kc].ty != c.ty {
                    continue;
                }
                // By rows, not distinct values: a few orphan rows with many odd values (the
                // dirt the load will quarantine) do not hide the reference.
                let inside = present.iter().filter(|v| key_values.contains(*v)).count();
                if inside as f64 >= REFERENCE_SHARE * present.len() as f64 {
                    found[fi].push((c.name.clone(), target.table.clone(), key_name.clone()));
                    break;
                }
            }
        }
    }
    for (f, refs) in files.iter_mut().zip(found) {
        f.references = refs;
    }
}

/// `Credit Limit` → `credit_limit`, `VendorID` → `vendor_id`, `客户` stays.
pub fn snake(name: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = name.trim().chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if c.is_alphanumeric() {
            let boundary = c.is_uppercase() && i > 0 && (chars[i - 1].is_lowercase() || (chars[i - 1].is_uppercase() && chars.get(i + 1).is_some_and(|n| n.is_lowercase())));
            if boundary && !out.ends_with('_') {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_end_matches('_').to_string();
    match out.chars().next() {
        None => "column".into(),
        Some(c) if c.is_ascii_digit() => format!("c_{out}"),
        _ => out,
    }
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

fn type_name(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::String => "string",
        ColumnType::Integer => "integer",
        ColumnType::Decimal => "decimal",
        ColumnType::Float => "float",
        ColumnType::Date => "date",
        ColumnType::Timestamp => "timestamp",
        ColumnType::Boolean => "boolean",
    }
}

/// The draft transform of a scanned file, as YAML.
pub fn draft(f: &ScannedFile) -> String {
    let mut y = String::new();
    let shown = f.file.display();
    match &f.database {
        Some((_, table)) => y.push_str(&format!("# Draft written by `crmcube scan` from the table {table} (types, key and references from the database's catalog).\n")),
        None => y.push_str(&format!("# Draft written by `crmcube scan` from {shown} ({} records read).\n", f.rows)),
    }
    y.push_str("# Check the types, the key and the references, add the business rules (min/max, enum,\n# duplicates), then run `crmcube check` and `crmcube load`.\n");
    if let Some((url, table)) = &f.database {
        y.push_str(&format!("version: 1\ntable: {}\nsource:\n  postgres:\n    url: {}\n    table: {}\n", f.table, quoted(url), quoted(table)));
    } else {
        y.push_str(&format!("version: 1\ntable: {}\nsource:\n  path: {}\n", f.table, quoted(&f.source_path)));
        y.push_str(&format!("  format: {}\n", if f.jsonl { "jsonl" } else { "csv" }));
    }
    if f.encoding == SourceEncoding::Gbk {
        y.push_str("  encoding: gbk\n");
    }
    if !f.jsonl && f.delimiter != ',' {
        y.push_str(&format!("  delimiter: {}\n", quoted(&f.delimiter.to_string())));
    }
    if !f.jsonl && !f.header {
        y.push_str("  header: false\n");
    }
    if !f.key.is_empty() {
        y.push_str(&format!("key: [{}]\n", f.key.join(", ")));
    }
    if let Some(latest) = &f.latest_by {
        y.push_str(&format!("duplicates: {{ latest_by: {latest} }}   # key values repeat: the row with the latest {latest} wins\n"));
    }
    if !f.references.is_empty() {
        y.push_str("references:\n");
        for (column, table, key) in &f.references {
            y.push_str(&format!("  - {{ column: {column}, table: {table}, key: {key} }}\n"));
        }
    }
    y.push_str("columns:\n");
    for c in &f.columns {
        let mut parts = vec![format!("name: {}", c.name)];
        if c.from != c.name && (f.header || f.jsonl || f.database.is_some()) {
            parts.push(format!("from: {}", quoted(&c.from)));
        }
        parts.push(format!("type: {}", type_name(c.ty)));
        let required = !c.nullable || f.key.contains(&c.name);
        if required {
            parts.push("nullable: false".into());
        }
        if !c.formats.is_empty() {
            parts.push(format!("formats: [{}]", c.formats.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ")));
        }
        if let Some(s) = c.scale {
            parts.push(format!("scale: {s}"));
        }
        if c.lower {
            parts.push("case: lower".into());
        }
        let mut line = format!("  - {{ {} }}", parts.join(", "));
        let mut notes = Vec::new();
        if !c.values.is_empty() {
            notes.push(format!("values seen: {}", c.values.join(", ")));
        }
        if c.misfits > 0 {
            notes.push(format!("{} value(s) do not parse: they will be quarantined", c.misfits));
        }
        if !notes.is_empty() {
            line.push_str(&format!("   # {}", notes.join("; ")));
        }
        y.push_str(&line);
        y.push('\n');
    }
    y
}

/// Scans the tables and views of a PostgreSQL database from its catalog: column types,
/// nullability, primary keys and single-column foreign keys. The drafts read each table with
/// `source.postgres` (the URL's password replaced by `${PGPASSWORD}`).
pub async fn scan_postgres(url: &str) -> Result<Vec<ScannedFile>> {
    use crate::etl::postgres::{config, describe, redacted};
    let shown = redacted(url);
    let failed = |what: &str, e: tokio_postgres::Error| -> Error { Error::io(PathBuf::from(&shown), std::io::Error::other(format!("{what}: {}", describe(&e)))) };
    let cfg = config(url).map_err(|e| DataError::Input { file: PathBuf::from(&shown), line: None, message: e })?;
    let (client, connection) = cfg.connect(tokio_postgres::NoTls).await.map_err(|e| failed("cannot connect", e))?;
    let connection = tokio::spawn(connection);
    let rows = |sql: &'static str| {
        let client = &client;
        async move {
            let messages = client.simple_query(sql).await.map_err(|e| failed("cannot read the catalog", e))?;
            Ok::<_, Error>(
                messages
                    .into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect::<Vec<_>>()),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            )
        }
    };
    let columns = rows(
        "SELECT c.table_schema, c.table_name, c.column_name, c.data_type, c.numeric_scale, c.is_nullable
         FROM information_schema.columns c JOIN information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name
         WHERE t.table_type IN ('BASE TABLE', 'VIEW') AND c.table_schema NOT IN ('pg_catalog', 'information_schema')
         ORDER BY 1, 2, c.ordinal_position",
    )
    .await?;
    let keys = rows(
        "SELECT k.table_schema, k.table_name, k.column_name
         FROM information_schema.table_constraints c JOIN information_schema.key_column_usage k
           ON k.constraint_schema = c.constraint_schema AND k.constraint_name = c.constraint_name
         WHERE c.constraint_type = 'PRIMARY KEY' ORDER BY 1, 2, k.ordinal_position",
    )
    .await?;
    let foreign = rows(
        "SELECT k.table_schema, k.table_name, k.column_name, u.table_schema, u.table_name, u.column_name
         FROM information_schema.table_constraints c
         JOIN information_schema.key_column_usage k ON k.constraint_schema = c.constraint_schema AND k.constraint_name = c.constraint_name
         JOIN information_schema.constraint_column_usage u ON u.constraint_schema = c.constraint_schema AND u.constraint_name = c.constraint_name
         WHERE c.constraint_type = 'FOREIGN KEY' ORDER BY 1, 2, 3",
    )
    .await?;
    drop(client);
    let _ = connection.await;

    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    // (schema, table) in catalog order; a table name found in two schemas keeps its schema.
    let mut tables: Vec<(String, String)> = Vec::new();
    for c in &columns {
        let t = (text(&c[0]), text(&c[1]));
        if tables.last() != Some(&t) {
            tables.push(t);
        }
    }
    let name_of = |schema: &str, table: &str| {
        let twice = tables.iter().filter(|(_, t)| t == table).count() > 1;
        if twice { snake(&format!("{schema}_{table}")) } else { snake(table) }
    };
    let draft_url = draft_url(url);
    let mut scanned = Vec::new();
    for (schema, table) in &tables {
        let mine = |r: &&Vec<Option<String>>| text(&r[0]) == *schema && text(&r[1]) == *table;
        let cols: Vec<ScannedColumn> = columns
            .iter()
            .filter(mine)
            .map(|c| {
                let from = text(&c[2]);
                let scale: Option<u32> = c[4].as_deref().and_then(|s| s.parse().ok());
                let (ty, formats) = match text(&c[3]).as_str() {
                    "smallint" | "integer" | "bigint" => (ColumnType::Integer, vec![]),
                    "numeric" if scale.is_some_and(|s| s <= 6) => (ColumnType::Decimal, vec![]),
                    "numeric" | "real" | "double precision" => (ColumnType::Float, vec![]),
                    "boolean" => (ColumnType::Boolean, vec![]),
                    "date" => (ColumnType::Date, vec!["%Y-%m-%d".to_string()]),
                    "timestamp without time zone" => (ColumnType::Timestamp, vec!["%Y-%m-%d %H:%M:%S%.f".to_string()]),
                    _ => (ColumnType::String, vec![]),
                };
                ScannedColumn {
                    name: snake(&from),
                    from,
                    ty,
                    formats,
                    scale: scale.filter(|s| ty == ColumnType::Decimal && *s != 2),
                    nullable: text(&c[5]) == "YES",
                    lower: false,
                    values: Vec::new(),
                    misfits: 0,
                }
            })
            .collect();
        let key = keys.iter().filter(mine).map(|k| snake(&text(&k[2]))).collect();
        let qualified = format!("{schema}.{table}");
        let references = foreign
            .iter()
            .filter(mine)
            .filter(|f| tables.iter().any(|(s, t)| *s == text(&f[3]) && *t == text(&f[4])))
            .map(|f| (snake(&text(&f[2])), name_of(&text(&f[3]), &text(&f[4])), snake(&text(&f[5]))))
            .collect();
        scanned.push(ScannedFile {
            file: PathBuf::from(&qualified),
            source_path: qualified.clone(),
            database: Some((draft_url.clone(), qualified)),
            table: name_of(schema, table),
            encoding: SourceEncoding::Utf8,
            jsonl: false,
            delimiter: ',',
            header: true,
            rows: 0,
            columns: cols,
            key,
            latest_by: None,
            references,
        });
    }
    if scanned.is_empty() {
        return Err(DataError::Input { file: PathBuf::from(&shown), line: None, message: "the database has no table or view outside the system schemas".into() }.into());
    }
    Ok(scanned)
}

/// The URL a draft names: a password in it becomes `${PGPASSWORD}`, to be set in the environment.
fn draft_url(url: &str) -> String {
    let redacted = crate::etl::postgres::redacted(url);
    redacted.replace(":***@", ":${PGPASSWORD}@").replace("password=***", "password=${PGPASSWORD}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_snake_case() {
        assert_eq!(snake("Credit Limit"), "credit_limit");
        assert_eq!(snake("VendorID"), "vendor_id");
        assert_eq!(snake("orderDate"), "order_date");
        assert_eq!(snake("PO-Number (new)"), "po_number_new");
        assert_eq!(snake("2024 sales"), "c_2024_sales");
        assert_eq!(snake("客户名称"), "客户名称");
    }

    #[test]
    fn types_tolerate_a_few_dirty_values() {
        let v = |xs: &[&str]| xs.iter().map(|x| Some(x.to_string())).collect::<Vec<_>>();
        let mut amounts: Vec<&str> = ["¥1,234.50", "12.00", "7"].repeat(30);
        amounts.push("n/a");
        let c = profile("amount".into(), "amount".into(), &v(&amounts));
        assert_eq!((c.ty, c.misfits), (ColumnType::Decimal, 1));
        let c = profile("d".into(), "d".into(), &v(&["03/01/2024", "25/12/2024", "2024-02-29"]));
        assert_eq!((c.ty, c.formats.clone()), (ColumnType::Date, vec!["%d/%m/%Y".to_string(), "%Y-%m-%d".to_string()]));
        let c = profile("zip".into(), "zip".into(), &v(&["0123", "4567"]));
        assert_eq!(c.ty, ColumnType::String);
        let c = profile("t".into(), "t".into(), &v(&["2024-01-01 10:00:00", "2024-01-02 11:30:00"]));
        assert_eq!((c.ty, c.formats.clone()), (ColumnType::Timestamp, vec!["%Y-%m-%d %H:%M:%S".to_string()]));
    }
}
