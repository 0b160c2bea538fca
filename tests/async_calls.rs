//! Async calls between real nodes on loopback: accepted at once, the result delivered later,
//! through the caller's mailbox when it is offline and exactly once when it returns; a callee
//! restart reports the call interrupted; a cancel stops it; mixed with the application's mail.

mod common;

use std::time::Duration;

use common::{NodeTestExt, config, eventually, relay_config, start, start_in};
use libp2p::Multiaddr;
use serde_json::{Value, json};
use skillmesh::config::Config;
use skillmesh::protocol::{ErrorCode, Mode, ShareMode, SkillSpec};
use skillmesh::store::{CallState, Direction};
use skillmesh::{CallContext, CallOptions, Error, HandlerError, Node};

fn agent_config(relay: &[Multiaddr]) -> Config {
    let mut c = config(relay);
    c.mail.mailboxes = relay.to_vec();
    c.mail.direct_timeout = Duration::from_millis(700);
    c.mail.fetch_interval = Duration::from_secs(1);
    c
}

fn async_spec(name: &str) -> SkillSpec {
    SkillSpec::builder(name, "1.0.0")
        .mode(Mode::Async)
        .share(ShareMode::Public)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("spec")
}

/// Sleeps `ms` from the arguments (or until cancelled), then answers `done`.
async fn slow(ctx: CallContext, args: Value) -> Result<Value, HandlerError> {
    let ms = args["ms"].as_u64().unwrap_or(0);
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(json!({"done": ms})),
        _ = ctx.cancel.cancelled() => Err(HandlerError::new("stopped")),
    }
}

async fn serve_slow(node: &Node) {
    node.register_skill(async_spec("slow"), slow)
        .await
        .expect("register");
}

async fn entry(
    node: &Node,
    id: skillmesh::protocol::CallId,
    dir: Direction,
) -> skillmesh::store::CallLogEntry {
    eventually(Duration::from_secs(10), || async {
        match node.store().call_entry(id, dir).await {
            Ok(Some(e)) if e.state.is_final() => Ok(e),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_reaches_a_caller_that_went_offline_exactly_once() {
    let relay = start(relay_config()).await;
    let relay_addrs = relay.listen_addrs().await.expect("addrs");
    let callee = start(agent_config(&relay_addrs)).await;
    serve_slow(&callee).await;
    let caller_dir = tempfile::tempdir().expect("dir");
    let caller = start_in(agent_config(&relay_addrs), caller_dir).await;
    caller.fetch_mail().await; // chooses its mailbox and republishes its card
    caller.find_served_by("slow", callee.peer_id()).await;

    // Online: accepted at once, the result comes over the connection.
    let started = std::time::Instant::now();
    let id = caller
        .call_async(
            callee.peer_id(),
            "slow",
            json!({"ms": 300}),
            CallOptions::default(),
        )
        .await
        .expect("accepted");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "answered before it ran"
    );
    let out = caller
        .wait_call(id, Duration::from_secs(10))
        .await
        .expect("result");
    assert_eq!(out, json!({"done": 300}));
    let e = entry(&caller, id, Direction::Outbound).await;
    let states: Vec<_> = e.history.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            CallState::Submitted,
            CallState::Working,
            CallState::Completed
        ]
    );
    assert_eq!(
        entry(&callee, id, Direction::Inbound).await.state,
        CallState::Completed
    );

    // Offline: the caller leaves while the call runs and comes back later.
    let id = caller
        .call_async(
            callee.peer_id(),
            "slow",
            json!({"ms": 1500}),
            CallOptions::default(),
        )
        .await
        .expect("accepted");
    let caller_id = caller.peer_id();
    let caller_dir = caller.stop().await;
    // The callee finishes, finds the caller gone, and leaves the result at its mailbox.
    eventually(Duration::from_secs(15), || async {
        match relay.store().mail_usage(caller_id).await {
            Ok((n, _)) if n >= 1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let caller = start_in(agent_config(&relay_addrs), caller_dir).await;
    let out = caller
        .wait_call(id, Duration::from_secs(15))
        .await
        .expect("result after return");
    assert_eq!(out, json!({"done": 1500}));
    let e = entry(&caller, id, Direction::Outbound).await;
    let finals = e.history.iter().filter(|t| t.state.is_final()).count();
    assert_eq!((e.state, finals), (CallState::Completed, 1), "once");
    // It was the node's, not the application's: the inbox stays empty.
    assert!(caller.try_next_message().await.expect("inbox").is_none());
    // Fetched and acked: nothing is left at the mailbox to arrive a second time.
    eventually(Duration::from_secs(10), || async {
        match relay.store().mail_usage(caller_id).await {
            Ok((0, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_restart_reports_interrupted_and_a_cancel_stops_the_call() {
    let relay = start(relay_config()).await;
    let relay_addrs = relay.listen_addrs().await.expect("addrs");
    let callee_dir = tempfile::tempdir().expect("dir");
    let callee = start_in(agent_config(&relay_addrs), callee_dir).await;
    serve_slow(&callee).await;
    let caller = start(agent_config(&relay_addrs)).await;
    caller.fetch_mail().await;
    let stranger = start(agent_config(&relay_addrs)).await;
    caller.find_served_by("slow", callee.peer_id()).await;

    // Cancelled by its caller, not by anyone else.
    let id = caller
        .call_async(
            callee.peer_id(),
            "slow",
            json!({"ms": 60_000}),
            CallOptions::default(),
        )
        .await
        .expect("accepted");
    match stranger.cancel_call_at(callee.peer_id(), id).await {
        Err(Error::Remote(e)) => assert_eq!(e.code, ErrorCode::AccessDenied),
        other => panic!("a stranger's cancel: {other:?}"),
    }
    caller.cancel_call(id).await.expect("cancelled");
    match caller.wait_call(id, Duration::from_secs(10)).await {
        Err(Error::Remote(e)) => assert_eq!(e.code, ErrorCode::Cancelled),
        other => panic!("a cancelled call: {other:?}"),
    }
    assert_eq!(
        entry(&caller, id, Direction::Outbound).await.state,
        CallState::Canceled
    );
    assert_eq!(
        entry(&callee, id, Direction::Inbound).await.state,
        CallState::Canceled
    );

    // The callee stops while a call runs, and comes back: the caller hears "interrupted".
    let id = caller
        .call_async(
            callee.peer_id(),
            "slow",
            json!({"ms": 60_000}),
            CallOptions::default(),
        )
        .await
        .expect("accepted");
    let callee_dir = callee.stop().await;
    let callee = start_in(agent_config(&relay_addrs), callee_dir).await;
    match caller.wait_call(id, Duration::from_secs(20)).await {
        Err(Error::Remote(e)) => assert_eq!(e.code, ErrorCode::Interrupted),
        other => panic!("an interrupted call: {other:?}"),
    }
    let e = entry(&callee, id, Direction::Inbound).await;
    assert_eq!(
        (e.state, e.error),
        (CallState::Failed, Some(ErrorCode::Interrupted))
    );
    assert_eq!(
        entry(&caller, id, Direction::Outbound).await.state,
        CallState::Failed
    );
    // Still serving: a new call completes.
    serve_slow(&callee).await;
    let id = caller
        .call_async(
            callee.peer_id(),
            "slow",
            json!({"ms": 10}),
            CallOptions::default(),
        )
        .await
        .expect("accepted");
    assert_eq!(
        caller
            .wait_call(id, Duration::from_secs(10))
            .await
            .expect("result"),
        json!({"done": 10})
    );
    // A result faster than the call log's writer still ends the call's entry.
    assert_eq!(
        entry(&caller, id, Direction::Outbound).await.state,
        CallState::Completed
    );
}
