//! Calls through the control API: sync calls answered with their output, streams as
//! Server-Sent Events, and calls as resources to look at, wait for and cancel.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, Query as UrlQuery, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use libp2p::PeerId;
use serde::Deserialize;
use serde_json::{Value, json};
use skillmesh_protocol::CallId;

use super::{ApiError, AppState};
use crate::error::Error;
use crate::node::CallOptions;
use crate::skills::Chunk;
use crate::store::{CallLogEntry, Direction};
use crate::streaming::StreamOptions;

/// The longest `?wait=` a request may hold a call for.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// How often a waiting request looks at the call log.
const WAIT_POLL: Duration = Duration::from_millis(100);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CallRequest {
    skill: String,
    #[serde(default)]
    args: Value,
    peer: Option<String>,
    timeout_ms: Option<u64>,
    version: Option<String>,
    /// Answer as Server-Sent Events, a chunk per event (stream skills).
    #[serde(default)]
    stream: bool,
    /// Answer at once with the call's id (async skills); the result comes later.
    #[serde(default, rename = "async")]
    is_async: bool,
}

fn bad(m: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid", m)
}

impl CallRequest {
    fn options(&self) -> Result<CallOptions, ApiError> {
        Ok(CallOptions {
            version_req: match &self.version {
                Some(v) => v.parse().map_err(|e| bad(format!("version {v:?}: {e}")))?,
                None => semver::VersionReq::STAR,
            },
            timeout: self.timeout_ms.map(Duration::from_millis),
            grant: None,
        })
    }

    /// The chosen peer, or every provider found.
    async fn peers(&self, s: &AppState) -> Result<Vec<PeerId>, ApiError> {
        Ok(match &self.peer {
            Some(p) => vec![p.parse().map_err(|e| bad(format!("peer {p:?}: {e}")))?],
            None => s
                .node
                .find_skill(&self.skill)
                .await?
                .into_iter()
                .map(|f| f.peer)
                .collect(),
        })
    }
}

pub(super) async fn call(
    State(s): State<AppState>,
    Json(req): Json<CallRequest>,
) -> Result<Response, ApiError> {
    let options = req.options()?;
    let peers = req.peers(&s).await?;
    // Without a peer, try providers in turn; a refusal by the callee is final, an unreachable
    // provider is not.
    let mut last = None;
    for peer in peers {
        let result = if req.is_async {
            s.node
                .call_async(peer, &req.skill, req.args.clone(), options.clone())
                .await
                .map(|id| {
                    Json(json!({"call_id": id.to_string(), "peer_id": peer.to_string(), "state": "working"}))
                        .into_response()
                })
        } else if req.stream {
            let options = StreamOptions {
                call: options.clone(),
                keep_transcript: false,
            };
            s.node
                .call_stream_with(peer, &req.skill, req.args.clone(), options)
                .await
                .map(|stream| sse(peer, stream).into_response())
        } else {
            s.node
                .call_with(peer, &req.skill, req.args.clone(), options.clone())
                .await
                .map(|output| {
                    Json(json!({"peer_id": peer.to_string(), "output": output})).into_response()
                })
        };
        match result {
            Ok(r) => return Ok(r),
            Err(e @ (Error::Unreachable { .. } | Error::Timeout(_))) if req.peer.is_none() => {
                last = Some(e)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last
        .unwrap_or_else(|| Error::NotFound(format!("skill {}", req.skill)))
        .into())
}

/// A stream as events: `started` {call_id, peer_id}; `chunk` (a JSON value) or `bytes` (hex)
/// per chunk; then `end` {chunks}, or `error` {error: {kind, code, message}}. A client that
/// disconnects drops the stream, which cancels the call.
fn sse(
    peer: PeerId,
    stream: crate::streaming::CallStream,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let started = json!({"call_id": stream.call_id().to_string(), "peer_id": peer.to_string()});
    let events = futures::stream::unfold(
        (Some(stream), Some(started), 0u64),
        |(stream, started, count)| async move {
            if let Some(s) = started {
                let e = SseEvent::default().event("started").json_data(s);
                return Some((e, (stream, None, count)));
            }
            let mut stream = stream?;
            let (e, next) = match stream.next().await {
                Some(Ok(Chunk::Json(v))) => (
                    SseEvent::default().event("chunk").json_data(v),
                    Some(stream),
                ),
                Some(Ok(Chunk::Bytes(b))) => (
                    Ok(SseEvent::default().event("bytes").data(hex::encode(b))),
                    Some(stream),
                ),
                Some(Err(e)) => (
                    SseEvent::default()
                        .event("error")
                        .json_data(ApiError::from(e).body()),
                    None,
                ),
                None => (
                    SseEvent::default()
                        .event("end")
                        .json_data(json!({"chunks": count})),
                    None,
                ),
            };
            Some((e, (next, None, count + 1)))
        },
    )
    .map(|e| Ok(e.unwrap_or_default()));
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[derive(Deserialize)]
pub(super) struct LimitQuery {
    limit: Option<usize>,
}

pub(super) async fn list(
    State(s): State<AppState>,
    UrlQuery(q): UrlQuery<LimitQuery>,
) -> Result<Json<Value>, ApiError> {
    let entries = s.node.recent_calls(q.limit.unwrap_or(50).min(1000)).await?;
    Ok(Json(Value::Array(entries.iter().map(entry_json).collect())))
}

/// A call log entry as the API shows it.
pub(super) fn entry_json(e: &CallLogEntry) -> Value {
    json!({
        "call_id": e.call_id.to_string(),
        "direction": e.direction,
        "peer_id": e.peer.to_string(),
        "skill": e.skill,
        "mode": e.mode,
        "state": e.state,
        "error": e.error.map(|c| c.name()),
        "started_at": e.started_at.as_millis(),
        "updated_at": e.updated_at.as_millis(),
        "history": e.history.iter().map(|t| json!({"state": t.state, "at": t.at.as_millis()})).collect::<Vec<_>>(),
    })
}

fn call_id(text: &str) -> Result<CallId, ApiError> {
    let bytes = hex::decode(text).map_err(|_| bad(format!("call id {text:?} is not hex")))?;
    let id: [u8; 16] = bytes
        .try_into()
        .map_err(|_| bad(format!("call id {text:?} is not 32 hex digits")))?;
    Ok(CallId(id))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitQuery {
    /// Wait until the call is over, at most this long (e.g. `30s`).
    wait: Option<String>,
}

pub(super) async fn show(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    UrlQuery(q): UrlQuery<WaitQuery>,
) -> Result<Json<Value>, ApiError> {
    let id = call_id(&id)?;
    let wait = match &q.wait {
        Some(w) => humantime::parse_duration(w)
            .map_err(|e| bad(format!("wait {w:?}: {e}")))?
            .min(MAX_WAIT),
        None => Duration::ZERO,
    };
    let start = tokio::time::Instant::now();
    let until = start + wait;
    // A call that just ended may still be on its way to the log (the writer batches): one not
    // found is looked for a little while before it is reported missing.
    let unknown_after = start + wait.clamp(Duration::from_secs(1), Duration::from_secs(2));
    loop {
        let mut entries = Vec::new();
        for dir in [Direction::Outbound, Direction::Inbound] {
            if let Some(e) = s
                .node
                .store()
                .call_entry(id, dir)
                .await
                .map_err(Error::from)?
            {
                entries.push(e);
            }
        }
        let running = entries.iter().any(|e| !e.state.is_final());
        // A call just made may not be in the log yet: the writer batches.
        let now = tokio::time::Instant::now();
        let pending =
            entries.is_empty() && (s.node.outbound_peer(id).is_some() || now < unknown_after);
        if (!running && !pending) || now >= until {
            if entries.is_empty() {
                return Err(Error::NotFound(format!("no call {id} in the call log")).into());
            }
            let mut sides = Vec::new();
            for e in &entries {
                let mut j = entry_json(e);
                // An async call's kept result: its output, or its error.
                if let Some(r) = s.node.kept_result(id, e.direction).await? {
                    match crate::async_client::output(r) {
                        Ok(out) => j["output"] = out,
                        Err(Error::Remote(err)) => {
                            j["message"] = Value::String(err.message);
                        }
                        Err(other) => j["message"] = Value::String(other.to_string()),
                    }
                }
                sides.push(j);
            }
            return Ok(Json(json!({
                "call_id": id.to_string(),
                "over": !running && !pending,
                "sides": sides,
            })));
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

pub(super) async fn cancel(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = call_id(&id)?;
    s.node.cancel_call(id).await?;
    Ok(Json(json!({"call_id": id.to_string(), "cancelled": true})))
}
