//! Printing results: an aligned table for people, CSV and JSON for programs.

use std::io::Write;

use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

use unicode_width::UnicodeWidthStr;

use crate::error::{Error, Result};

/// Output formats of `query` and `sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, numbers right-aligned with thousands separators.
    Table,
    Csv,
    /// One JSON object per row, in an array.
    Json,
}

/// Writes `batches` to `out` in `format`.
pub fn write(out: &mut dyn Write, batches: &[RecordBatch], format: Format) -> Result<()> {
    write_with_totals(out, batches, None, format)
}

/// Writes `batches`; a table also gets a `Total` row from `totals` (one row of the measures,
/// which are the last columns of `batches`).
pub fn write_with_totals(out: &mut dyn Write, batches: &[RecordBatch], totals: Option<&[RecordBatch]>, format: Format) -> Result<()> {
    let io = |e| Error::io("<stdout>", e);
    match format {
        Format::Table => out.write_all(table_with_totals(batches, totals)?.as_bytes()).map_err(io),
        Format::Csv => {
            let mut w = datafusion::arrow::csv::WriterBuilder::new().with_header(true).build(&mut *out);
            for b in batches {
                w.write(b)?;
            }
            Ok(())
        }
        Format::Json => {
            let mut w = datafusion::arrow::json::ArrayWriter::new(&mut *out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            drop(w);
            out.write_all(b"\n").map_err(io)
        }
    }
}

/// Writes `batches` to a file whose extension names the format: csv, json, parquet, arrow.
pub fn write_file(path: &std::path::Path, batches: &[RecordBatch]) -> Result<()> {
    let io = |e| Error::io(path, e);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let file = std::fs::File::create(path).map_err(io)?;
    let schema = match batches.first() {
        Some(b) => b.schema(),
        None => std::sync::Arc::new(datafusion::arrow::datatypes::Schema::empty()),
    };
    match ext.as_str() {
        "csv" => write(&mut std::io::BufWriter::new(file), batches, Format::Csv),
        "json" => write(&mut std::io::BufWriter::new(file), batches, Format::Json),
        "parquet" => {
            let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None)?;
            for b in batches {
                w.write(b)?;
            }
            w.close()?;
            Ok(())
        }
        "arrow" | "ipc" | "feather" => {
            let mut w = datafusion::arrow::ipc::writer::FileWriter::try_new(file, &schema)?;
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            Ok(())
        }
        "xlsx" => write_xlsx(path, batches),
        other => Err(crate::error::QueryError::new(format!("cannot write '.{other}' files"))
            .with_hint(Some("use .csv, .json, .parquet, .arrow or .xlsx".into()))
            .into()),
    }
}

/// An Excel workbook with one sheet: a bold header, numbers as numbers (thousands separators,
/// two decimals for amounts), everything else as text.
fn write_xlsx(path: &std::path::Path, batches: &[RecordBatch]) -> Result<()> {
    use rust_xlsxwriter::{Format as XlsxFormat, Workbook};
    let failed = |e: rust_xlsxwriter::XlsxError| Error::Internal(format!("writing {}: {e}", path.display()));
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    let bold = XlsxFormat::new().set_bold();
    let amount = XlsxFormat::new().set_num_format("#,##0.00");
    let whole = XlsxFormat::new().set_num_format("0");
    let Some(first) = batches.first() else {
        workbook.save(path).map_err(failed)?;
        return Ok(());
    };
    let schema = first.schema();
    for (c, f) in schema.fields().iter().enumerate() {
        sheet.write_string_with_format(0, c as u16, f.name(), &bold).map_err(failed)?;
    }
    let options = FormatOptions::default();
    let mut row = 1u32;
    for b in batches {
        for (c, column) in b.columns().iter().enumerate() {
            let dt = column.data_type();
            if dt.is_numeric() {
                let values = datafusion::arrow::compute::cast(column, &DataType::Float64)?;
                let values = values.as_any().downcast_ref::<datafusion::arrow::array::Float64Array>().expect("cast to Float64");
                let format = if dt.is_integer() { &whole } else { &amount };
                for i in 0..values.len() {
                    if !values.is_null(i) {
                        sheet.write_number_with_format(row + i as u32, c as u16, values.value(i), format).map_err(failed)?;
                    }
                }
            } else {
                let text = ArrayFormatter::try_new(column.as_ref(), &options)?;
                for i in 0..column.len() {
                    if !column.is_null(i) {
                        sheet.write_string(row + i as u32, c as u16, text.value(i).to_string()).map_err(failed)?;
                    }
                }
            }
        }
        row += b.num_rows() as u32;
    }
    sheet.autofit();
    workbook.save(path).map_err(failed)?;
    Ok(())
}

/// Inserts thousands separators into the integer part of a formatted number.
pub fn group_thousands(s: &str) -> String {
    let (sign, rest) = s.strip_prefix('-').map(|r| ("-", r)).unwrap_or(("", s));
    let (int, frac) = match rest.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (rest, None),
    };
    if !int.bytes().all(|b| b.is_ascii_digit()) {
        return s.to_string();
    }
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// Renders batches as an aligned text table.
pub fn table(batches: &[RecordBatch]) -> Result<String> {
    table_with_totals(batches, None)
}

/// Formats one cell for people: numbers with thousands separators, floats to two places.
fn cell(c: &dyn Array, f: &ArrayFormatter<'_>, row: usize) -> String {
    if c.is_null(row) {
        String::new()
    } else if matches!(c.data_type(), DataType::Float32 | DataType::Float64) {
        let v: f64 = f.value(row).to_string().parse().unwrap_or(f64::NAN);
        group_thousands(&format!("{v:.2}"))
    } else if c.data_type().is_integer() {
        // Four-digit integers are left alone so that years read as years.
        let v = f.value(row).to_string();
        if v.trim_start_matches('-').len() > 4 { group_thousands(&v) } else { v }
    } else if c.data_type().is_numeric() {
        group_thousands(&f.value(row).to_string())
    } else {
        f.value(row).to_string()
    }
}

/// Renders batches as an aligned text table, with a totals row when `totals` is given.
pub fn table_with_totals(batches: &[RecordBatch], totals: Option<&[RecordBatch]>) -> Result<String> {
    let Some(first) = batches.first() else {
        return Ok("(no rows)\n".to_string());
    };
    let schema = first.schema();
    let mut cells: Vec<Vec<String>> = vec![schema.fields().iter().map(|f| f.name().clone()).collect()];
    let numeric: Vec<bool> = schema.fields().iter().map(|f| f.data_type().is_numeric()).collect();
    let options = FormatOptions::default().with_null("");
    for b in batches {
        let formatters = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for row in 0..b.num_rows() {
            cells.push(b.columns().iter().zip(&formatters).map(|(c, f)| cell(c.as_ref(), f, row)).collect());
        }
    }
    let rows = cells.len() - 1;
    let mut total_row: Option<Vec<String>> = None;
    if let Some(t) = totals.and_then(|t| t.iter().find(|b| b.num_rows() == 1)) {
        let n = numeric.len();
        let k = t.num_columns().min(n.saturating_sub(1));
        let mut row = vec![String::new(); n];
        row[0] = "Total".to_string();
        for j in 0..k {
            let c = t.column(t.num_columns() - k + j);
            let f = ArrayFormatter::try_new(c.as_ref(), &options)?;
            row[n - k + j] = cell(c.as_ref(), &f, 0);
        }
        cells.push(row.clone());
        total_row = Some(row);
    }
    let widths: Vec<usize> = (0..numeric.len()).map(|i| cells.iter().map(|r| r[i].width()).max().unwrap_or(0)).collect();
    // Pads by display width: a CJK character takes two terminal columns.
    let pad = |c: &str, w: usize, right: bool| {
        let fill = " ".repeat(w.saturating_sub(c.width()));
        if right { format!("{fill}{c}") } else { format!("{c}{fill}") }
    };
    let mut out = String::new();
    let rule: Vec<String> = widths.iter().map(|w| "─".repeat(*w)).collect();
    let rule = rule.join("  ");
    for (n, row) in cells.iter().enumerate() {
        if n == rows + 1 && total_row.is_some() {
            out.push_str(&rule);
            out.push('\n');
        }
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| pad(c, widths[i], numeric[i] && n > 0))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            out.push_str(&rule);
            out.push('\n');
        }
    }
    out.push_str(&format!("({rows} row{})\n", if rows == 1 { "" } else { "s" }));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::group_thousands;

    #[test]
    fn thousands_are_grouped_in_the_integer_part_only() {
        assert_eq!(group_thousands("1234567.891"), "1,234,567.891");
        assert_eq!(group_thousands("-1234"), "-1,234");
        assert_eq!(group_thousands("123"), "123");
        assert_eq!(group_thousands("2025-01"), "2025-01");
    }
}
