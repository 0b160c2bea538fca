//! The local control API (docs/api.md): how the CLI, and agents written in other languages,
//! drive a running node. HTTP + JSON on a loopback address, every request carrying the token
//! the daemon wrote to its data dir (mode 0600) as `Authorization: Bearer <token>`.
//!
//! | method and path | does |
//! | --- | --- |
//! | `GET /v1/status` | peer id, addresses, connections, served skills |
//! | `GET /v1/peers` | agents online (presence) or connected |
//! | `GET /v1/skills` | skills served |
//! | `POST /v1/skills` | serve a skill: a declaration with `command` or `http` (a callback URL) |
//! | `DELETE /v1/skills/{name}` | stop serving it |
//! | `GET /v1/find?skill=NAME` or `?tag=TAG` | agents serving it, with verified cards |
//! | `POST /v1/call` | `{"skill", "args", "peer"?, "timeout_ms"?, "stream"?}`: call it (any provider if no peer); a stream as Server-Sent Events |
//! | `POST /v1/events?topic=T` | publish the JSON body on topic T |
//! | `GET /v1/events?topic=T` | the topic's events as Server-Sent Events |
//! | `GET /v1/calls?limit=N` | the call log, newest first |
//! | `GET /v1/calls/{id}?wait=30s` | one call, both sides, with its history (waiting for it to end) |
//! | `POST /v1/calls/{id}/cancel`, `DELETE /v1/calls/{id}` | cancel our call |
//! | `GET /metrics` | Prometheus metrics |
//!
//! Errors are `{"error": {"kind", "code"?, "message"}}` with a matching HTTP status.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query as UrlQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use libp2p::PeerId;
use libp2p::futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;

mod calls;

use crate::backing::SkillDecl;
use crate::discovery::Found;
use crate::error::Error;
use crate::mail::Delivery;
use crate::node::Node;

/// File in the data dir holding the API's address while a node runs.
pub const API_ADDR_FILE: &str = "api.addr";
/// File in the data dir holding the API token (mode 0600).
pub const API_TOKEN_FILE: &str = "api.token";
/// Largest request body accepted.
const MAX_BODY: usize = 2 * 1024 * 1024;

/// An API error: HTTP status, a kind, the callee's code for refused calls, and a message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<String>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            code: None,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Remote(err) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                kind: "remote",
                code: Some(err.code.name().to_owned()),
                message: err.message,
            },
            Error::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
            Error::Unreachable { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "unreachable", message)
            }
            Error::Timeout(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message),
            Error::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid", message),
            Error::Publish(_) => ApiError::new(StatusCode::CONFLICT, "not_published", message),
            Error::Overloaded(_) | Error::ShutDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            Error::Undelivered { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "undelivered", message)
            }
            Error::BadResponse { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "bad_response", message)
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
    }
}

impl ApiError {
    /// `{"error": {"kind", "code", "message"}}`.
    fn body(&self) -> Value {
        json!({"error": {"kind": self.kind, "code": self.code, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        (self.status, Json(body)).into_response()
    }
}

#[derive(Clone)]
struct AppState {
    node: Node,
    token: Arc<String>,
    declared: Arc<Mutex<HashMap<String, SkillDecl>>>,
}

/// A running control API. Its files are removed from the data dir when it stops.
pub struct ControlApi {
    addr: SocketAddr,
    files: Vec<PathBuf>,
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl ControlApi {
    /// Serves the API for `node` on `listen` (loopback), writing the token and then the
    /// address to `data_dir`. `declared` are the skills already served from the config.
    pub async fn start(
        node: Node,
        listen: SocketAddr,
        data_dir: &Path,
        declared: Vec<SkillDecl>,
    ) -> Result<Self, Error> {
        if !listen.ip().is_loopback() {
            return Err(Error::Transport(format!(
                "the control API listens on loopback only, not {listen}"
            )));
        }
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            Error::Transport(format!(
                "cannot listen for the control API on {listen}: {e}"
            ))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Transport(e.to_string()))?;
        let token = hex::encode(rand::random::<[u8; 32]>());
        let token_file = data_dir.join(API_TOKEN_FILE);
        let addr_file = data_dir.join(API_ADDR_FILE);
        write_private(&token_file, token.as_bytes())
            .map_err(|e| Error::Transport(format!("cannot write {}: {e}", token_file.display())))?;
        write_private(&addr_file, addr.to_string().as_bytes())
            .map_err(|e| Error::Transport(format!("cannot write {}: {e}", addr_file.display())))?;

        let state = AppState {
            node,
            token: Arc::new(token),
            declared: Arc::new(Mutex::new(
                declared.into_iter().map(|d| (d.name.clone(), d)).collect(),
            )),
        };
        let app = Router::new()
            .route("/v1/status", get(status))
            .route("/v1/peers", get(peers))
            .route("/v1/skills", get(list_skills).post(add_skill))
            .route("/v1/skills/{name}", delete(remove_skill))
            .route("/v1/find", get(find))
            .route("/v1/call", post(calls::call))
            .route("/v1/events", post(publish).get(subscribe))
            .route("/v1/calls", get(calls::list))
            .route("/v1/calls/{id}", get(calls::show).delete(calls::cancel))
            .route("/v1/calls/{id}/cancel", post(calls::cancel))
            .route("/v1/send", post(send))
            .route("/v1/inbox", get(inbox))
            .route("/metrics", get(metrics))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                authorize,
            ))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(state);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!("control API stopped: {e}");
            }
        });
        Ok(ControlApi {
            addr,
            files: vec![addr_file, token_file],
            task,
            stop,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (open event streams are closed) and removes the files.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare in constant time: the token is the only thing between local users and the node.
    let expected = state.token.as_bytes();
    let ok = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !ok {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API token",
        )
        .into_response();
    }
    next.run(req).await
}

async fn status(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let addrs = s.node.listen_addrs().await?;
    let peers = s.node.peers().await?;
    Ok(Json(json!({
        "peer_id": s.node.peer_id().to_string(),
        "name": s.node.config().node.name,
        "version": env!("CARGO_PKG_VERSION"),
        "mesh": s.node.config().mesh.name,
        "listen_addrs": addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "connected_peers": peers.iter().filter(|p| p.connected).count(),
        "known_peers": peers.len(),
        "skills": s.node.skills(),
        "call_log_dropped": s.node.call_log_dropped(),
        "nat": s.node.nat_status().await?,
        "mailboxes": s.node.mailboxes().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "inbox": s.node.store().inbox_len().await.map_err(Error::from)?,
    })))
}

#[derive(Deserialize)]
struct SendBody {
    peer: String,
    text: Option<String>,
    hex: Option<String>,
}

async fn send(
    State(s): State<AppState>,
    Json(body): Json<SendBody>,
) -> Result<Json<Value>, ApiError> {
    let peer: PeerId = body
        .peer
        .parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("peer: {e}")))?;
    let data = match (body.text, body.hex) {
        (Some(t), None) => t.into_bytes(),
        (None, Some(h)) => hex::decode(h.trim())
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("hex: {e}")))?,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "give exactly one of text and hex".to_owned(),
            ));
        }
    };
    let r = s.node.send(peer, &data).await?;
    let delivery = match r.delivery {
        Delivery::Direct => json!("direct"),
        Delivery::Deposited(m) => {
            json!({"deposited": m.iter().map(ToString::to_string).collect::<Vec<_>>()})
        }
    };
    Ok(Json(
        json!({"id": r.id.to_string(), "seq": r.seq, "delivery": delivery}),
    ))
}

#[derive(Deserialize)]
struct InboxQuery {
    /// Seconds to wait for a first message.
    #[serde(default)]
    wait: u64,
    #[serde(default = "default_inbox_limit")]
    limit: usize,
}

fn default_inbox_limit() -> usize {
    100
}

/// Takes up to `limit` ready messages, waiting up to `wait` seconds for the first.
async fn inbox(
    State(s): State<AppState>,
    UrlQuery(q): UrlQuery<InboxQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.clamp(1, 1000);
    let wait = Duration::from_secs(q.wait.min(300));
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    // Polls rather than waiting on the inbox stream: a take is never cut off half-way.
    while out.len() < limit {
        match s.node.try_next_message().await? {
            Some(m) => out.push(m),
            None if out.is_empty() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None => break,
        }
    }
    let list: Vec<Value> = out
        .into_iter()
        .map(|m| {
            let mut v = json!({
                "id": m.id.to_string(),
                "from": m.from.to_string(),
                "seq": m.seq,
                "sent_at": m.sent_at.as_millis(),
                "received_at": m.received_at.as_millis(),
            });
            match std::str::from_utf8(&m.data) {
                Ok(t) => v["text"] = json!(t),
                Err(_) => v["hex"] = json!(hex::encode(&m.data)),
            }
            v
        })
        .collect();
    Ok(Json(Value::Array(list)))
}

async fn peers(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let peers = s.node.peers().await?;
    Ok(Json(Value::Array(
        peers
            .into_iter()
            .map(|p| {
                json!({
                    "peer_id": p.peer.to_string(),
                    "name": p.name,
                    "connected": p.connected,
                    "skills": p.skills.iter().map(|s| s.name.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )))
}

async fn list_skills(State(s): State<AppState>) -> Json<Value> {
    let declared = s.declared.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Json(Value::Array(
        s.node
            .skills()
            .into_iter()
            .map(|spec| {
                let backing = declared
                    .get(spec.name.as_str())
                    .map(|d| json!({"command": d.command, "http": d.http}));
                json!({"spec": spec, "backing": backing})
            })
            .collect(),
    ))
}

async fn add_skill(
    State(s): State<AppState>,
    Json(decl): Json<SkillDecl>,
) -> Result<Json<Value>, ApiError> {
    let (spec, backing) = decl
        .resolve()
        .map_err(|e| ApiError::from(Error::Invalid(e)))?;
    let report = s
        .node
        .register_handler(spec.clone(), backing.handler(spec.mode))
        .await?;
    s.declared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(decl.name.clone(), decl);
    Ok(Json(json!({
        "registered": true,
        "keys": report.keys,
        "keys_replicated": report.keys_replicated,
        "card_replicated": report.card_replicated,
    })))
}

async fn remove_skill(
    State(s): State<AppState>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    if !s.node.unregister_skill(&name).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no skill {name} is served here"),
        ));
    }
    s.declared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name);
    Ok(Json(json!({"removed": name})))
}

#[derive(Deserialize)]
struct FindQuery {
    skill: Option<String>,
    tag: Option<String>,
}

fn found_json(f: &Found) -> Value {
    json!({
        "peer_id": f.peer.to_string(),
        "name": f.card.name,
        "addrs": f.card.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "skills": f.skills,
    })
}

async fn find(
    State(s): State<AppState>,
    UrlQuery(q): UrlQuery<FindQuery>,
) -> Result<Json<Value>, ApiError> {
    let found = match (q.skill, q.tag) {
        (Some(name), None) => s.node.find_skill(&name).await?,
        (None, Some(tag)) => s.node.find_tag(&tag).await?,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "give exactly one of ?skill= or ?tag=",
            ));
        }
    };
    Ok(Json(Value::Array(found.iter().map(found_json).collect())))
}

#[derive(Deserialize)]
struct TopicQuery {
    topic: String,
}

async fn publish(
    State(s): State<AppState>,
    UrlQuery(q): UrlQuery<TopicQuery>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    s.node.publish_json(&q.topic, &body).await?;
    Ok(Json(json!({"published": true})))
}

#[derive(Serialize)]
struct EventOut {
    topic: String,
    publisher: String,
    seq: u64,
    issued_at: u64,
    data: Value,
}

async fn subscribe(
    State(s): State<AppState>,
    UrlQuery(q): UrlQuery<TopicQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let sub = s.node.subscribe(&q.topic).await?;
    let stream = sub.map(|d| {
        let data = d
            .json()
            .unwrap_or_else(|| json!({"bytes_hex": hex::encode(&d.data)}));
        let out = EventOut {
            topic: d.topic,
            publisher: d.publisher.to_string(),
            seq: d.seq,
            issued_at: d.issued_at.as_millis(),
            data,
        };
        Ok(SseEvent::default().json_data(out).unwrap_or_default())
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.node.metrics_text(),
    )
}
