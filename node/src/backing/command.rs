//! Command backings: a process per call, arguments as JSON on stdin; the result on stdout, as
//! one JSON value, or for stream skills one JSON value per line.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use skillmesh_protocol::{MAX_CHUNK_DATA_BYTES, MAX_OUTPUT_BYTES};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout};

use super::{MAX_ERROR_TEXT, read_capped};
use crate::skills::{
    CallContext, Chunk, ChunkStream, HandlerError, HandlerFuture, SkillHandler, StreamHandler,
    task_stream,
};

/// How long a cancelled command has between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Runs a command per call.
#[derive(Clone, Debug)]
pub struct CommandHandler {
    argv: Vec<String>,
}

impl CommandHandler {
    /// A handler running `argv`.
    pub fn new(argv: Vec<String>) -> Self {
        CommandHandler { argv }
    }

    /// Starts the process for one call and hands it its arguments.
    fn start(&self, ctx: &CallContext, args: &Value) -> Result<Started, HandlerError> {
        let argv = &self.argv;
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("SKILLMESH_CALLER", ctx.caller.to_string())
            .env("SKILLMESH_SKILL", ctx.skill.as_str())
            .env("SKILLMESH_CALL_ID", ctx.call_id.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| HandlerError::new(format!("cannot start {}: {e}", argv[0])))?;
        let input = serde_json::to_vec(args).unwrap_or_default();
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        tokio::spawn(async move {
            // A command may exit without reading its input; that is its business.
            let _ = stdin.write_all(&input).await;
        });
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        Ok(Started {
            process: Process(Some(child)),
            stdout,
            stderr,
        })
    }
}

struct Started {
    process: Process,
    stdout: ChildStdout,
    stderr: ChildStderr,
}

/// A call's process. Dropped before it exited (the call was cancelled or timed out), it gets
/// SIGTERM, then SIGKILL after [`KILL_GRACE`].
struct Process(Option<Child>);

impl Process {
    /// Waits for the exit; `Err` with the stderr text (or the status) unless it succeeded.
    async fn finish(&mut self, stderr: Vec<u8>) -> Result<(), HandlerError> {
        let Some(child) = self.0.as_mut() else {
            return Ok(());
        };
        let status = child
            .wait()
            .await
            .map_err(|e| HandlerError::new(format!("wait failed: {e}")))?;
        self.0 = None;
        if status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&stderr).trim().to_owned();
        Err(HandlerError::new(if text.is_empty() {
            format!("exited with {status}")
        } else {
            text
        }))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        terminate(&child);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if tokio::time::timeout(KILL_GRACE, child.wait())
                        .await
                        .is_err()
                    {
                        let _ = child.kill().await;
                    }
                });
            }
            Err(_) => {
                let _ = child.start_kill();
            }
        }
    }
}

/// Asks a process to stop (SIGTERM).
#[cfg(target_os = "linux")]
fn terminate(child: &Child) {
    if let Some(pid) = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Elsewhere the grace period ends at once: SIGKILL follows.
#[cfg(not(target_os = "linux"))]
fn terminate(_child: &Child) {}

impl SkillHandler for CommandHandler {
    fn call(&self, ctx: CallContext, args: Value) -> HandlerFuture {
        let started = self.start(&ctx, &args);
        Box::pin(async move {
            let Started {
                mut process,
                mut stdout,
                mut stderr,
            } = started?;
            let read_out = read_capped(&mut stdout, MAX_OUTPUT_BYTES);
            let read_err = read_capped(&mut stderr, MAX_ERROR_TEXT);
            let (out, err) = tokio::join!(read_out, read_err);
            process.finish(err?).await?;
            serde_json::from_slice(&out?)
                .map_err(|e| HandlerError::new(format!("the command's output is not JSON: {e}")))
        })
    }
}

impl StreamHandler for CommandHandler {
    fn call(&self, ctx: CallContext, args: Value) -> ChunkStream {
        let started = self.start(&ctx, &args);
        task_stream(move |tx| async move {
            let Started {
                mut process,
                stdout,
                mut stderr,
            } = match started {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let err = tokio::spawn(async move { read_capped(&mut stderr, MAX_ERROR_TEXT).await });
            let mut lines = BufReader::new(stdout);
            let mut n = 0u64;
            loop {
                let line = match read_line(&mut lines, MAX_CHUNK_DATA_BYTES).await {
                    Ok(Some(l)) => l,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                n += 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let chunk = serde_json::from_slice(&line).map(Chunk::Json).map_err(|e| {
                    HandlerError::new(format!("line {n} of the command's output is not JSON: {e}"))
                });
                let failed = chunk.is_err();
                // The caller is gone: dropping the process stops it.
                if tx.send(chunk).await.is_err() || failed {
                    return;
                }
            }
            let stderr = err.await.ok().and_then(Result::ok).unwrap_or_default();
            if let Err(e) = process.finish(stderr).await {
                let _ = tx.send(Err(e)).await;
            }
        })
    }
}

/// One line without its newline; `None` at the end. A line over `max` bytes is an error.
async fn read_line<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    max: usize,
) -> Result<Option<Vec<u8>>, HandlerError> {
    let mut line = Vec::new();
    let n = r
        .take(max as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| HandlerError::new(format!("read failed: {e}")))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Err(HandlerError::new(format!(
            "a line of output over {max} bytes"
        )));
    }
    Ok(Some(line))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use futures::StreamExt;
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

    fn sh(script: &str) -> CommandHandler {
        CommandHandler::new(vec!["sh".into(), "-c".into(), script.into()])
    }

    #[tokio::test]
    async fn a_command_gets_json_on_stdin_and_answers_on_stdout() {
        let out = SkillHandler::call(&sh("cat"), ctx(), serde_json::json!({"a": [1, 2]}))
            .await
            .expect("ok");
        assert_eq!(out, serde_json::json!({"a": [1, 2]}));
    }

    #[tokio::test]
    async fn a_failing_command_fails_the_call_with_its_stderr() {
        let err = SkillHandler::call(&sh("echo 'no such city' >&2; exit 3"), ctx(), Value::Null)
            .await
            .expect_err("fails");
        assert_eq!(err.message, "no such city");
        let err = SkillHandler::call(&sh("echo not json"), ctx(), Value::Null)
            .await
            .expect_err("fails");
        assert!(err.message.contains("not JSON"), "{}", err.message);
        let err = SkillHandler::call(
            &CommandHandler::new(vec!["/no/such/program".into()]),
            ctx(),
            Value::Null,
        )
        .await
        .expect_err("fails");
        assert!(err.message.contains("cannot start"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_command_streams_one_chunk_per_line() {
        let chunks: Vec<_> = StreamHandler::call(
            &sh("read -r a; echo \"$a\"; echo '{\"n\": 2}'; echo; echo '\"end\"'"),
            ctx(),
            serde_json::json!({"n": 1}),
        )
        .collect()
        .await;
        let values: Vec<Value> = chunks
            .into_iter()
            .map(|c| match c.expect("chunk") {
                Chunk::Json(v) => v,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            values,
            vec![
                serde_json::json!({"n": 1}),
                serde_json::json!({"n": 2}),
                serde_json::json!("end")
            ]
        );
        let failed: Vec<_> =
            StreamHandler::call(&sh("echo 1; echo oops >&2; exit 4"), ctx(), Value::Null)
                .collect()
                .await;
        assert_eq!(failed.len(), 2);
        assert_eq!(failed[1].as_ref().expect_err("fails").message, "oops");
        let bad: Vec<_> = StreamHandler::call(&sh("echo 1; echo nope; echo 3"), ctx(), Value::Null)
            .collect()
            .await;
        assert!(
            bad[1]
                .as_ref()
                .expect_err("not JSON")
                .message
                .contains("line 2")
        );
        assert_eq!(bad.len(), 2, "the stream ends at the bad line");
    }

    /// Waits for `path` to hold a pid, then for that process to be gone; returns how long the
    /// wait for it to go took.
    async fn gone_after(path: &std::path::Path) -> Duration {
        let pid = loop {
            if let Ok(s) = std::fs::read_to_string(path)
                && let Ok(pid) = s.trim().parse::<u32>()
            {
                break pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let start = Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && start.elapsed() < KILL_GRACE * 3
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_cancelled_command_gets_sigterm_then_sigkill() {
        let dir = tempfile::tempdir().expect("tempdir");
        // One that stops on SIGTERM: gone at once.
        let pidfile = dir.path().join("polite");
        let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
        let mut s = StreamHandler::call(&sh(&script), ctx(), Value::Null);
        let _ = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
        drop(s);
        assert!(
            gone_after(&pidfile).await < Duration::from_secs(2),
            "SIGTERM"
        );
        // One that ignores SIGTERM: gone after the grace period, by SIGKILL.
        let pidfile = dir.path().join("stubborn");
        let script = format!(
            "trap '' TERM; echo $$ > {}; while :; do sleep 0.05; done",
            pidfile.display()
        );
        let call = SkillHandler::call(&sh(&script), ctx(), Value::Null);
        let _ = tokio::time::timeout(Duration::from_millis(300), call).await;
        let took = gone_after(&pidfile).await;
        assert!(
            took >= KILL_GRACE - Duration::from_secs(1) && took < KILL_GRACE * 2,
            "SIGKILL after the grace period, not {took:?}"
        );
    }
}
