//! `crmcube serve`: the warehouse and its cubes over Arrow Flight SQL, for BI tools.
//!
//! ```text
//! client (ADBC, JDBC, arrow-flight) ──Handshake(Basic)──▶ auth::Authenticator → bearer token
//!        ──GetFlightInfo(SQL)──▶ plan on the current snapshot → schema + ticket{sql, snapshot}
//!        ──DoGet(ticket)───────▶ plan again on *that* snapshot → DataFusion stream → FlightData
//! ```
//!
//! - **Names.** Catalog `crmcube`; schema `warehouse` holds the loaded tables, schema `cubes`
//!   one table per cube (see [`crate::query::sql`]: bare measures keep their cube semantics),
//!   and `information_schema` the usual views. SQL goes through the same planner as
//!   `crmcube sql`, so a BI tool sees exactly what the CLI sees.
//! - **Snapshots.** Every statement is planned on the snapshot that is current when its
//!   FlightInfo is asked for, and its ticket names that snapshot, so a load committing between
//!   GetFlightInfo and DoGet does not change the answer; the next statement sees the new load
//!   without a restart. Sessions are cached per snapshot and user (`Service::session`), with
//!   the user's access rules ([`crate::access`]) bound below SQL.
//! - **Streaming.** Results go from DataFusion's record batch stream straight into the Flight
//!   encoder; nothing is collected. A client that goes away drops the stream, which stops the
//!   query.
//! - **Limits.** At most `max_queries` result streams run at once (others wait their turn);
//!   each query gets its own memory pool of `query_memory` bytes, past which DataFusion spills
//!   or the query fails with RESOURCE_EXHAUSTED.
//! - **Errors.** Query and metadata mistakes are INVALID_ARGUMENT with the planner's message,
//!   missing or expired tokens UNAUTHENTICATED, everything else INTERNAL.

pub mod auth;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any,
    CommandGetCatalogs, CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandGetXdbcTypeInfo,
    CommandPreparedStatementQuery, CommandStatementQuery, DoPutPreparedStatementResult, Nullable, ProstMessageExt, Searchable,
    SqlInfo, TicketStatementQuery, XdbcDataType,
};
use arrow_flight::{
    FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage, SchemaAsIpc,
    Ticket,
};
use base64::Engine;
use datafusion::arrow::array::{ArrayRef, Int32Array, RecordBatch, StringArray, UInt8Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::catalog::SchemaProvider;
use datafusion::catalog::information_schema::InformationSchemaProvider;
use datafusion::common::ScalarValue;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::TableType;
use datafusion::prelude::{DataFrame, SessionContext};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::cube::CubeSet;
use crate::error::{Error, ErrorKind, Result};
use crate::etl::{TransformBody, TransformSet};
use crate::warehouse::{CATALOG, Warehouse, WAREHOUSE_SCHEMA};
use auth::{AuthError, Authenticator, Principal};

/// Server settings (command-line flags of `crmcube serve`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long a bearer token stays valid after Handshake.
    pub token_ttl: Duration,
    /// Result streams running at once; further queries wait.
    pub max_queries: usize,
    /// Memory pool per query, in bytes (None: unbounded).
    pub query_memory: Option<usize>,
    /// Answer cube aggregates from rollups where one matches (off: always the base tables, which
    /// still group the fact by its keys before joining where that is exact: eager aggregation).
    pub rollups: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { token_ttl: Duration::from_secs(3600), max_queries: 8, query_memory: None, rollups: true }
    }
}

/// A PEM certificate chain and private key for TLS.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

/// The Flight SQL service over one project's warehouse.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    warehouse: Warehouse,
    transforms: TransformSet,
    cubes: CubeSet,
    auth: Authenticator,
    config: ServerConfig,
    /// Sessions of the newest few snapshots: the stored tables, and per user the same tables
    /// bound to that user's access rules.
    sessions: tokio::sync::Mutex<BTreeMap<u64, SnapshotSessions>>,
    prepared: Mutex<HashMap<String, Prepared>>,
    permits: Arc<Semaphore>,
}

/// One snapshot's sessions: its tables registered once, restricted per user from them.
struct SnapshotSessions {
    stored: SessionContext,
    users: HashMap<String, SessionContext>,
}

/// A prepared statement: its SQL, the user who prepared it, and bound parameters.
#[derive(Debug, Clone)]
struct Prepared {
    sql: String,
    user: String,
    params: Vec<ScalarValue>,
}

/// What a statement ticket carries (opaque to clients).
#[derive(Debug, Serialize, Deserialize)]
struct StatementHandle {
    sql: String,
    snapshot: u64,
}

/// Sessions kept per server: the current snapshot and the one before (for in-flight tickets).
const SESSIONS_KEPT: usize = 2;

impl Service {
    pub fn new(warehouse: Warehouse, transforms: TransformSet, cubes: CubeSet, auth: Authenticator, config: ServerConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_queries.max(1)));
        Self {
            inner: Arc::new(Inner {
                warehouse,
                transforms,
                cubes,
                auth,
                config,
                sessions: tokio::sync::Mutex::new(BTreeMap::new()),
                prepared: Mutex::new(HashMap::new()),
                permits,
            }),
        }
    }

    /// `who`'s session of snapshot `id`, or of the current snapshot: tables bound to the
    /// user's access rules, cubes registered over them.
    async fn session(&self, who: &Principal, id: Option<u64>) -> Result<(u64, SessionContext)> {
        let id = match id {
            Some(id) => id,
            None => self.inner.warehouse.current_or_error()?.id,
        };
        let mut sessions = self.inner.sessions.lock().await;
        let mut snapshot = match sessions.remove(&id) {
            Some(s) => s,
            None => SnapshotSessions { stored: self.inner.warehouse.session_at(Some(id)).await?, users: HashMap::new() },
        };
        let ctx = match snapshot.users.get(&who.user) {
            Some(ctx) => ctx.clone(),
            None => {
                let manifest = self.inner.warehouse.snapshot(id)?;
                let with = crate::rollup::Rewrites { rollups: self.inner.config.rollups, eager: true };
                let (ctx, _) = crate::access::restrict(&snapshot.stored, &self.inner.transforms, &self.inner.cubes, who, Some((&manifest, with))).await?;
                snapshot.users.insert(who.user.clone(), ctx.clone());
                ctx
            }
        };
        sessions.insert(id, snapshot);
        // Keep the newest snapshots; older ones go once no ticket is likely to need them (a late
        // ticket for one still gets its answer, from a session built for it).
        while sessions.len() > SESSIONS_KEPT {
            sessions.pop_first();
        }
        Ok((id, ctx))
    }

    /// A context for one query: the snapshot's catalog with the per-query memory pool.
    fn query_context(&self, base: &SessionContext) -> Result<SessionContext> {
        let Some(limit) = self.inner.config.query_memory else { return Ok(base.clone()) };
        let runtime = RuntimeEnvBuilder::from_runtime_env(base.runtime_env().as_ref()).with_memory_limit(limit, 1.0).build_arc()?;
        Ok(SessionContext::new_with_state(SessionStateBuilder::new_from_existing(base.state()).with_runtime_env(runtime).build()))
    }

    /// Plans `sql` (with bound `params`) on snapshot `id` or the current one.
    async fn plan(&self, who: &Principal, sql: &str, params: &[ScalarValue], id: Option<u64>) -> Result<(u64, DataFrame)> {
        let (id, base) = self.session(who, id).await?;
        let ctx = self.query_context(&base)?;
        let df = crate::query::sql::sql(&ctx, &self.inner.cubes, sql).await?;
        if params.is_empty() {
            return Ok((id, df));
        }
        let expected = df.logical_plan().get_parameter_types()?;
        let mut values = Vec::with_capacity(params.len());
        for (i, v) in params.iter().enumerate() {
            let value = match expected.get(&format!("${}", i + 1)) {
                Some(Some(ty)) if v.data_type() != *ty => v.cast_to(ty).map_err(|e| {
                    crate::error::QueryError::new(format!("parameter {} ({v}) cannot be used as {ty}: {e}", i + 1))
                })?,
                _ => v.clone(),
            };
            values.push(value);
        }
        Ok((id, df.with_param_values(values)?))
    }

    /// The caller's principal, from its bearer token.
    fn principal<T>(&self, request: &Request<T>) -> std::result::Result<Principal, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("no bearer token: log in first (Flight SQL Handshake with Basic credentials)"))?;
        let text = header.to_str().map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
        let token = text
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("expected `authorization: Bearer <token>`; log in with Handshake to get one"))?;
        self.inner.auth.check(token.trim()).map_err(|_| Status::unauthenticated("the token is unknown or has expired; log in again"))
    }

    /// Streams a planned query, holding a concurrency permit until the stream ends.
    async fn stream(&self, df: DataFrame) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let permit = self.inner.permits.clone().acquire_owned().await.map_err(|_| Status::unavailable("the server is shutting down"))?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df.execute_stream().await.map_err(|e| status(Error::from(e)))?;
        let batches = batches.map(move |r| {
            let _held = &permit;
            r.map_err(|e| FlightError::Tonic(Box::new(status(Error::from(e)))))
        });
        let flight = FlightDataEncoderBuilder::new().with_schema(schema).build(batches).map_err(Status::from);
        Ok(Response::new(Box::pin(flight)))
    }

    /// The prepared statement `handle` names, with the handle as text, if `user` prepared it.
    fn prepared(&self, handle: &[u8], user: &str) -> std::result::Result<(String, Prepared), Status> {
        let handle = std::str::from_utf8(handle).map_err(|_| Status::invalid_argument("malformed prepared statement handle"))?;
        let map = self.inner.prepared.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(handle) {
            Some(p) if p.user == user => Ok((handle.to_string(), p.clone())),
            _ => Err(Status::invalid_argument(format!("no prepared statement '{handle}' (closed, or prepared by another user)"))),
        }
    }

    /// Tables and primary keys as the transforms declare them.
    fn primary_keys(&self) -> Vec<(String, Vec<String>)> {
        self.inner
            .transforms
            .transforms
            .iter()
            .filter_map(|t| match &t.body {
                TransformBody::Source(s) if !s.key.is_empty() => Some((t.name.clone(), s.key.clone())),
                _ => None,
            })
            .collect()
    }

    /// Declared references: (fk table, fk column, pk table, pk column).
    fn foreign_keys(&self) -> Vec<(String, String, String, String)> {
        self.inner
            .transforms
            .transforms
            .iter()
            .flat_map(|t| match &t.body {
                TransformBody::Source(s) => {
                    s.references.iter().map(|r| (t.name.clone(), r.column.clone(), r.table.clone(), r.key.clone())).collect()
                }
                TransformBody::Derived { .. } | TransformBody::History(_) => Vec::new(),
            })
            .collect()
    }
}

/// How long running calls get to finish after the shutdown signal before connections are cut.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Binds nothing itself: serves on `listener` (bind port 0 in tests) until `shutdown` resolves,
/// then lets running calls finish for up to [`SHUTDOWN_GRACE`] (an idle client connection must
/// not keep the server alive).
pub async fn serve(
    service: Service,
    listener: tokio::net::TcpListener,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        // Two TLS back ends (ring, aws-lc) are compiled in through dependencies; rustls needs
        // the process to pick one. Already picked (e.g. by an earlier server) is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(tls.cert, tls.key)))
            .map_err(|e| Error::Internal(format!("TLS setup: {e}")))?;
    }
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .add_service(FlightServiceServer::new(service).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            tracing::info!("shutting down: no new calls; running calls get {} s", SHUTDOWN_GRACE.as_secs());
            let _ = stopping.send(());
        });
    tokio::select! {
        r = server => r.map_err(|e| Error::Io { path: "<listener>".into(), source: std::io::Error::other(e) }),
        _ = async {
            let _ = stopped.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("connections still open after {} s; closing them", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    }
}

/// The gRPC status of a crate error.
pub fn status(e: Error) -> Status {
    if e.is_out_of_memory() {
        return Status::resource_exhausted(format!("{e} (the query did not fit in the server's --query-memory)"));
    }
    match e.kind() {
        ErrorKind::Query | ErrorKind::Spec => Status::invalid_argument(e.to_string()),
        ErrorKind::Data => Status::resource_exhausted(e.to_string()),
        ErrorKind::Locked => Status::unavailable(e.to_string()),
        ErrorKind::Io | ErrorKind::Internal => Status::internal(e.to_string()),
    }
}

/// Basic credentials `user:password`, base64 with or without `=` padding (ADBC omits it).
fn basic_credentials(header: &str) -> std::result::Result<(String, String), Status> {
    let encoded = header
        .strip_prefix("Basic ")
        .ok_or_else(|| Status::invalid_argument("Handshake expects `authorization: Basic <base64 user:password>`"))?;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new().with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(encoded.trim()).map_err(|e| Status::invalid_argument(format!("Basic credentials are not base64: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| Status::invalid_argument("Basic credentials are not UTF-8"))?;
    let (user, password) =
        text.split_once(':').ok_or_else(|| Status::invalid_argument("Basic credentials must be `user:password`"))?;
    Ok((user.to_string(), password.to_string()))
}

fn flight_info(cmd: impl ProstMessageExt, schema: &Schema, descriptor: FlightDescriptor) -> std::result::Result<Response<FlightInfo>, Status> {
    let ticket = Ticket::new(cmd.as_any().encode_to_vec());
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(format!("encoding a schema: {e}")))?
        .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

type DoGetStream = Pin<Box<dyn Stream<Item = std::result::Result<FlightData, Status>> + Send + 'static>>;

fn batch_stream(batch: std::result::Result<RecordBatch, impl std::fmt::Display>) -> std::result::Result<Response<DoGetStream>, Status> {
    let batch = batch.map_err(|e| Status::internal(format!("building a metadata result: {e}")))?;
    let schema = batch.schema();
    let stream = FlightDataEncoderBuilder::new().with_schema(schema).build(futures::stream::iter([Ok(batch)])).map_err(Status::from);
    Ok(Response::new(Box::pin(stream)))
}

fn sql_info() -> &'static SqlInfoData {
    static INFO: OnceLock<SqlInfoData> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "crmcube");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        b.append(SqlInfo::SqlDdlCatalog, false);
        b.append(SqlInfo::SqlDdlSchema, false);
        b.append(SqlInfo::SqlDdlTable, false);
        b.build().expect("static SqlInfo")
    })
}

fn xdbc_info() -> &'static XdbcTypeInfoData {
    static INFO: OnceLock<XdbcTypeInfoData> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut b = XdbcTypeInfoDataBuilder::new();
        let types = [
            ("BOOLEAN", XdbcDataType::XdbcBit, None),
            ("INTEGER", XdbcDataType::XdbcInteger, Some(32)),
            ("BIGINT", XdbcDataType::XdbcBigint, Some(64)),
            ("DOUBLE", XdbcDataType::XdbcDouble, Some(53)),
            ("DECIMAL", XdbcDataType::XdbcDecimal, Some(38)),
            ("VARCHAR", XdbcDataType::XdbcVarchar, None),
            ("DATE", XdbcDataType::XdbcDate, None),
            ("TIMESTAMP", XdbcDataType::XdbcTimestamp, None),
        ];
        for (name, ty, size) in types {
            b.append(XdbcTypeInfo {
                type_name: name.into(),
                data_type: ty,
                column_size: size,
                literal_prefix: matches!(ty, XdbcDataType::XdbcVarchar).then(|| "'".into()),
                literal_suffix: matches!(ty, XdbcDataType::XdbcVarchar).then(|| "'".into()),
                create_params: None,
                nullable: Nullable::NullabilityNullable,
                case_sensitive: matches!(ty, XdbcDataType::XdbcVarchar),
                searchable: Searchable::Full,
                unsigned_attribute: size.map(|_| false),
                fixed_prec_scale: false,
                auto_increment: size.map(|_| false),
                local_type_name: Some(name.into()),
                minimum_scale: None,
                maximum_scale: None,
                sql_data_type: ty,
                datetime_subcode: None,
                num_prec_radix: size.map(|_| 10),
                interval_precision: None,
            });
        }
        b.build().expect("static XdbcTypeInfo")
    })
}

/// The schemas of a catalog, `information_schema` included (DataFusion answers it beside the
/// catalog's own schemas, so the catalog does not list it).
fn schemas_of(ctx: &SessionContext, catalog: &str) -> Vec<(String, Arc<dyn SchemaProvider>)> {
    let Some(provider) = ctx.catalog(catalog) else { return Vec::new() };
    let mut schemas: Vec<(String, Arc<dyn SchemaProvider>)> =
        provider.schema_names().into_iter().filter_map(|n| provider.schema(&n).map(|s| (n, s))).collect();
    if ctx.state().config().information_schema() {
        let info = InformationSchemaProvider::new(Arc::clone(ctx.state().catalog_list()));
        schemas.push(("information_schema".into(), Arc::new(info)));
    }
    schemas.sort_by(|a, b| a.0.cmp(&b.0));
    schemas
}

fn table_type(t: TableType) -> &'static str {
    match t {
        TableType::Base => "TABLE",
        TableType::View => "VIEW",
        TableType::Temporary => "LOCAL TEMPORARY",
    }
}

/// The result schema of GetExportedKeys / GetImportedKeys / GetCrossReference.
fn foreign_key_schema() -> SchemaRef {
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    Arc::new(Schema::new(vec![
        s("pk_catalog_name", true),
        s("pk_db_schema_name", true),
        s("pk_table_name", false),
        s("pk_column_name", false),
        s("fk_catalog_name", true),
        s("fk_db_schema_name", true),
        s("fk_table_name", false),
        s("fk_column_name", false),
        Field::new("key_sequence", DataType::Int32, false),
        s("fk_key_name", true),
        s("pk_key_name", true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ]))
}

fn primary_key_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("catalog_name", DataType::Utf8, true),
        Field::new("db_schema_name", DataType::Utf8, true),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("column_name", DataType::Utf8, false),
        Field::new("key_name", DataType::Utf8, true),
        Field::new("key_sequence", DataType::Int32, false),
    ]))
}

/// Whether a Flight SQL catalog/schema filter admits `name` (absent = any; empty catalog = none).
fn admits(filter: &Option<String>, name: &str) -> bool {
    filter.as_deref().is_none_or(|f| f == name)
}

fn foreign_key_batch(rows: &[(String, String, String, String)]) -> std::result::Result<RecordBatch, Status> {
    let col = |f: &dyn Fn(&(String, String, String, String)) -> Option<String>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let n = rows.len();
    RecordBatch::try_new(
        foreign_key_schema(),
        vec![
            col(&|_| Some(CATALOG.into())),
            col(&|_| Some(WAREHOUSE_SCHEMA.into())),
            col(&|r| Some(r.2.clone())),
            col(&|r| Some(r.3.clone())),
            col(&|_| Some(CATALOG.into())),
            col(&|_| Some(WAREHOUSE_SCHEMA.into())),
            col(&|r| Some(r.0.clone())),
            col(&|r| Some(r.1.clone())),
            Arc::new(Int32Array::from(vec![1; n])),
            col(&|r| Some(format!("{}_{}_fkey", r.0, r.1))),
            col(&|r| Some(format!("{}_pkey", r.2))),
            // 3 = NO ACTION (the warehouse is read-only).
            Arc::new(UInt8Array::from(vec![3u8; n])),
            Arc::new(UInt8Array::from(vec![3u8; n])),
        ],
    )
    .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl FlightSqlService for Service {
    type FlightService = Service;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Pin<Box<dyn Stream<Item = std::result::Result<HandshakeResponse, Status>> + Send>>>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("Handshake needs `authorization: Basic <base64 user:password>`"))?
            .to_str()
            .map_err(|_| Status::invalid_argument("the authorization header is not text"))?;
        let (user, password) = basic_credentials(header)?;
        let token = match self.inner.auth.login(&user, &password) {
            Ok(t) => t,
            Err(AuthError::LockedOut { seconds }) => {
                return Err(Status::resource_exhausted(format!("too many wrong passwords for '{user}'; try again in {seconds} s")));
            }
            Err(_) => return Err(Status::unauthenticated(format!("wrong user name or password for '{user}'"))),
        };
        tracing::info!(user, "logged in");
        let response = HandshakeResponse { protocol_version: 0, payload: token.clone().into() };
        let stream: Pin<Box<dyn Stream<Item = _> + Send>> = Box::pin(futures::stream::iter([Ok(response)]));
        let mut response = Response::new(stream);
        let bearer = MetadataValue::try_from(format!("Bearer {token}")).map_err(|e| Status::internal(e.to_string()))?;
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let who = self.principal(&request)?;
        tracing::info!(user = who.user, sql = query.query, "statement");
        let (snapshot, df) = self.plan(&who, &query.query, &[], None).await.map_err(status)?;
        let handle = serde_json::to_vec(&StatementHandle { sql: query.query, snapshot }).map_err(|e| Status::internal(e.to_string()))?;
        flight_info(TicketStatementQuery { statement_handle: handle.into() }, df.schema().as_arrow(), request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = self.principal(&request)?;
        let handle: StatementHandle = serde_json::from_slice(&ticket.statement_handle)
            .map_err(|_| Status::invalid_argument("malformed statement ticket; ask GetFlightInfo for a new one"))?;
        let (_, df) = self.plan(&who, &handle.sql, &[], Some(handle.snapshot)).await.map_err(status)?;
        self.stream(df).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> std::result::Result<ActionCreatePreparedStatementResult, Status> {
        let who = self.principal(&request)?;
        let (_, df) = self.plan(&who, &query.query, &[], None).await.map_err(status)?;
        let mut parameters: Vec<(usize, Field)> = df
            .logical_plan()
            .get_parameter_types()
            .map_err(|e| status(e.into()))?
            .into_iter()
            .filter_map(|(name, ty)| {
                let n: usize = name.strip_prefix('$')?.parse().ok()?;
                Some((n, Field::new(name, ty.unwrap_or(DataType::Utf8), true)))
            })
            .collect();
        parameters.sort_by_key(|(n, _)| *n);
        let parameter_schema = Schema::new(parameters.into_iter().map(|(_, f)| f).collect::<Vec<_>>());
        let options = IpcWriteOptions::default();
        let encode = |s: &Schema| -> std::result::Result<_, Status> {
            let IpcMessage(bytes) = SchemaAsIpc::new(s, &options).try_into().map_err(|e: datafusion::arrow::error::ArrowError| Status::internal(e.to_string()))?;
            Ok(bytes)
        };
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        let handle: String = id.iter().map(|b| format!("{b:02x}")).collect();
        self.inner
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle.clone(), Prepared { sql: query.query, user: who.user, params: Vec::new() });
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into_bytes().into(),
            dataset_schema: encode(df.schema().as_arrow())?,
            parameter_schema: encode(&parameter_schema)?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> std::result::Result<DoPutPreparedStatementResult, Status> {
        let who = self.principal(&request)?;
        let (handle, _) = self.prepared(&query.prepared_statement_handle, &who.user)?;
        let data = request.into_inner().map_err(|s| FlightError::Tonic(Box::new(s)));
        let batches: Vec<RecordBatch> = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(data)
            .try_collect()
            .await
            .map_err(|e| Status::invalid_argument(format!("parameters are not a valid Arrow batch: {e}")))?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows > 1 {
            return Err(Status::invalid_argument(format!(
                "bind one row of parameters per execution, got {rows}; execute once per row"
            )));
        }
        let params = match batches.iter().find(|b| b.num_rows() == 1) {
            Some(b) => b
                .columns()
                .iter()
                .map(|c| ScalarValue::try_from_array(c, 0))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            None => Vec::new(),
        };
        if let Some(p) = self.inner.prepared.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&handle) {
            p.params = params;
        }
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(query.prepared_statement_handle) })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let who = self.principal(&request)?;
        let (_, p) = self.prepared(&cmd.prepared_statement_handle, &who.user)?;
        tracing::info!(user = who.user, sql = p.sql, "prepared statement");
        let (_, df) = self.plan(&who, &p.sql, &p.params, None).await.map_err(status)?;
        flight_info(cmd, df.schema().as_arrow(), request.into_inner())
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = self.principal(&request)?;
        let (_, p) = self.prepared(&cmd.prepared_statement_handle, &who.user)?;
        let (_, df) = self.plan(&who, &p.sql, &p.params, None).await.map_err(status)?;
        self.stream(df).await
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> std::result::Result<(), Status> {
        let who = self.principal(&request)?;
        let (handle, _) = self.prepared(&query.prepared_statement_handle, &who.user)?;
        self.inner.prepared.lock().unwrap_or_else(|e| e.into_inner()).remove(&handle);
        Ok(())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        let schema = query.clone().into_builder().schema();
        flight_info(query, &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = self.principal(&request)?;
        let (_, ctx) = self.session(&who, None).await.map_err(status)?;
        let mut b = query.into_builder();
        for name in ctx.catalog_names() {
            b.append(name);
        }
        batch_stream(b.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        let schema = query.clone().into_builder().schema();
        flight_info(query, &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = self.principal(&request)?;
        let (_, ctx) = self.session(&who, None).await.map_err(status)?;
        let mut b = query.into_builder();
        for catalog in ctx.catalog_names() {
            for schema in schemas_of(&ctx, &catalog) {
                b.append(&catalog, schema.0);
            }
        }
        batch_stream(b.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        let schema = query.clone().into_builder().schema();
        flight_info(query, &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = self.principal(&request)?;
        let (_, ctx) = self.session(&who, None).await.map_err(status)?;
        let mut b = query.into_builder();
        for catalog_name in ctx.catalog_names() {
            for (schema_name, schema) in schemas_of(&ctx, &catalog_name) {
                let mut names = schema.table_names();
                names.sort();
                for table in names {
                    let Some(provider) = schema.table(&table).await.map_err(|e| status(e.into()))? else { continue };
                    b.append(&catalog_name, &schema_name, &table, table_type(provider.table_type()), &provider.schema())
                        .map_err(|e| Status::internal(e.to_string()))?;
                }
            }
        }
        batch_stream(b.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        let schema = query.clone().into_builder().schema();
        flight_info(query, &schema, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        let mut b = query.into_builder();
        for t in ["TABLE", "VIEW"] {
            b.append(t);
        }
        batch_stream(b.build())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        let schema = query.clone().into_builder(sql_info()).schema();
        flight_info(query, &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        batch_stream(query.into_builder(sql_info()).build())
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        let schema = query.clone().into_builder(xdbc_info()).schema();
        flight_info(query, &schema, request.into_inner())
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        batch_stream(query.into_builder(xdbc_info()).build())
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        flight_info(query, &primary_key_schema(), request.into_inner())
    }

    async fn do_get_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        let mut rows: Vec<(String, String, i32)> = Vec::new();
        if admits(&query.catalog, CATALOG) && admits(&query.db_schema, WAREHOUSE_SCHEMA) {
            for (table, key) in self.primary_keys().into_iter().filter(|(t, _)| *t == query.table) {
                rows.extend(key.into_iter().enumerate().map(|(i, c)| (table.clone(), c, i as i32 + 1)));
            }
        }
        let n = rows.len();
        batch_stream(RecordBatch::try_new(
            primary_key_schema(),
            vec![
                Arc::new(StringArray::from(vec![Some(CATALOG); n])),
                Arc::new(StringArray::from(vec![Some(WAREHOUSE_SCHEMA); n])),
                Arc::new(rows.iter().map(|r| Some(r.0.clone())).collect::<StringArray>()),
                Arc::new(rows.iter().map(|r| Some(r.1.clone())).collect::<StringArray>()),
                Arc::new(rows.iter().map(|r| Some(format!("{}_pkey", r.0))).collect::<StringArray>()),
                Arc::new(rows.iter().map(|r| r.2).collect::<Int32Array>()),
            ],
        ))
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        flight_info(query, &foreign_key_schema(), request.into_inner())
    }

    async fn do_get_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        let ours = admits(&query.catalog, CATALOG) && admits(&query.db_schema, WAREHOUSE_SCHEMA);
        let rows: Vec<_> = self.foreign_keys().into_iter().filter(|r| ours && r.2 == query.table).collect();
        batch_stream(foreign_key_batch(&rows))
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        flight_info(query, &foreign_key_schema(), request.into_inner())
    }

    async fn do_get_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        let ours = admits(&query.catalog, CATALOG) && admits(&query.db_schema, WAREHOUSE_SCHEMA);
        let rows: Vec<_> = self.foreign_keys().into_iter().filter(|r| ours && r.0 == query.table).collect();
        batch_stream(foreign_key_batch(&rows))
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        flight_info(query, &foreign_key_schema(), request.into_inner())
    }

    async fn do_get_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        let ours = admits(&query.pk_catalog, CATALOG)
            && admits(&query.pk_db_schema, WAREHOUSE_SCHEMA)
            && admits(&query.fk_catalog, CATALOG)
            && admits(&query.fk_db_schema, WAREHOUSE_SCHEMA);
        let rows: Vec<_> =
            self.foreign_keys().into_iter().filter(|r| ours && r.2 == query.pk_table && r.0 == query.fk_table).collect();
        batch_stream(foreign_key_batch(&rows))
    }

    async fn do_get_fallback(
        &self,
        request: Request<Ticket>,
        message: Any,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        Err(Status::invalid_argument(format!("unsupported ticket type '{}'", message.type_url)))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_with_and_without_padding() {
        let padded = base64::engine::general_purpose::STANDARD.encode("ann:pwd");
        assert!(padded.ends_with('='), "{padded}: the test needs a value that pads");
        let unpadded = padded.trim_end_matches('=');
        for h in [padded.as_str(), unpadded] {
            assert_eq!(basic_credentials(&format!("Basic {h}")).unwrap(), ("ann".into(), "pwd".into()));
        }
        assert_eq!(basic_credentials("Bearer x").unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(basic_credentials("Basic !!!").unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn errors_map_to_grpc_codes() {
        assert_eq!(status(crate::error::QueryError::new("x").into()).code(), tonic::Code::InvalidArgument);
        assert_eq!(status(Error::Internal("x".into())).code(), tonic::Code::Internal);
    }
}
