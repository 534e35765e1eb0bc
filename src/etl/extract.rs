//! Extract: export files → one Arrow batch of text columns per source, plus rows rejected on read.
//!
//! Files are decoded (UTF-8 or GBK, BOM stripped), split into records (CSV or JSON lines) and
//! kept as text: typing happens in the cleaning plan, so one place decides what a bad value is.
//! Every record carries its file, line and place in the file's text (not the text itself: a
//! quarantined record's text is read back from its file, [`RecordTexts`]). Records that cannot
//! even be split (ragged CSV rows, invalid JSON) are rejected here with their reason. Several
//! files of one source are read in parallel with rayon; the load extracts each source while the
//! one before it is cleaned. Columns are built in Arrow builders (one buffer per column, no string
//! per field); the load reserves their memory before reading (see `etl::load`).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, DictionaryArray, Int32Array, Int64Array, RecordBatch, StringArray, StringBuilder};
use datafusion::arrow::datatypes::Int32Type;
use datafusion::execution::memory_pool::MemoryReservation;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rayon::prelude::*;

use super::spec::{SourceEncoding, SourceFormat};
use super::validate::SourceTransform;
use crate::warehouse::{SourceFile, Stamp};
use crate::error::{DataError, Error, Result, nearest};

/// Hidden columns every extracted batch carries.
pub const FILE_COL: &str = "_file";
pub const LINE_COL: &str = "_line";
/// Where the record lies in its file's decoded text: its first byte and its length.
pub const START_COL: &str = "_start";
pub const LENGTH_COL: &str = "_length";

/// A row that did not make it into a table, and why. Becomes a row of the quarantine table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub table: String,
    pub file: String,
    pub line: i64,
    pub column: Option<String>,
    /// The rule it broke, one word (see [`crate::etl::load::quarantine_schema`]).
    pub rule: &'static str,
    pub reason: String,
    pub raw: String,
}

/// Records a batch of extracted text holds at most: cleaning types a batch at a time and drops
/// its text, so the text held is that of the batches not typed yet.
pub const CHUNK_RECORDS: usize = 1 << 20;

/// The text of one source, ready for cleaning.
#[derive(Debug)]
pub struct Extracted {
    /// Declared columns as Utf8 (by their warehouse name), then `_file`, `_line`, `_start`,
    /// `_length`; in file order, [`CHUNK_RECORDS`] records a batch at most.
    pub batches: Vec<RecordBatch>,
    /// Where the records' texts are read back from, for the ones quarantined.
    pub texts: RecordTexts,
    pub rejects: Vec<Reject>,
    /// Records read, including rejected ones (header lines excluded).
    pub read: u64,
    /// The batch's memory in the load's pool (see [`Self::with_reservation`]); cleaning shrinks
    /// it to the records' places once the fields are typed.
    pub memory: Option<MemoryReservation>,
}

impl Extracted {
    /// Counts the batch against a memory pool for as long as it is held.
    pub fn with_reservation(self, reservation: MemoryReservation) -> Self {
        Self { memory: Some(reservation), ..self }
    }
}

/// Every file matching the source's glob under `sources_dir`, sorted; an error when none does.
pub fn list_files(table: &str, spec: &SourceTransform, sources_dir: &Path) -> Result<Vec<PathBuf>> {
    let pattern = sources_dir.join(&spec.source.path);
    let pattern_text = pattern.to_string_lossy().to_string();
    let mut files: Vec<PathBuf> = glob::glob(&pattern_text)
        .map_err(|e| DataError::Input {
            file: pattern.clone(),
            line: None,
            message: format!("invalid source path pattern: {e}"),
        })?
        .filter_map(|p| p.ok())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::Input {
            file: pattern,
            line: None,
            message: format!("no export file matches the source path of table '{table}'; check `source.path` in its transform"),
        }
        .into());
    }
    Ok(files)
}

/// Each file's path under `sources_dir`, size and SHA-256 (what a snapshot records of it).
///
/// A file `known` (the previous snapshot's files, by path) records with the same size and
/// [`Stamp`] is not read: its recorded checksum stands (a night of a few new files no longer
/// hashes every export, and a re-run none). Any other file is read, and its stamp recorded only
/// if it had settled ([`Stamp::settled_by`]) before the reading began.
pub fn survey(files: &[PathBuf], sources_dir: &Path, known: &std::collections::BTreeMap<String, SourceFile>) -> Result<Vec<SourceFile>> {
    files
        .par_iter()
        .map(|f| {
            let key = f.strip_prefix(sources_dir).unwrap_or(f).to_string_lossy().to_string();
            let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
            let stamp = Stamp::of(&meta);
            if let Some(known) = known.get(&key)
                && stamp.is_some()
                && known.stamp == stamp
                && known.bytes == meta.len()
            {
                return Ok(known.clone());
            }
            let started = std::time::SystemTime::now();
            let read = std::fs::File::open(f).and_then(|file| SourceFile::read(key, file)).map_err(|e| Error::io(f, e))?;
            Ok(SourceFile { stamp: stamp.filter(|s| s.settled_by(started)), ..read })
        })
        .collect()
}

/// Where the texts of a source's records are read back from, by the name its rows give the file.
///
/// A record's text is only needed when the record is quarantined, which for most is never: the
/// extracted batch keeps where each record lies in its file instead of a copy of its text (about
/// the file's size again), and the few quarantined ones are read back from the file by their
/// place once the source is cleaned. The text read back is what extraction would have kept:
/// a JSON line as it is, a CSV record's fields joined by the delimiter.
#[derive(Debug, Clone)]
pub struct RecordTexts {
    format: SourceFormat,
    encoding: SourceEncoding,
    delimiter: char,
    files: std::collections::HashMap<String, TextSource>,
}

#[derive(Debug, Clone)]
enum TextSource {
    File(PathBuf),
    /// An export held in memory ([`extract_bytes`]).
    Bytes(Arc<[u8]>),
}

impl RecordTexts {
    fn new(spec: &SourceTransform) -> Self {
        Self { format: spec.source.format, encoding: spec.source.encoding, delimiter: spec.source.delimiter, files: Default::default() }
    }

    /// The texts of the records of `file` (as its rows name it) at `places` (start, length in
    /// its decoded text), in that order.
    pub fn read(&self, file: &str, places: &[(i64, u32)]) -> Result<Vec<String>> {
        let source = self.files.get(file).ok_or_else(|| Error::Internal(format!("no export named '{file}' was extracted")))?;
        let bad = |path: &Path| DataError::Input {
            file: path.to_path_buf(),
            line: None,
            message: "the export changed after this load read it: a quarantined record's text no longer reads back; load again once the export is complete".into(),
        };
        // The records at their places in a whole export's decoded text.
        let in_text = |bytes: &[u8], path: &Path| -> Result<Vec<String>> {
            let text = decode(bytes, self.encoding, path)?;
            places.iter().map(|&(start, length)| text.get(start as usize..start as usize + length as usize).map(str::to_string).ok_or_else(|| bad(path).into())).collect()
        };
        let texts: Vec<String> = match (source, self.encoding) {
            // UTF-8 text is the file's bytes (after a byte-order mark): each record is read at its place.
            (TextSource::File(path), SourceEncoding::Utf8) => {
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
                let mut bom = [0u8; 3];
                let skip = match f.read_exact_at(&mut bom, 0) {
                    Ok(()) if bom == *b"\xEF\xBB\xBF" => 3,
                    _ => 0,
                };
                places
                    .iter()
                    .map(|&(start, length)| {
                        let mut bytes = vec![0u8; length as usize];
                        f.read_exact_at(&mut bytes, start as u64 + skip).map_err(|e| match e.kind() {
                            std::io::ErrorKind::UnexpectedEof => bad(path).into(),
                            _ => Error::io(path, e),
                        })?;
                        String::from_utf8(bytes).map_err(|_| bad(path).into())
                    })
                    .collect::<Result<_>>()?
            }
            // GBK is decoded whole, as it was read.
            (TextSource::File(path), SourceEncoding::Gbk) => in_text(&std::fs::read(path).map_err(|e| Error::io(path, e))?, path)?,
            (TextSource::Bytes(bytes), _) => in_text(bytes, Path::new(file))?,
        };
        Ok(match self.format {
            SourceFormat::Jsonl => texts,
            SourceFormat::Csv => texts.iter().map(|t| self.csv_fields_joined(t)).collect(),
        })
    }

    /// A CSV record's fields joined by the delimiter (its quotes resolved), as extraction reads it.
    fn csv_fields_joined(&self, text: &str) -> String {
        let mut reader = csv::ReaderBuilder::new().delimiter(self.delimiter as u8).has_headers(false).flexible(true).from_reader(text.as_bytes());
        let mut record = csv::StringRecord::new();
        match reader.read_record(&mut record) {
            Ok(true) => record.iter().collect::<Vec<_>>().join(&self.delimiter.to_string()),
            _ => text.to_string(),
        }
    }
}

/// Reads the given files of a source ([`list_files`], or only the new ones for an incremental
/// load; [`survey`] has their checksums).
pub fn extract_files(table: &str, spec: &SourceTransform, files: &[PathBuf], display_root: &Path) -> Result<Extracted> {
    let mut texts = RecordTexts::new(spec);
    let parts: Vec<FileRows> = files
        .par_iter()
        .map(|f| {
            let shown = f.strip_prefix(display_root).unwrap_or(f).to_string_lossy().to_string();
            read_file(table, spec, f, &shown)
        })
        .collect::<Result<_>>()?;
    for (f, p) in files.iter().zip(&parts) {
        texts.files.insert(p.file.clone(), TextSource::File(f.clone()));
    }
    let (mut batches, mut rejects, mut read) = (Vec::new(), Vec::new(), 0);
    for mut p in parts {
        read += p.read;
        rejects.append(&mut p.rejects);
        batches.extend(p.finish()?);
    }
    Ok(Extracted { batches, texts, rejects, read, memory: None })
}

/// The schema of an extracted batch. `_file` is dictionary-encoded: every row of a file names
/// the same path.
pub fn raw_schema(spec: &SourceTransform) -> SchemaRef {
    let mut fields: Vec<Field> = spec.columns.iter().map(|c| Field::new(&c.name, DataType::Utf8, true)).collect();
    fields.push(Field::new(FILE_COL, DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)), false));
    fields.push(Field::new(LINE_COL, DataType::Int64, false));
    fields.push(Field::new(START_COL, DataType::Int64, false));
    fields.push(Field::new(LENGTH_COL, DataType::UInt32, false));
    Arc::new(Schema::new(fields))
}

/// The text of the records of one file, column by column in Arrow builders (no string per
/// field: the values of a column share one buffer), a batch every [`CHUNK_RECORDS`] records.
struct FileRows {
    file: String,
    schema: SchemaRef,
    /// Declared columns (the schema's first ones).
    ncols: usize,
    /// Records and bytes of text a chunk's builders are sized for.
    capacity: (usize, usize),
    chunks: Vec<RecordBatch>,
    values: Vec<StringBuilder>,
    lines: Vec<i64>,
    starts: Vec<i64>,
    lengths: Vec<u32>,
    rejects: Vec<Reject>,
    read: u64,
}

impl FileRows {
    /// Builders sized for `text`: a record a line at most, and the fields' text shared evenly
    /// among the columns (a longer column grows its own buffer). Grown by doubling instead, the
    /// buffers would hold up to twice what they need.
    fn new(spec: &SourceTransform, file: &str, text: &str) -> Self {
        let records = text.bytes().filter(|b| *b == b'\n').count() + 1;
        let chunk = records.min(CHUNK_RECORDS);
        let mut rows = Self {
            file: file.to_string(),
            schema: raw_schema(spec),
            ncols: spec.columns.len(),
            capacity: (chunk, (text.len() as u128 * chunk as u128 / records as u128) as usize),
            chunks: Vec::new(),
            values: Vec::new(),
            lines: Vec::new(),
            starts: Vec::new(),
            lengths: Vec::new(),
            rejects: Vec::new(),
            read: 0,
        };
        rows.size_builders();
        rows
    }

    /// Empty builders for the next chunk, each column's text an even share of the chunk's.
    fn size_builders(&mut self) {
        let (records, bytes) = self.capacity;
        self.values = (0..self.ncols).map(|_| StringBuilder::with_capacity(records, bytes / self.ncols.max(1))).collect();
        self.lines = Vec::with_capacity(records);
        self.starts = Vec::with_capacity(records);
        self.lengths = Vec::with_capacity(records);
    }

    /// Ends a record whose fields were appended to the builders: its line, and where its text
    /// lies in the file's text (`text[start..end]`).
    fn push_line(&mut self, line: u64, (start, end): (usize, usize)) -> Result<()> {
        let length = u32::try_from(end.saturating_sub(start)).map_err(|_| DataError::Input {
            file: self.file.clone().into(),
            line: Some(line),
            message: "a record longer than 4 GiB; is the export's delimiter or quoting right?".into(),
        })?;
        self.lines.push(line as i64);
        self.starts.push(start as i64);
        self.lengths.push(length);
        if self.lines.len() == CHUNK_RECORDS {
            let chunk = self.chunk()?;
            self.chunks.push(chunk);
            self.size_builders();
        }
        Ok(())
    }

    fn reject(&mut self, table: &str, line: u64, rule: &'static str, reason: String, raw: String) {
        self.rejects.push(Reject { table: table.into(), file: self.file.clone(), line: line as i64, column: None, rule, reason, raw });
    }

    /// The batches of the file's records (none for a file without records).
    fn finish(mut self) -> Result<Vec<RecordBatch>> {
        if !self.lines.is_empty() {
            let chunk = self.chunk()?;
            self.chunks.push(chunk);
        }
        Ok(self.chunks)
    }

    /// The records since the last chunk, as a batch.
    fn chunk(&mut self) -> Result<RecordBatch> {
        let rows = self.lines.len();
        let mut columns: Vec<ArrayRef> = self.values.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef).collect();
        let keys = Int32Array::from(vec![0; rows]);
        let paths: ArrayRef = Arc::new(StringArray::from(vec![self.file.as_str()]));
        columns.push(Arc::new(DictionaryArray::<Int32Type>::try_new(keys, paths)?));
        columns.push(Arc::new(Int64Array::from(std::mem::take(&mut self.lines))));
        columns.push(Arc::new(Int64Array::from(std::mem::take(&mut self.starts))));
        columns.push(Arc::new(datafusion::arrow::array::UInt32Array::from(std::mem::take(&mut self.lengths))));
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// Decodes a whole file to text, failing with the line of the first undecodable byte.
///
/// A file declared GBK whose non-ASCII text is all valid UTF-8 (at least a few characters of it)
/// is a UTF-8 export with the wrong declaration: decoding it as GBK would load garbled names
/// without any error, so it fails with the fix instead.
pub fn decode<'a>(bytes: &'a [u8], encoding: SourceEncoding, file: &Path) -> Result<Cow<'a, str>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(bytes);
    if encoding == SourceEncoding::Gbk
        && let Ok(text) = std::str::from_utf8(bytes)
        && text.chars().filter(|c| !c.is_ascii()).count() >= 4
    {
        let first = bytes.iter().position(|b| !b.is_ascii()).unwrap_or(0);
        let line = bytes[..first].iter().filter(|b| **b == b'\n').count() as u64 + 1;
        return Err(DataError::Input {
            file: file.to_path_buf(),
            line: Some(line),
            message: "the text is UTF-8 (its non-ASCII characters decode as UTF-8), but the transform declares GBK; set `source.encoding: utf8` in its transform".into(),
        }
        .into());
    }
    let decoded = match encoding {
        SourceEncoding::Utf8 => std::str::from_utf8(bytes).map(Cow::Borrowed).map_err(|e| e.valid_up_to()),
        SourceEncoding::Gbk => encoding_rs::GBK.decode_without_bom_handling_and_without_replacement(bytes).ok_or_else(|| first_bad_gbk_byte(bytes)),
    };
    decoded.map_err(|offset| {
        let line = bytes[..offset].iter().filter(|b| **b == b'\n').count() as u64 + 1;
        let (name, other) = match encoding {
            SourceEncoding::Utf8 => ("UTF-8", "gbk"),
            SourceEncoding::Gbk => ("GBK", "utf8"),
        };
        DataError::Input {
            file: file.to_path_buf(),
            line: Some(line),
            message: format!(
                "byte {offset} is not valid {name}; if the export uses another encoding, set `source.encoding: {other}` in its transform"
            ),
        }
        .into()
    })
}

fn first_bad_gbk_byte(bytes: &[u8]) -> usize {
    // Decode line by line to find the first line that fails; report its start.
    let mut offset = 0;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if encoding_rs::GBK.decode_without_bom_handling_and_without_replacement(line).is_none() {
            return offset;
        }
        offset += line.len();
    }
    offset
}

fn read_file(table: &str, spec: &SourceTransform, path: &Path, shown: &str) -> Result<FileRows> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_bytes(table, spec, &bytes, shown)
}

fn read_bytes(table: &str, spec: &SourceTransform, bytes: &[u8], shown: &str) -> Result<FileRows> {
    let text = decode(bytes, spec.source.encoding, Path::new(shown))?;
    match spec.source.format {
        SourceFormat::Csv => read_csv(table, spec, &text, shown),
        SourceFormat::Jsonl => read_jsonl(table, spec, &text, shown),
    }
}

/// [`extract_files`] for one export held in memory (the fuzz targets feed it bytes).
pub fn extract_bytes(table: &str, spec: &SourceTransform, bytes: &[u8], shown: &str) -> Result<Extracted> {
    let mut rows = read_bytes(table, spec, bytes, shown)?;
    let (rejects, read) = (std::mem::take(&mut rows.rejects), rows.read);
    let mut texts = RecordTexts::new(spec);
    texts.files.insert(shown.to_string(), TextSource::Bytes(bytes.into()));
    Ok(Extracted { batches: rows.finish()?, texts, rejects, read, memory: None })
}

fn read_csv(table: &str, spec: &SourceTransform, text: &str, shown: &str) -> Result<FileRows> {
    let mut rows = FileRows::new(spec, shown, text);
    let delimiter = u8::try_from(spec.source.delimiter).map_err(|_| DataError::Input {
        file: shown.into(),
        line: None,
        message: format!("delimiter '{}' is not a single-byte character", spec.source.delimiter),
    })?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    // Two records, reused: the one being handled and the next, read ahead to know which is last.
    let (mut record, mut ahead) = (csv::StringRecord::new(), csv::StringRecord::new());
    let mut next = read_record(&mut reader, &mut record);
    // Line numbers from byte offsets: the csv crate's own line count lags by one after the
    // first record in CRLF files (and so does its byte position, which `at` allows for).
    let mut lines = LineCounter { text: text.as_bytes(), byte: 0, line: 1 };
    // A file cut off mid-write ends without a line break, and its last line may still split
    // into the right number of fields (a number cut short): that record is not trusted.
    let cut_off = !text.is_empty() && !text.ends_with('\n');
    // Map each declared column to its field index.
    let (indices, width): (Vec<usize>, usize) = if spec.source.header {
        match next {
            Next::Record => {}
            Next::Error(e) => {
                return Err(DataError::Input { file: shown.into(), line: Some(1), message: format!("unreadable header: {e}") }.into());
            }
            Next::End => return Ok(rows),
        }
        let names: Vec<String> = record.iter().map(|h| h.trim().to_string()).collect();
        next = read_record(&mut reader, &mut record);
        let mut indices = Vec::new();
        let mut missing = Vec::new();
        for c in &spec.columns {
            match names.iter().position(|n| n.eq_ignore_ascii_case(&c.from)) {
                Some(i) => indices.push(i),
                None => {
                    let hint = nearest(&c.from, names.iter().map(String::as_str))
                        .map(|n| format!(" (the header has '{n}')"))
                        .unwrap_or_default();
                    missing.push(format!("'{}'{hint}", c.from));
                }
            }
        }
        if !missing.is_empty() {
            return Err(DataError::Input {
                file: shown.into(),
                line: Some(1),
                message: format!(
                    "header lacks column(s) {}; found {}. Fix the export or the `columns` (or `from:`) of table '{table}'",
                    missing.join(", "),
                    names.join(",")
                ),
            }
            .into());
        }
        (indices, names.len())
    } else {
        ((0..spec.columns.len()).collect(), spec.columns.len())
    };
    let joined = |r: &csv::StringRecord| r.iter().collect::<Vec<_>>().join(&spec.source.delimiter.to_string());
    loop {
        let current = std::mem::replace(&mut next, Next::End);
        match current {
            Next::End => break,
            Next::Error(e) => {
                next = read_record(&mut reader, &mut record);
                let line = e.position().map(|p| lines.at(p.byte()).0).unwrap_or(0);
                rows.read += 1;
                rows.reject(table, line, "unreadable", format!("unreadable CSV record: {e}"), String::new());
            }
            Next::Record => {
                next = read_record(&mut reader, &mut ahead);
                std::mem::swap(&mut record, &mut ahead);
                // `ahead` now holds the record handled here; `record` the next one, if any.
                let r = &ahead;
                let last = matches!(next, Next::End);
                let (line, start) = r.position().map(|p| lines.at(p.byte())).unwrap_or((0, 0));
                // It ends where the next one starts (or the text does).
                let end = match &next {
                    Next::Record => record.position().map_or(text.len(), |p| p.byte() as usize),
                    Next::Error(e) => e.position().map_or(text.len(), |p| p.byte() as usize),
                    Next::End => text.len(),
                };
                if r.len() == 1 && r.get(0).is_some_and(|f| f.trim().is_empty()) {
                    continue; // a blank line is not a record
                }
                rows.read += 1;
                if last && cut_off {
                    let reason = "the file ends without a line break, so this last record may be cut off (a truncated export?); \
                                  check the export, or end the file with a line break";
                    rows.reject(table, line, "truncated", reason.into(), joined(r));
                    continue;
                }
                if r.len() != width {
                    // A quote left open makes one record of every line up to the next quote (or
                    // the end of the file): say so, and keep those lines in the quarantine's raw text.
                    let spanned = r.iter().map(|f| f.matches('\n').count()).sum::<usize>();
                    let rule = if spanned > 0 { "quote" } else { "fields" };
                    let reason = if spanned > 0 {
                        format!(
                            "a quoted field opened on line {line} runs over {} lines: an unterminated quote? (expected {width} fields, found {}); the lines it swallowed are in this record's raw text",
                            spanned + 1,
                            r.len()
                        )
                    } else {
                        format!("expected {width} fields, found {}", r.len())
                    };
                    rows.reject(table, line, rule, reason, joined(r));
                    continue;
                }
                for (builder, i) in rows.values.iter_mut().zip(&indices) {
                    builder.append_option(r.get(*i));
                }
                rows.push_line(line, (start, end.max(start)))?;
            }
        }
    }
    Ok(rows)
}

/// What reading the next CSV record gave.
enum Next {
    Record,
    Error(csv::Error),
    End,
}

fn read_record(reader: &mut csv::Reader<&[u8]>, record: &mut csv::StringRecord) -> Next {
    match reader.read_record(record) {
        Ok(true) => Next::Record,
        Ok(false) => Next::End,
        Err(e) => Next::Error(e),
    }
}

/// The line of a byte offset, for offsets that only grow.
struct LineCounter<'a> {
    text: &'a [u8],
    byte: usize,
    line: u64,
}

impl LineCounter<'_> {
    /// The line a record at `byte` starts on, and the byte it starts at.
    fn at(&mut self, byte: u64) -> (u64, usize) {
        let mut byte = (byte as usize).min(self.text.len());
        // In a CRLF file a record's position is the '\n' ending the line before it (or the
        // first of the blank lines before it): a record starts after any line ends there.
        while matches!(self.text.get(byte), Some(b'\n' | b'\r')) {
            byte += 1;
        }
        if byte > self.byte {
            self.line += self.text[self.byte..byte].iter().filter(|b| **b == b'\n').count() as u64;
            self.byte = byte;
        }
        (self.line, byte)
    }
}

fn read_jsonl(table: &str, spec: &SourceTransform, text: &str, shown: &str) -> Result<FileRows> {
    let mut rows = FileRows::new(spec, shown, text);
    for (i, line) in text.lines().enumerate() {
        let line_no = i as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        rows.read += 1;
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line) {
            Ok(obj) => {
                for (builder, c) in rows.values.iter_mut().zip(&spec.columns) {
                    match obj.get(&c.from) {
                        None | Some(serde_json::Value::Null) => builder.append_null(),
                        Some(serde_json::Value::String(s)) => builder.append_value(s),
                        Some(other) => builder.append_value(other.to_string()),
                    }
                }
                let start = line.as_ptr() as usize - text.as_ptr() as usize;
                rows.push_line(line_no, (start, start + line.len()))?;
            }
            Err(e) => {
                let reason = format!("invalid JSON at character {}: {}", e.column(), e.to_string().split(" at line ").next().unwrap_or_default());
                rows.reject(table, line_no, "json", reason, line.to_string())
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// What a snapshot records of `path` as surveyed now, with a checksum no read can give.
    fn known_with_false_checksum(dir: &Path, name: &str) -> BTreeMap<String, SourceFile> {
        let meta = std::fs::metadata(dir.join(name)).unwrap();
        let f = SourceFile { path: name.into(), bytes: meta.len(), sha256: "not read".into(), stamp: Stamp::of(&meta) };
        BTreeMap::from([(name.to_string(), f)])
    }

    #[cfg(unix)]
    #[test]
    fn a_file_with_its_recorded_stamp_is_not_read_and_a_rewritten_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orders.csv");
        std::fs::write(&path, "order_id\nO1\n").unwrap();
        let files = [path.clone()];
        let read = |known: &BTreeMap<String, SourceFile>| survey(&files, dir.path(), known).unwrap().remove(0);
        let content = SourceFile::of("orders.csv".into(), b"order_id\nO1\n");

        // Just written: read, and its stamp not recorded (a write in the same clock tick would
        // not change it).
        let fresh = read(&BTreeMap::new());
        assert!(fresh.same_content(&content));
        assert_eq!(fresh.stamp, None);

        // The same stamp and size: the recorded checksum stands, the file is not read.
        let known = known_with_false_checksum(dir.path(), "orders.csv");
        assert_eq!(read(&known).sha256, "not read");

        // Rewritten with as many bytes and its modification time set back, as `cp -p` or
        // `rsync -t` would: the status change time moved, so the file is read again.
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "order_id\nO2\n").unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(modified).unwrap();
        let again = read(&known);
        assert!(again.same_content(&SourceFile::of("orders.csv".into(), b"order_id\nO2\n")), "{again:?}");

        // Another size with the same stamp (not possible on a file system, but a stamp never
        // stands alone).
        let mut other_size = known_with_false_checksum(dir.path(), "orders.csv");
        other_size.get_mut("orders.csv").unwrap().bytes += 1;
        assert_eq!(read(&other_size).sha256, again.sha256);
    }

    #[test]
    fn a_stamp_is_settled_two_seconds_after_its_last_write() {
        let at = |s: i64| Stamp { modified_ns: s * 1_000_000_000, changed_ns: s * 1_000_000_000, inode: 1, device: 1 };
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(100);
        assert!(at(97).settled_by(now));
        assert!(!at(98).settled_by(now));
        assert!(!Stamp { changed_ns: 99_000_000_000, ..at(90) }.settled_by(now), "a status change counts as a write");
    }
}
