//! HTTP backings: a POST per call to a local endpoint; the answer is the result, or for stream
//! skills an NDJSON or Server-Sent Events body, one chunk per line or event.

use futures::StreamExt;
use serde_json::Value;
use skillmesh_protocol::{MAX_CHUNK_DATA_BYTES, MAX_OUTPUT_BYTES};

use super::MAX_ERROR_TEXT;
use crate::skills::{
    CallContext, Chunk, ChunkStream, HandlerError, HandlerFuture, SkillHandler, StreamHandler,
    task_stream,
};
use crate::sse::SseParser;

/// POSTs each call to a local HTTP endpoint.
#[derive(Clone, Debug)]
pub struct HttpHandler {
    url: String,
    client: reqwest::Client,
}

impl HttpHandler {
    /// A handler posting to `url`.
    pub fn new(url: String) -> Self {
        HttpHandler {
            url,
            client: reqwest::Client::new(),
        }
    }

    /// Posts the call; a non-2xx answer is the call's failure.
    async fn post(
        &self,
        ctx: &CallContext,
        args: &Value,
    ) -> Result<reqwest::Response, HandlerError> {
        let url = &self.url;
        let resp = self
            .client
            .post(url)
            .header("x-skillmesh-caller", ctx.caller.to_string())
            .header("x-skillmesh-skill", ctx.skill.as_str())
            .header("x-skillmesh-call-id", ctx.call_id.to_string())
            .json(args)
            .send()
            .await
            .map_err(|e| HandlerError::new(format!("endpoint {url} unreachable: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = read_body(resp, MAX_ERROR_TEXT).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body).into_owned();
        Err(HandlerError::new(format!(
            "endpoint answered {status}: {text}"
        )))
    }
}

/// The body, at most `max` bytes (cut there: for error text).
async fn read_body(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, HandlerError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| HandlerError::new(e.to_string()))?
    {
        let room = max.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() > room {
            break;
        }
    }
    Ok(body)
}

impl SkillHandler for HttpHandler {
    fn call(&self, ctx: CallContext, args: Value) -> HandlerFuture {
        let this = self.clone();
        Box::pin(async move {
            let mut resp = this.post(&ctx, &args).await?;
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| HandlerError::new(e.to_string()))?
            {
                if body.len() + chunk.len() > MAX_OUTPUT_BYTES {
                    return Err(HandlerError::new(format!(
                        "endpoint answered over {MAX_OUTPUT_BYTES} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            serde_json::from_slice(&body)
                .map_err(|e| HandlerError::new(format!("the endpoint's answer is not JSON: {e}")))
        })
    }
}

impl StreamHandler for HttpHandler {
    fn call(&self, ctx: CallContext, args: Value) -> ChunkStream {
        let this = self.clone();
        task_stream(move |tx| async move {
            let resp = match this.post(&ctx, &args).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let sse = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.starts_with("text/event-stream"));
            let mut body = resp.bytes_stream();
            let mut sse_parser = SseParser::new(MAX_CHUNK_DATA_BYTES);
            let mut line = Vec::new();
            let parse = |text: &[u8]| {
                serde_json::from_slice(text).map(Chunk::Json).map_err(|e| {
                    HandlerError::new(format!(
                        "the endpoint streamed a value that is not JSON: {e}"
                    ))
                })
            };
            while let Some(bytes) = body.next().await {
                let bytes = match bytes {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx
                            .send(Err(HandlerError::new(format!(
                                "the endpoint's stream broke: {e}"
                            ))))
                            .await;
                        return;
                    }
                };
                let mut chunks = Vec::new();
                if sse {
                    match sse_parser.push(&bytes) {
                        Ok(records) => {
                            chunks.extend(records.into_iter().map(|r| parse(r.data.as_bytes())))
                        }
                        Err(e) => chunks.push(Err(HandlerError::new(e))),
                    }
                } else {
                    for b in bytes {
                        if b == b'\n' {
                            let l = std::mem::take(&mut line);
                            if !l.iter().all(u8::is_ascii_whitespace) {
                                chunks.push(parse(&l));
                            }
                        } else if line.len() >= MAX_CHUNK_DATA_BYTES {
                            chunks.push(Err(HandlerError::new(format!(
                                "a line over {MAX_CHUNK_DATA_BYTES} bytes"
                            ))));
                            break;
                        } else {
                            line.push(b);
                        }
                    }
                }
                for c in chunks {
                    let failed = c.is_err();
                    if tx.send(c).await.is_err() || failed {
                        return;
                    }
                }
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                let _ = tx.send(parse(&line)).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use axum::body::Body;
    use axum::response::Response;
    use libp2p::PeerId;
    use skillmesh_protocol::{CallId, SkillName};

    use super::*;

    fn ctx() -> CallContext {
        CallContext {
            caller: PeerId::random(),
            call_id: CallId([0; 16]),
            skill: SkillName::new("t").expect("name"),
            deadline: Instant::now() + Duration::from_secs(5),
            cancel: Default::default(),
        }
    }

    /// Serves `app` on loopback; returns its URL.
    async fn serve(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/")
    }

    fn body(content_type: &'static str, text: &'static str) -> Response {
        Response::builder()
            .header("content-type", content_type)
            .body(Body::from(text))
            .expect("response")
    }

    #[tokio::test]
    async fn an_endpoint_streams_ndjson_or_sse() {
        let app = axum::Router::new()
            .route(
                "/nd",
                axum::routing::post(|| async {
                    body("application/x-ndjson", "{\"a\":1}\n\n[2]\n\"three\"")
                }),
            )
            .route(
                "/sse",
                axum::routing::post(|| async {
                    body(
                        "text/event-stream",
                        "data: {\"a\":1}\n\n: keep-alive\n\nevent: x\ndata: [2]\n\n",
                    )
                }),
            )
            .route(
                "/bad",
                axum::routing::post(|| async { body("application/x-ndjson", "1\nnot json\n3\n") }),
            );
        let base = serve(app).await;
        let all = |path: &str| {
            let h = HttpHandler::new(format!("{base}{path}"));
            async move {
                StreamHandler::call(&h, ctx(), Value::Null)
                    .collect::<Vec<_>>()
                    .await
            }
        };
        let json = |c: &Result<Chunk, HandlerError>| match c {
            Ok(Chunk::Json(v)) => v.clone(),
            other => panic!("{other:?}"),
        };
        let nd = all("nd").await;
        assert_eq!(
            nd.iter().map(json).collect::<Vec<_>>(),
            vec![
                serde_json::json!({"a": 1}),
                serde_json::json!([2]),
                serde_json::json!("three")
            ]
        );
        let sse = all("sse").await;
        assert_eq!(
            sse.iter().map(json).collect::<Vec<_>>(),
            vec![serde_json::json!({"a": 1}), serde_json::json!([2])]
        );
        let bad = all("bad").await;
        assert_eq!(bad.len(), 2);
        assert!(bad[1].is_err());
        let missing = all("nowhere").await;
        assert!(
            missing[0]
                .as_ref()
                .expect_err("404")
                .message
                .contains("404")
        );
    }
}
