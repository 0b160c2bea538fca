//! Streamed calls and cancellation between real nodes over loopback: chunks in order with a
//! receipt that verifies, a slow reader holding the handler back, cancelling by dropping the
//! stream or a sync call's future, and a cancel from anyone but the caller refused.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{NodeTestExt, eventually, mesh};
use futures::StreamExt;
use serde_json::{Value, json};
use skillmesh::protocol::{ErrorCode, Mode, ShareMode, SkillSpec};
use skillmesh::store::{CallState, Direction};
use skillmesh::{CallContext, Chunk, Error, HandlerError, Node, StreamOptions};

fn stream_spec(name: &str) -> SkillSpec {
    SkillSpec::builder(name, "1.0.0")
        .mode(Mode::Stream)
        .share(ShareMode::Public)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("spec")
}

/// Sets its flag when dropped: the handler's stream was let go.
struct Stopped(Arc<AtomicBool>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The log entry of `node` for its newest call on `direction`'s side, once it is final.
async fn final_entry(node: &Node, direction: Direction) -> skillmesh::store::CallLogEntry {
    eventually(Duration::from_secs(10), || async {
        let log = node.recent_calls(20).await.map_err(|e| e.to_string())?;
        log.into_iter()
            .find(|e| e.direction == direction && e.mode == Mode::Stream && e.state.is_final())
            .ok_or("no final stream entry yet".to_owned())
    })
    .await
}

#[tokio::test]
async fn chunks_arrive_in_order_with_a_receipt_that_verifies() {
    let nodes = mesh(2, |_| {}).await;
    let (caller, callee) = (&nodes[1], &nodes[2]);
    callee
        .register_stream(stream_spec("count"), |_ctx: CallContext, args: Value| {
            let n = args["n"].as_u64().unwrap_or(0);
            futures::stream::iter(
                (0..n).map(|i| Ok::<_, HandlerError>(Chunk::Json(json!({"i": i})))),
            )
        })
        .await
        .expect("register");
    caller.find_served_by("count", callee.peer_id()).await;

    let mut stream = caller
        .call_stream_with(
            callee.peer_id(),
            "count",
            json!({"n": 200}),
            StreamOptions {
                keep_transcript: true,
                ..Default::default()
            },
        )
        .await
        .expect("stream starts");
    let mut got = Vec::new();
    while let Some(c) = stream.next().await {
        match c.expect("chunk") {
            Chunk::Json(v) => got.push(v["i"].as_u64().expect("i")),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, (0..200).collect::<Vec<_>>(), "all, in order");
    let receipt = stream.receipt().expect("a receipt after the end");
    assert_eq!(receipt.count, 200);
    receipt.verify().expect("the transcript verifies");
    let mut forged = receipt.clone();
    if let Some(chunks) = &mut forged.chunks {
        let n = chunks[7].len();
        chunks[7][n - 12] ^= 1;
    }
    assert!(
        forged.verify().is_err(),
        "a changed chunk breaks the receipt"
    );

    // A stream to ourselves goes through the same checks, without the network.
    let mine: Vec<_> = callee
        .call_stream(callee.peer_id(), "count", json!({"n": 3}))
        .await
        .expect("local stream")
        .collect()
        .await;
    assert_eq!(mine.len(), 3);

    // Calling it as sync is refused with its code; both logs tell the lifecycle.
    let wrong = caller.call(callee.peer_id(), "count", json!({})).await;
    assert!(matches!(wrong, Err(Error::Remote(e)) if e.code == ErrorCode::UnsupportedMode));
    for (node, dir) in [(caller, Direction::Outbound), (callee, Direction::Inbound)] {
        let e = final_entry(node, dir).await;
        assert_eq!(e.state, CallState::Completed);
        let states: Vec<_> = e.history.iter().map(|t| t.state).collect();
        assert_eq!(
            states,
            [
                CallState::Submitted,
                CallState::Working,
                CallState::Completed
            ]
        );
    }
}

#[tokio::test]
async fn a_slow_reader_holds_the_handler_back_through_100_mib() {
    const PIECE: usize = 64 * 1024;
    const TOTAL: u64 = 100 * 1024 * 1024;
    let nodes = mesh(2, |_| {}).await;
    let (caller, callee) = (&nodes[1], &nodes[2]);
    let produced = Arc::new(AtomicU64::new(0));
    let p = produced.clone();
    callee
        .register_stream(
            stream_spec("bytes"),
            move |_ctx: CallContext, _args: Value| {
                let p = p.clone();
                futures::stream::unfold(0u64, move |sent| {
                    let p = p.clone();
                    async move {
                        if sent >= TOTAL {
                            return None;
                        }
                        p.fetch_add(1, Ordering::SeqCst);
                        Some((
                            Ok::<_, HandlerError>(Chunk::Bytes(vec![
                                (sent / PIECE as u64) as u8;
                                PIECE
                            ])),
                            sent + PIECE as u64,
                        ))
                    }
                })
            },
        )
        .await
        .expect("register");
    caller.find_served_by("bytes", callee.peer_id()).await;
    let mut stream = caller
        .call_stream(callee.peer_id(), "bytes", json!({}))
        .await
        .expect("stream starts");
    let mut read = 0u64;
    let mut pieces = 0u64;
    // Read ten pieces, then stop reading: the handler must stop soon after.
    while pieces < 10 {
        let Chunk::Bytes(b) = stream.next().await.expect("more").expect("chunk") else {
            panic!("bytes expected");
        };
        read += b.len() as u64;
        pieces += 1;
    }
    let mut last = u64::MAX;
    let settled = eventually(Duration::from_secs(10), || {
        let now = produced.load(Ordering::SeqCst);
        let was = std::mem::replace(&mut last, now);
        async move { if now == was { Ok(now) } else { Err(now) } }
    })
    .await;
    // The window (16), one chunk in the callee's hands and a few in the caller's channels.
    assert!(
        settled - pieces <= 24,
        "the handler ran {} pieces ahead of a reader that stopped",
        settled - pieces
    );
    while let Some(c) = stream.next().await {
        let Chunk::Bytes(b) = c.expect("chunk") else {
            panic!("bytes expected");
        };
        assert_eq!(b[0], (read / PIECE as u64) as u8, "in order");
        read += b.len() as u64;
    }
    assert_eq!(read, TOTAL);
}

#[tokio::test]
async fn dropping_a_stream_or_a_call_cancels_it_and_only_the_caller_may_cancel() {
    let nodes = mesh(3, |_| {}).await;
    let (caller, callee, stranger) = (&nodes[1], &nodes[2], &nodes[3]);
    let stopped = Arc::new(AtomicBool::new(false));
    let s = stopped.clone();
    callee
        .register_stream(
            stream_spec("forever"),
            move |_ctx: CallContext, _args: Value| {
                let guard = Stopped(s.clone());
                futures::stream::unfold(0u64, move |i| {
                    let _keep = &guard;
                    async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Some((Ok::<_, HandlerError>(Chunk::Json(json!(i))), i + 1))
                    }
                })
            },
        )
        .await
        .expect("register");
    let sync_stopped = Arc::new(AtomicBool::new(false));
    let s = sync_stopped.clone();
    let slow = SkillSpec::builder("slow", "1.0.0")
        .share(ShareMode::Public)
        .build()
        .expect("spec");
    callee
        .register_skill(slow, move |ctx: CallContext, _args: Value| {
            let s = s.clone();
            async move {
                let _guard = Stopped(s);
                ctx.cancel.cancelled().await;
                Err::<Value, _>(HandlerError::new("stopped"))
            }
        })
        .await
        .expect("register");
    caller.find_served_by("forever", callee.peer_id()).await;

    let mut stream = caller
        .call_stream(callee.peer_id(), "forever", json!({}))
        .await
        .expect("stream starts");
    let id = stream.call_id();
    for _ in 0..3 {
        stream.next().await.expect("more").expect("chunk");
    }
    // Someone else cannot stop it.
    match stranger.cancel_call_at(callee.peer_id(), id).await {
        Err(Error::Remote(e)) => assert_eq!(e.code, ErrorCode::AccessDenied),
        other => panic!("a stranger's cancel: {other:?}"),
    }
    assert!(stream.next().await.expect("still running").is_ok());
    // Nor flood the callee with cancels: they count against its call rate (200 at once).
    let mut limited = 0;
    for _ in 0..300 {
        if let Err(Error::Remote(e)) = stranger.cancel_call_at(callee.peer_id(), id).await
            && e.code == ErrorCode::RateLimited
        {
            limited += 1;
        }
    }
    assert!(
        limited > 0,
        "300 cancels at once, none refused for their rate"
    );
    assert!(stream.next().await.expect("still running").is_ok());
    drop(stream);
    eventually(Duration::from_secs(5), || async {
        stopped
            .load(Ordering::SeqCst)
            .then_some(())
            .ok_or("handler still running")
    })
    .await;
    for (node, dir) in [(caller, Direction::Outbound), (callee, Direction::Inbound)] {
        let e = final_entry(node, dir).await;
        assert_eq!(e.state, CallState::Canceled, "{dir:?}");
        assert_eq!(e.error, Some(ErrorCode::Cancelled));
    }

    // A sync call whose future is dropped is cancelled on the callee too.
    let call = caller.call(callee.peer_id(), "slow", json!({}));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), call)
            .await
            .is_err()
    );
    eventually(Duration::from_secs(5), || async {
        sync_stopped
            .load(Ordering::SeqCst)
            .then_some(())
            .ok_or("sync handler still running")
    })
    .await;
    // And the explicit way, for a stream.
    let stream = caller
        .call_stream(callee.peer_id(), "forever", json!({}))
        .await
        .expect("stream starts");
    caller
        .cancel_call(stream.call_id())
        .await
        .expect("cancelled");
    let rest: Vec<_> = stream.collect().await;
    assert!(
        matches!(rest.last(), Some(Err(Error::Remote(e))) if e.code == ErrorCode::Cancelled),
        "the stream ends cancelled"
    );
}
