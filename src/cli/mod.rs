//! The `crmcube` command line: one subcommand per user task, errors mapped to exit codes.
//!
//! Exit codes (also in the README): 0 ok · 1 failed (I/O, engine, internal) · 2 bad metadata,
//! bad query or bad arguments · 3 input data over a reject threshold (nothing committed).

pub mod chart;
pub mod output;
mod progress;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::cube::CubeSet;
use crate::error::{Error, Result};
use crate::etl::{LoadReport, TransformSet};
use crate::project::Project;
use crate::query::CubeQuery;
use crate::sample::SampleConfig;
use crate::serve::auth::UsersFile;
use crate::warehouse::Warehouse;
use output::Format;

#[derive(Debug, Parser)]
#[command(name = "crmcube", version, about = "Analytical CRM data warehouse and OLAP engine")]
pub struct Cli {
    /// Project folder (holding crmcube.yaml); default: the current folder or a parent.
    #[arg(long, global = true)]
    pub project: Option<PathBuf>,
    /// Warehouse folder; default: the project's `warehouse:` setting.
    #[arg(long, global = true)]
    pub warehouse: Option<PathBuf>,
    /// Read an earlier snapshot (see `crmcube history`) instead of the current one.
    #[arg(long, global = true, value_name = "SNAPSHOT")]
    pub as_of: Option<u64>,
    /// Memory for a query or load, in MiB: past it work spills to disk or stops with a clear
    /// error (never an out-of-memory kill). Default: unbounded.
    #[arg(long, global = true, value_name = "MIB")]
    pub memory_limit: Option<usize>,
    /// Answer as this user of users.yaml would be answered: their access rules apply.
    #[arg(long = "as", global = true, value_name = "USER")]
    pub as_user: Option<String>,
    /// Answer from the base tables even where a rollup would answer (to compare or time them).
    #[arg(long, global = true)]
    pub no_rollups: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a deterministic sample CRM export (dirty rows included).
    Sample {
        #[arg(long, default_value_t = 2500)]
        customers: usize,
        #[arg(long, default_value_t = 3)]
        years: u32,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Load the exports into the warehouse as one new snapshot.
    Load {
        /// Folder of the exports; default: the project's `sources:` setting.
        #[arg(long)]
        source: Option<PathBuf>,
        /// Print the run report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Let this source table load empty although the warehouse holds rows (repeatable);
        /// without it an empty export stops the load before it commits (exit 3).
        #[arg(long, value_name = "TABLE")]
        allow_empty: Vec<String>,
    },
    /// Ask a cube: measures by levels, with filters, drill, trend, order and limit.
    Query(QueryArgs),
    /// Run SQL over the warehouse tables of the current snapshot.
    Sql {
        /// The SQL statement.
        sql: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Print the DataFusion plan instead of the result.
        #[arg(long)]
        explain: bool,
    },
    /// A customer-value report: rfm, key-accounts, cohorts, aging, credit (none: list them).
    Report {
        name: Option<String>,
        /// Rows of the report's lists (top customers, cohorts, accounts).
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// The day receivables and credit exposure are taken at (default: the latest invoice date).
        #[arg(long, value_name = "YYYY-MM-DD")]
        date: Option<chrono::NaiveDate>,
        /// Credit utilisation % from which an account is on the credit alert list.
        #[arg(long, default_value_t = 90.0)]
        threshold: f64,
        /// Credit report: check whether a new order of --amount by this customer stays within the limit.
        #[arg(long, value_name = "CUSTOMER_ID", requires = "amount")]
        customer: Option<String>,
        /// Credit report: the new order's amount (with --customer).
        #[arg(long, requires = "customer")]
        amount: Option<f64>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Draw the report's chart to FILE.svg or FILE.png.
        #[arg(long, value_name = "FILE")]
        chart: Option<PathBuf>,
    },
    /// Read unknown exports (a file or a folder) and write draft transforms: encoding, format,
    /// delimiter, header, column types and date formats, key, references.
    Scan {
        /// An export file, a folder of them (.csv, .tsv, .txt, .jsonl, .ndjson), or a PostgreSQL
        /// URL (postgres://user@host:port/db: every table and view, from the catalog).
        path: PathBuf,
        /// Folder for the drafts; default: the project's transforms folder.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Print the drafts instead of writing them.
        #[arg(long)]
        print: bool,
        /// Overwrite drafts that exist.
        #[arg(long)]
        force: bool,
    },
    /// Validate every transform and cube file.
    Check,
    /// List the warehouse's snapshots (id, time, rows), oldest first.
    History,
    /// Data quality: quarantined rows by table and broken rule over the last loads, with samples.
    Quality {
        /// How many recent loads (snapshots) to compare.
        #[arg(long, default_value_t = 7)]
        loads: usize,
        /// Only this table's rows.
        #[arg(long)]
        table: Option<String>,
        /// Sample rows shown per table and rule (from the newest snapshot); 0 for none.
        #[arg(long, default_value_t = 3)]
        samples: usize,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Rebuild rollups from the current snapshot (no exports read): those missing or stale
    /// after a cube file changed, or all with --all; commits a new snapshot.
    Refresh {
        /// Rebuild every rollup, current or not.
        #[arg(long)]
        all: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rewrite tables made of many small Parquet files (nightly appends) into fewer large ones,
    /// as a new snapshot with the same rows; older snapshots stay readable until vacuum.
    Compact {
        /// Compact a table from this many files on.
        #[arg(long, default_value_t = 4)]
        min_files: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshots older than the newest --keep and the files only they needed.
    Vacuum {
        #[arg(long, default_value_t = 7)]
        keep: usize,
    },
    /// Load the sample data and print three answers.
    Demo,
    /// Serve the warehouse and its cubes to BI tools over Arrow Flight SQL.
    Serve(ServeArgs),
    /// Manage the users of `crmcube serve`.
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Listen on a non-loopback address without TLS (passwords and data cross the network in clear).
    #[arg(long)]
    pub insecure: bool,
    /// Seconds a login token stays valid.
    #[arg(long, default_value_t = 3600)]
    pub token_ttl: u64,
    /// Queries streaming at once; further queries wait for a slot.
    #[arg(long, default_value_t = 8)]
    pub max_queries: usize,
    /// Memory per query in MiB; past it a query spills or fails with RESOURCE_EXHAUSTED.
    #[arg(long, value_name = "MIB")]
    pub query_memory: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user (or reset one's password and role). The password is read from standard input
    /// (prompted for on a terminal) and stored as an argon2id hash in the project's users file.
    Add {
        name: String,
        #[arg(long)]
        role: String,
        /// An attribute access rules can use, e.g. region=East (repeatable).
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attributes: Vec<String>,
    },
    /// List users and roles (never passwords).
    List,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Cube name, e.g. sales (or given by --file).
    pub cube: Option<String>,
    /// A query file (YAML or JSON with the keys of a query), or the name of one in queries/.
    #[arg(long, short = 'f')]
    pub file: Option<String>,
    /// Measures, comma-separated: revenue,margin_pct.
    #[arg(long, short, value_delimiter = ',')]
    pub measures: Vec<String>,
    /// Levels to group by, comma-separated: customer.region,time.year.
    #[arg(long, short, value_delimiter = ',')]
    pub by: Vec<String>,
    /// Filter (repeatable): customer.region=East, time.year>=2025, channel.channel=online,store,
    /// channel.channel!=store, customer.city~Hang%.
    #[arg(long = "filter", short = 'w')]
    pub filters: Vec<String>,
    /// Drill into a member, grouping it by the next level (repeat to go deeper):
    /// --drill customer.region=East --drill customer.province=Zhejiang.
    #[arg(long)]
    pub drill: Vec<String>,
    /// Trend over a time level (adds previous period and change %): time.month.
    #[arg(long)]
    pub trend: Option<String>,
    /// With --trend: show only the last N periods.
    #[arg(long)]
    pub last: Option<usize>,
    /// With --trend: moving average over N periods.
    #[arg(long, value_name = "N")]
    pub moving_average: Option<usize>,
    /// With --trend: running total.
    #[arg(long)]
    pub running_total: bool,
    /// With --trend: year-to-date total.
    #[arg(long)]
    pub ytd: bool,
    /// With --trend: same period last year and the change in %.
    #[arg(long)]
    pub yoy: bool,
    /// With --trend: forecast the next K periods (Holt-Winters, 95% interval).
    #[arg(long, value_name = "K")]
    pub forecast: Option<usize>,
    /// Spread a level's members across columns: time.year.
    #[arg(long)]
    pub pivot: Option<String>,
    /// Two members side by side with the change: time.year=2025:2024.
    #[arg(long)]
    pub compare: Option<String>,
    /// With --limit: add an (others) row for everything past the limit.
    #[arg(long)]
    pub others: bool,
    /// Drill-through: list the fact rows behind the result (at most --limit, default 1000).
    #[arg(long)]
    pub detail: bool,
    /// Sort keys, comma-separated, each a measure or level with optional :desc.
    #[arg(long, value_delimiter = ',')]
    pub order: Vec<String>,
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Write the result to a file; the format follows the extension
    /// (.csv, .json, .parquet, .arrow).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Also draw the result: a line chart for trends, bars otherwise (.svg or .png).
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Print the DataFusion plan instead of the result.
    #[arg(long)]
    pub explain: bool,
}

impl QueryArgs {
    /// The query: from --file when given, with the command-line options added on top.
    fn to_query(&self, project: &Project) -> Result<CubeQuery> {
        let mut q = match &self.file {
            Some(f) => {
                let path = PathBuf::from(f);
                let path = if path.exists() { path } else { project.queries.join(format!("{f}.yaml")) };
                CubeQuery::from_file(&path)?
            }
            None => CubeQuery::default(),
        };
        if let Some(c) = &self.cube {
            q.cube = c.clone();
        }
        if q.cube.is_empty() {
            return Err(crate::error::QueryError::new("name a cube, e.g. `crmcube query sales -m revenue`, or pass --file").into());
        }
        if !self.measures.is_empty() {
            q.measures = self.measures.clone();
        }
        q.by.extend(self.by.iter().cloned());
        q.filters.extend(self.filters.iter().cloned());
        q.drill.extend(self.drill.iter().cloned());
        q.order.extend(self.order.iter().cloned());
        q.trend = self.trend.clone().or(q.trend);
        q.last = self.last.or(q.last);
        q.moving_average = self.moving_average.or(q.moving_average);
        q.running_total |= self.running_total;
        q.year_to_date |= self.ytd;
        q.year_over_year |= self.yoy;
        q.forecast = self.forecast.or(q.forecast);
        q.pivot = self.pivot.clone().or(q.pivot);
        q.compare = self.compare.clone().or(q.compare);
        q.others |= self.others;
        q.detail |= self.detail;
        q.limit = self.limit.or(q.limit);
        Ok(q)
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    main_with(|_| {})
}

/// [`main`], first telling `allocator` whether the command bounds its memory (`--memory-limit`,
/// `serve --query-memory`): the binary then chooses how its allocator gives freed pages back
/// (src/main.rs).
pub fn main_with(allocator: impl FnOnce(bool)) -> i32 {
    let cli = Cli::parse();
    let bounded = cli.memory_limit.is_some() || matches!(&cli.command, Command::Serve(args) if args.query_memory.is_some());
    allocator(bounded);
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let fix = match cli.command {
        Command::Load { .. } | Command::Demo | Command::Refresh { .. } | Command::Compact { .. } => {
            "raise --memory-limit MIB: a load needs room to hold its largest exports' text and to sort and join its largest table"
        }
        _ => "raise --memory-limit MIB, or narrow the query",
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            if e.is_out_of_memory() {
                eprintln!("hint: the work did not fit in the memory limit; {fix}");
            }
            e.kind().exit_code()
        }
    }
}

/// Log lines on stderr: crmcube's own at `CRMCUBE_LOG` (default `warn`; `info` shows each table
/// of a load as it goes), other crates' warnings and errors only.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let level = std::env::var("CRMCUBE_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(tracing::Level::WARN);
    let filter = tracing_subscriber::filter::Targets::new().with_target("crmcube", level).with_default(tracing::Level::ERROR);
    let progress = tracing_subscriber::filter::Targets::new().with_target("crmcube", tracing::Level::INFO);
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false)
                .with_filter(filter),
        )
        .with(progress::ProgressLayer.with_filter(progress))
        .try_init();
}

fn project(cli: &Cli) -> Result<Project> {
    match &cli.project {
        Some(p) => Project::open(p),
        None => Project::discover(&std::env::current_dir().map_err(|e| Error::io(".", e))?),
    }
}

fn warehouse(cli: &Cli, project: &Project) -> Warehouse {
    Warehouse::new(cli.warehouse.clone().unwrap_or_else(|| project.warehouse.clone())).with_memory_limit(cli.memory_limit.map(|m| m << 20))
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match &cli.command {
        Command::Sample { customers, years, seed, out: dir } => {
            let config = SampleConfig { customers: *customers, years: *years, seed: *seed };
            if progress::wanted() {
                progress::start(config.months().into(), "writing customers");
            }
            let summary = crate::sample::generate(&config, dir);
            progress::finish();
            let summary = summary?;
            for (file, s) in &summary.files {
                writeln!(out, "{file:<20} {:>9} rows", s.rows).map_err(|e| Error::io("<stdout>", e))?;
            }
            Ok(())
        }
        Command::Load { source, json, allow_empty } => {
            let mut project = project(&cli)?;
            if let Some(s) = source {
                project.sources = s.clone();
            }
            let options = crate::etl::LoadOptions { allow_empty: allow_empty.clone() };
            if progress::wanted() {
                // Each table is cleaned (a source) or derived, then written; the quarantine is
                // written too; each rollup is built, then written.
                let set = TransformSet::load(&project)?;
                let rollups = CubeSet::load(&project, &set).map(|c| c.cubes.iter().map(|c| c.rollups.len()).sum::<usize>()).unwrap_or(0);
                let models = if set.get("fact_sales").is_some() { 2 } else { 0 };
                let tables = (set.transforms.len() + rollups + models) as u64;
                progress::start(2 * tables + 1, "reading exports");
            }
            let report = crate::etl::load_with(&project, &warehouse(&cli, &project), &options).await;
            progress::finish();
            let report = report?;
            if *json {
                let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
                writeln!(out, "{text}").map_err(|e| Error::io("<stdout>", e))
            } else {
                print_load(&mut out, &report)
            }
        }
        Command::Query(args) => {
            let project = project(&cli)?;
            let transforms = TransformSet::load(&project)?;
            let cubes = CubeSet::load(&project, &transforms)?;
            let query = args.to_query(&project)?;
            let cube = cubes.get(&query.cube)?;
            let (ctx, notes) = query_session(&cli, &project, &transforms, &cubes).await?;
            if args.explain {
                let df = crate::query::plan(&ctx, cube, &query).await?;
                let batches = df.explain(false, false)?.collect().await?;
                output::write(&mut out, &batches, Format::Table)?;
                return write_rollup_notes(&mut out, &notes);
            }
            let batches = crate::query::run(&ctx, cube, &query).await?;
            if let Some(path) = &args.chart {
                let title = format!("{} by {}", query.measures.join(", "), query.trend.iter().chain(&query.by).cloned().collect::<Vec<_>>().join(", "));
                // Draw the measures themselves (and a forecast's interval), not derived columns.
                let mut series = query.measures.clone();
                if query.forecast.is_some() {
                    series.extend(query.measures.iter().flat_map(|m| [format!("{m}_lower_95"), format!("{m}_upper_95")]));
                }
                let across = query.pivot.is_some() || query.compare.is_some();
                chart::write_chart(path, &batches, &title, (!across).then_some(series.as_slice()))?;
            }
            match &args.output {
                Some(path) => output::write_file(path, &batches),
                None if args.format == Format::Table => {
                    let totals = crate::query::totals(&ctx, cube, &query).await?;
                    output::write_with_totals(&mut out, &batches, totals.as_deref(), Format::Table)
                }
                None => output::write(&mut out, &batches, args.format),
            }
        }
        Command::Report { name, top, date, threshold, customer, amount, format, chart } => {
            let io = |e| Error::io("<stdout>", e);
            let Some(name) = name else {
                for (n, what) in crate::report::REPORTS {
                    writeln!(out, "{n:<14} {what}").map_err(io)?;
                }
                return Ok(());
            };
            let project = project(&cli)?;
            let transforms = TransformSet::load(&project)?;
            let cubes = CubeSet::load(&project, &transforms)?;
            let (ctx, _) = query_session(&cli, &project, &transforms, &cubes).await?;
            let check = customer.clone().zip(*amount);
            let options = crate::report::Options { top: *top, date: *date, threshold_pct: *threshold, check };
            let report = crate::report::run(&ctx, name, &options).await?;
            for (i, s) in report.sections.iter().filter(|s| !s.chart_only).enumerate() {
                if *format == Format::Table {
                    writeln!(out, "{}{}", if i > 0 { "\n" } else { "" }, s.title).map_err(io)?;
                }
                output::write(&mut out, &s.batches, *format)?;
            }
            match (chart, &report.chart) {
                (Some(path), Some((i, columns))) => {
                    let s = &report.sections[*i];
                    chart::write_chart(path, &s.batches, &s.title, (!columns.is_empty()).then_some(columns.as_slice()))?;
                }
                (Some(_), None) => {
                    return Err(crate::error::QueryError::new(format!("report '{name}' has no chart")).with_hint(Some("reports with a chart: rfm, key-accounts".into())).into());
                }
                _ => {}
            }
            Ok(())
        }
        Command::Sql { sql, format, explain } => {
            let project = project(&cli)?;
            let transforms = TransformSet::load(&project)?;
            let cubes = CubeSet::load(&project, &transforms)?;
            let (ctx, notes) = query_session(&cli, &project, &transforms, &cubes).await?;
            let df = crate::query::sql::sql(&ctx, &cubes, sql).await?;
            if *explain {
                let batches = df.explain(false, false)?.collect().await?;
                output::write(&mut out, &batches, Format::Table)?;
                return write_rollup_notes(&mut out, &notes);
            }
            output::write(&mut out, &df.collect().await?, *format)
        }
        Command::Scan { path, out: out_dir, print, force } => {
            // A project is optional: scanning comes before the transforms exist.
            let project = project(&cli).ok();
            let sources = match &project {
                Some(p) => p.sources.clone(),
                None if path.is_dir() => path.clone(),
                None => path.parent().map(PathBuf::from).unwrap_or_default(),
            };
            let text = path.to_string_lossy();
            let scanned = if text.starts_with("postgres://") || text.starts_with("postgresql://") {
                crate::scan::scan_postgres(&text).await?
            } else {
                crate::scan::scan(path, &sources)?
            };
            let io = |e| Error::io("<stdout>", e);
            if *print {
                for f in &scanned {
                    writeln!(out, "# ── transforms/{}.yaml\n{}", f.table, crate::scan::draft(f)).map_err(io)?;
                }
                return Ok(());
            }
            let dir = match (out_dir, &project) {
                (Some(d), _) => d.clone(),
                (None, Some(p)) => p.transforms.clone(),
                (None, None) => {
                    return Err(crate::error::QueryError::new("no crmcube.yaml here or above: give --out DIR for the drafts (or --print)").into());
                }
            };
            let targets: Vec<PathBuf> = scanned.iter().map(|f| dir.join(format!("{}.yaml", f.table))).collect();
            let existing: Vec<String> = targets.iter().filter(|t| t.exists()).map(|t| t.display().to_string()).collect();
            if !existing.is_empty() && !*force {
                return Err(crate::error::QueryError::new(format!("{} exist(s): scan does not overwrite a transform", existing.join(", ")))
                    .with_hint(Some("use --force to overwrite, --out DIR to write elsewhere, or --print to see the drafts".into()))
                    .into());
            }
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            writeln!(out, "{:<28}  {:<22}  {:<6}  {:<5}  {:>5}  {:>9}  {:>7}  {:<22}  references", "file", "table", "format", "enc", "delim", "records", "columns", "key").map_err(io)?;
            for (f, target) in scanned.iter().zip(&targets) {
                std::fs::write(target, crate::scan::draft(f)).map_err(|e| Error::io(target, e))?;
                let delimiter = match (f.jsonl || f.database.is_some(), f.delimiter) {
                    (true, _) => "-".to_string(),
                    (false, '\t') => "tab".to_string(),
                    (false, d) => d.to_string(),
                };
                let refs: Vec<String> = f.references.iter().map(|(c, t, k)| format!("{c} → {t}.{k}")).collect();
                writeln!(
                    out,
                    "{:<28}  {:<22}  {:<6}  {:<5}  {:>5}  {:>9}  {:>7}  {:<22}  {}",
                    f.source_path,
                    f.table,
                    if f.database.is_some() { "pg" } else if f.jsonl { "jsonl" } else { "csv" },
                    if f.encoding == crate::etl::spec::SourceEncoding::Gbk { "gbk" } else { "utf8" },
                    delimiter,
                    if f.database.is_some() { "-".to_string() } else { output::group_thousands(&f.rows.to_string()) },
                    f.columns.len(),
                    if f.key.is_empty() { "-".to_string() } else { f.key.join(",") },
                    if refs.is_empty() { "-".to_string() } else { refs.join(", ") }
                )
                .map_err(io)?;
            }
            writeln!(out, "\nwrote {} draft(s) to {}; review them, then `crmcube check`", targets.len(), dir.display()).map_err(io)
        }
        Command::Check => {
            let project = project(&cli)?;
            let transforms = TransformSet::load(&project)?;
            let cubes = CubeSet::load(&project, &transforms)?;
            // Every table planned over no rows: the derived tables' SQL, and the columns the
            // cubes name in every table (the model tables' are the load's to check).
            let ctx = warehouse(&cli, &project).context()?;
            let planned = crate::etl::plan::plan_tables(&project, &ctx, &transforms).await?;
            let mut problems = planned.problems;
            problems.extend(cubes.check_columns(|t| planned.columns.get(t).cloned()));
            if !problems.is_empty() {
                return Err(crate::error::SpecErrors(problems).into());
            }
            for w in &planned.warnings {
                eprintln!("warning: {w}");
            }
            writeln!(out, "ok: {} transforms, {} cubes", transforms.transforms.len(), cubes.cubes.len())
                .map_err(|e| Error::io("<stdout>", e))
        }
        Command::History => {
            let project = project(&cli)?;
            let snapshots = warehouse(&cli, &project).snapshots()?;
            let io = |e| Error::io("<stdout>", e);
            writeln!(out, "{:>8}  {:<32}  {:>6}  {:>12}  {:>11}", "snapshot", "committed at", "tables", "rows", "quarantined").map_err(io)?;
            for s in &snapshots {
                let rows: u64 = s.tables.iter().filter(|(n, _)| *n != crate::etl::QUARANTINE_TABLE).map(|(_, t)| t.rows).sum();
                let quarantined = s.tables.get(crate::etl::QUARANTINE_TABLE).map(|t| t.rows).unwrap_or(0);
                writeln!(
                    out,
                    "{:>8}  {:<32}  {:>6}  {:>12}  {:>11}",
                    s.id,
                    s.committed_at,
                    s.tables.len(),
                    output::group_thousands(&rows.to_string()),
                    output::group_thousands(&quarantined.to_string())
                )
                .map_err(io)?;
            }
            Ok(())
        }
        Command::Refresh { all, json } => {
            let project = project(&cli)?;
            let transforms = TransformSet::load(&project)?;
            let cubes = CubeSet::load(&project, &transforms)?;
            let r = crate::rollup::refresh(&warehouse(&cli, &project), &cubes, *all).await?;
            let io = |e| Error::io("<stdout>", e);
            if *json {
                let text = serde_json::to_string_pretty(&r).map_err(|e| Error::Internal(e.to_string()))?;
                return writeln!(out, "{text}").map_err(io);
            }
            for (table, rows) in &r.rebuilt {
                writeln!(out, "rebuilt {table}: {} rows", output::group_thousands(&rows.to_string())).map_err(io)?;
            }
            for table in &r.dropped {
                writeln!(out, "dropped {table} (no cube declares it any more)").map_err(io)?;
            }
            match r.snapshot {
                Some(id) => writeln!(out, "snapshot {id} committed in {:.2} s", r.seconds).map_err(io),
                None => writeln!(out, "every rollup is current; nothing to do (--all rebuilds them anyway)").map_err(io),
            }
        }
        Command::Quality { loads, table, samples, format } => {
            let project = project(&cli)?;
            if cli.as_user.is_some() {
                // The quarantine holds raw rows of every table: an owner's view, not filtered per user.
                return Err(crate::error::QueryError::new("quality reads every table's quarantined rows: run it without --as (as the warehouse owner)").into());
            }
            let q = crate::quality::quality(&warehouse(&cli, &project), *loads, table.as_deref(), *samples).await?;
            let io = |e| Error::io("<stdout>", e);
            match format {
                Format::Json => {
                    // One JSON document: {"snapshots": [...], "counts": [...], "samples": [...]}.
                    let (mut counts, mut samples) = (Vec::new(), Vec::new());
                    output::write(&mut counts, std::slice::from_ref(&q.counts), Format::Json)?;
                    output::write(&mut samples, std::slice::from_ref(&q.samples), Format::Json)?;
                    let doc = serde_json::json!({
                        "snapshots": q.snapshots,
                        "counts": serde_json::from_slice::<serde_json::Value>(&counts).map_err(|e| Error::Internal(e.to_string()))?,
                        "samples": serde_json::from_slice::<serde_json::Value>(&samples).map_err(|e| Error::Internal(e.to_string()))?,
                    });
                    writeln!(out, "{doc:#}").map_err(io)
                }
                Format::Csv => output::write(&mut out, std::slice::from_ref(&q.counts), Format::Csv),
                Format::Table => {
                    writeln!(out, "Quarantined rows by table and rule, snapshots {} (newest last):\n", q.snapshots.iter().map(|s| format!("#{s}")).collect::<Vec<_>>().join(" ")).map_err(io)?;
                    if q.counts.num_rows() == 0 {
                        return writeln!(out, "no row quarantined in these loads").map_err(io);
                    }
                    output::write(&mut out, std::slice::from_ref(&q.counts), Format::Table)?;
                    if q.samples.num_rows() > 0 {
                        writeln!(out, "\nSamples from snapshot #{} (`crmcube sql \"SELECT * FROM quarantine WHERE rule = '…'\"` lists all):\n", q.snapshots.last().unwrap_or(&0)).map_err(io)?;
                        output::write(&mut out, std::slice::from_ref(&q.samples), Format::Table)?;
                    }
                    Ok(())
                }
            }
        }
        Command::Compact { min_files, json } => {
            let project = project(&cli)?;
            let layouts = TransformSet::load(&project)?.transforms.into_iter().map(|t| (t.name, t.layout)).collect();
            let r = warehouse(&cli, &project).compact(*min_files, &layouts).await?;
            let io = |e| Error::io("<stdout>", e);
            if *json {
                return writeln!(out, "{}", serde_json::to_string_pretty(&r).map_err(|e| Error::Internal(e.to_string()))?).map_err(io);
            }
            for t in &r.tables {
                writeln!(out, "{:<32} {:>6} → {:<6} files ({})", t.table, t.files_before, t.files_after, t.how).map_err(io)?;
            }
            match r.snapshot {
                Some(id) => writeln!(out, "snapshot {id} committed: {} table(s) compacted, same rows", r.tables.len()).map_err(io),
                None => writeln!(out, "no table has {min_files} or more files: nothing to compact").map_err(io),
            }
        }
        Command::Vacuum { keep } => {
            let project = project(&cli)?;
            let r = warehouse(&cli, &project).vacuum(*keep).await?;
            writeln!(out, "kept {} snapshot(s), removed {}, deleted {} file(s)", r.snapshots_kept, r.snapshots_removed, r.files_deleted)
                .map_err(|e| Error::io("<stdout>", e))
        }
        Command::Demo => demo(&cli, &mut out).await,
        Command::Serve(args) => serve(&cli, args).await,
        Command::User(UserCommand::Add { name, role, attributes }) => {
            let project = project(&cli)?;
            let mut attrs = std::collections::BTreeMap::new();
            for a in attributes {
                let (k, v) = a
                    .split_once('=')
                    .ok_or_else(|| crate::error::QueryError::new(format!("--attr '{a}': expected KEY=VALUE, e.g. region=East")))?;
                attrs.insert(k.trim().to_string(), v.trim().to_string());
            }
            let password = read_password(name)?;
            let mut users = UsersFile::load(&project.users)?;
            users.upsert(name, role, &password, attrs)?;
            users.save(&project.users)?;
            writeln!(out, "user '{name}' ({role}) saved in {}", project.display_path(&project.users).display())
                .map_err(|e| Error::io("<stdout>", e))
        }
        Command::User(UserCommand::List) => {
            let project = project(&cli)?;
            for u in UsersFile::load(&project.users)?.users {
                let attrs: Vec<String> = u.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
                writeln!(out, "{:<20} {:<12} {}", u.name, u.role, attrs.join(" ")).map_err(|e| Error::io("<stdout>", e))?;
            }
            Ok(())
        }
    }
}

/// The session `query` and `sql` read: the chosen snapshot, cube tables registered, rollups
/// (unless `--no-rollups`), and with `--as USER` that user's access rules bound below SQL.
/// Also returns where the rollup rule writes its decisions, for `--explain`.
async fn query_session(cli: &Cli, project: &Project, transforms: &TransformSet, cubes: &CubeSet) -> Result<(datafusion::prelude::SessionContext, crate::rollup::Notes)> {
    let wh = warehouse(cli, project);
    let snapshot = match cli.as_of {
        Some(id) => wh.committed(id)?,
        None => wh.current_or_error()?,
    };
    let ctx = wh.context()?;
    wh.register(&ctx, &snapshot).await?;
    // `--no-rollups` keeps eager aggregation: it is how the base tables answer.
    let with = crate::rollup::Rewrites { rollups: !cli.no_rollups, eager: true };
    match &cli.as_user {
        Some(name) => {
            let who = UsersFile::load(&project.users)?.principal(name)?;
            crate::access::restrict(&ctx, transforms, cubes, &who, Some((&snapshot, with))).await
        }
        None => {
            crate::query::sql::register_cubes(&ctx, cubes).await?;
            let notes = crate::rollup::install_with(&ctx, cubes, &snapshot, with).await?;
            Ok((ctx, notes))
        }
    }
}

/// What the rollup rule decided for the explained plan.
fn write_rollup_notes(out: &mut impl Write, notes: &crate::rollup::Notes) -> Result<()> {
    let notes = notes.lock().unwrap_or_else(|e| e.into_inner());
    for n in notes.iter() {
        writeln!(out, "rollups: {n}").map_err(|e| Error::io("<stdout>", e))?;
    }
    Ok(())
}

/// The new password: prompted for (twice) on a terminal, else the first line of standard input.
fn read_password(user: &str) -> Result<String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("password for {user}: ")).map_err(|e| Error::io("<terminal>", e))?;
        let again = rpassword::prompt_password("again: ").map_err(|e| Error::io("<terminal>", e))?;
        if first != again {
            return Err(crate::error::QueryError::new("the passwords differ; nothing was saved").into());
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| Error::io("<stdin>", e))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// `crmcube serve`: binds, prints the address, serves until Ctrl-C or SIGTERM.
async fn serve(cli: &Cli, args: &ServeArgs) -> Result<()> {
    let project = project(cli)?;
    let transforms = TransformSet::load(&project)?;
    let cubes = CubeSet::load(&project, &transforms)?;
    let users = UsersFile::load(&project.users)?;
    if users.users.is_empty() {
        return Err(crate::error::QueryError::new(format!(
            "no users in {}: nobody could log in",
            project.display_path(&project.users).display()
        ))
        .with_hint(Some("add one with `crmcube user add NAME --role manager`".into()))
        .into());
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(crate::serve::Tls {
            cert: std::fs::read(c).map_err(|e| Error::io(c, e))?,
            key: std::fs::read(k).map_err(|e| Error::io(k, e))?,
        }),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(&args.addr).await.map_err(|e| Error::io(format!("address {}", args.addr), e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("<listener>", e))?;
    if !addr.ip().is_loopback() && tls.is_none() && !args.insecure {
        return Err(crate::error::QueryError::new(format!(
            "refusing to serve on {addr} without TLS: passwords and data would cross the network in clear"
        ))
        .with_hint(Some("pass --tls-cert and --tls-key, listen on 127.0.0.1, or pass --insecure".into()))
        .into());
    }
    let config = crate::serve::ServerConfig {
        token_ttl: std::time::Duration::from_secs(args.token_ttl),
        max_queries: args.max_queries,
        query_memory: args.query_memory.map(|m| m << 20),
        rollups: !cli.no_rollups,
    };
    let auth = crate::serve::auth::Authenticator::new(users, config.token_ttl);
    let service = crate::serve::Service::new(warehouse(cli, &project), transforms, cubes, auth, config);
    // Schedulers and tests read this line to find the port.
    println!("listening on {addr}{}", if tls.is_some() { " (TLS)" } else { "" });
    std::io::Write::flush(&mut std::io::stdout()).map_err(|e| Error::io("<stdout>", e))?;
    crate::serve::serve(service, listener, tls, shutdown_signal()).await?;
    eprintln!("crmcube serve: stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}

fn print_load(out: &mut dyn Write, report: &LoadReport) -> Result<()> {
    let io = |e| Error::io("<stdout>", e);
    let w = report.tables.iter().map(|t| t.table.len()).max().unwrap_or(0).max(18);
    let n = |v: u64| output::group_thousands(&v.to_string());
    writeln!(
        out,
        "{:<w$} {:>8} {:>11} {:>10} {:>10} {:>8} {:>11} {:>10} {:>10}",
        "table", "kind", "mode", "read", "loaded", "updated", "quarantined", "duplicates", "rows"
    )
    .map_err(io)?;
    let mut read = 0;
    for t in &report.tables {
        if t.kind == "source" {
            read += t.read;
        }
        writeln!(
            out,
            "{:<w$} {:>8} {:>11} {:>10} {:>10} {:>8} {:>11} {:>10} {:>10}",
            t.table,
            t.kind,
            t.mode,
            n(t.read),
            n(t.loaded),
            n(t.updated),
            t.quarantined,
            t.duplicates,
            n(t.rows)
        )
        .map_err(io)?;
        if t.skipped > 0 || t.watermark_after.is_some() {
            writeln!(
                out,
                "{:<w$}   watermark {} → {} ({} rows at or before it skipped)",
                "",
                t.watermark_before.as_deref().unwrap_or("none"),
                t.watermark_after.as_deref().unwrap_or("none"),
                n(t.skipped)
            )
            .map_err(io)?;
        }
        if !t.partitions.is_empty() {
            writeln!(out, "{:<w$}   rebuilt {} partition(s): {}; the others kept", "", t.partitions.len(), t.partitions.join(", ")).map_err(io)?;
        }
    }
    let f = &report.files;
    if let Some(since) = f.since {
        writeln!(
            out,
            "{} export file(s) matched: {} new, {} changed and {} gone since snapshot {since}",
            f.read,
            f.new.len(),
            f.changed.len(),
            f.gone.len()
        )
        .map_err(io)?;
        for path in &f.changed {
            writeln!(out, "  changed since it was loaded: {path}").map_err(io)?;
        }
    }
    if report.unchanged {
        return writeln!(out, "nothing changed since snapshot {}: no snapshot written ({:.2} s)", report.snapshot, report.seconds).map_err(io);
    }
    writeln!(
        out,
        "snapshot {} committed: {} source rows read in {:.2} s ({} rows/s)",
        report.snapshot,
        n(read),
        report.seconds,
        output::group_thousands(&format!("{:.0}", read as f64 / report.seconds.max(1e-9)))
    )
    .map_err(io)
}

/// The three answers of the demo, as cube queries (also used by the tests).
pub fn demo_queries() -> [(&'static str, CubeQuery); 3] {
    let q = |measures: &[&str]| CubeQuery {
        cube: "sales".into(),
        measures: measures.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    [
        ("Revenue by region by year", CubeQuery { by: vec!["customer.region".into(), "time.year".into()], ..q(&["revenue"]) }),
        (
            "Top 10 customers by revenue",
            CubeQuery {
                by: vec!["customer.customer".into()],
                order: vec!["revenue:desc".into()],
                limit: Some(10),
                ..q(&["revenue", "orders", "margin_pct"])
            },
        ),
        (
            "Monthly revenue, last 12 months, with month-over-month change",
            CubeQuery { trend: Some("time.month".into()), last: Some(12), ..q(&["revenue"]) },
        ),
    ]
}

async fn demo(cli: &Cli, out: &mut dyn Write) -> Result<()> {
    let io = |e| Error::io("<stdout>", e);
    let project = project(cli)?;
    let wh = warehouse(cli, &project);
    writeln!(out, "Loading {} into {} …\n", project.display_path(&project.sources).display(), project.display_path(wh.root()).display())
        .map_err(io)?;
    let report = crate::etl::load(&project, &wh).await?;
    print_load(out, &report)?;
    let transforms = TransformSet::load(&project)?;
    let cubes = CubeSet::load(&project, &transforms)?;
    let ctx = wh.session().await?;
    for (title, q) in demo_queries() {
        let cube = cubes.get(&q.cube)?;
        let batches = crate::query::run(&ctx, cube, &q).await?;
        writeln!(out, "\n{title}").map_err(io)?;
        output::write(out, &batches, Format::Table)?;
    }
    Ok(())
}
