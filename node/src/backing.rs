//! Skills a daemon serves without Rust code: declared in the config file (`[[skills]]`) or
//! added through the local API, and backed by a command or a local HTTP endpoint.
//!
//! A *command* gets the arguments as JSON on stdin and prints the result as JSON on stdout; a
//! non-zero exit fails the call with stderr as the message, and the process is killed when the
//! skill's timeout passes. An *HTTP endpoint* gets the arguments as the JSON body of a POST and
//! answers with the result as JSON; any status but 2xx fails the call.

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use skillmesh_protocol::{MAX_OUTPUT_BYTES, Mode, ShareMode, SkillSpec, ValidationError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::skills::{CallContext, HandlerError, HandlerFuture, SkillHandler};

/// Bytes of stderr or of an error body passed on to the caller.
const MAX_ERROR_TEXT: usize = 1024;

/// A skill as declared in config or through the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkillDecl {
    /// The skill's name.
    pub name: String,
    /// Its semver version.
    pub version: String,
    /// A description.
    #[serde(default)]
    pub description: String,
    /// Sync only, for now.
    #[serde(default)]
    pub mode: Mode,
    /// Who may call it.
    #[serde(default = "public")]
    pub share: ShareMode,
    /// Discovery tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// JSON Schema of the arguments.
    #[serde(default)]
    pub input_schema: Option<Value>,
    /// JSON Schema of the output.
    #[serde(default)]
    pub output_schema: Option<Value>,
    /// Handler deadline (default 30s).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Largest arguments accepted, in bytes.
    #[serde(default)]
    pub max_arg_bytes: Option<u32>,
    /// Calls at once.
    #[serde(default)]
    pub max_concurrency: Option<u16>,
    /// Run this command (program and arguments) per call.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// POST each call to this local `http://` URL.
    #[serde(default)]
    pub http: Option<String>,
}

fn public() -> ShareMode {
    ShareMode::Public
}

/// What serves a declared skill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Program and arguments.
    Command(Vec<String>),
    /// A local HTTP endpoint.
    Http(String),
}

impl SkillDecl {
    /// The spec and backing, or the first bad field (named relative to this declaration).
    pub fn resolve(&self) -> Result<(SkillSpec, Backing), ValidationError> {
        let mut b = SkillSpec::builder(self.name.clone(), self.version.clone())
            .description(self.description.clone())
            .mode(self.mode)
            .share(self.share);
        for t in &self.tags {
            b = b.tag(t.clone());
        }
        if let Some(s) = &self.input_schema {
            b = b.input_schema(s.clone());
        }
        if let Some(s) = &self.output_schema {
            b = b.output_schema(s.clone());
        }
        if let Some(t) = self.timeout {
            b = b.timeout(t);
        }
        if let Some(n) = self.max_arg_bytes {
            b = b.max_arg_bytes(n);
        }
        if let Some(n) = self.max_concurrency {
            b = b.max_concurrency(n);
        }
        let spec = b.build()?;
        let backing = match (&self.command, &self.http) {
            (Some(argv), None) if !argv.is_empty() && !argv[0].is_empty() => {
                Backing::Command(argv.clone())
            }
            (Some(_), None) => {
                return Err(ValidationError::new("command", "needs a program to run"));
            }
            (None, Some(url)) if url.starts_with("http://") => Backing::Http(url.clone()),
            (None, Some(url)) => {
                return Err(ValidationError::new(
                    "http",
                    format!("{url:?}: only local http:// endpoints are supported"),
                ));
            }
            _ => {
                return Err(ValidationError::new(
                    "command",
                    "set exactly one of `command` or `http`",
                ));
            }
        };
        Ok((spec, backing))
    }
}

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
}

impl SkillHandler for CommandHandler {
    fn call(&self, ctx: CallContext, args: Value) -> HandlerFuture {
        let argv = self.argv.clone();
        Box::pin(async move {
            let mut child = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .env("SKILLMESH_CALLER", ctx.caller.to_string())
                .env("SKILLMESH_SKILL", ctx.skill.as_str())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // The call's deadline drops this future; the process must not outlive it.
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| HandlerError::new(format!("cannot start {}: {e}", argv[0])))?;
            let input = serde_json::to_vec(&args).unwrap_or_default();
            let mut stdin = child.stdin.take().ok_or("no stdin")?;
            let mut stdout = child.stdout.take().ok_or("no stdout")?;
            let mut stderr = child.stderr.take().ok_or("no stderr")?;
            let write = async move {
                // A command may exit without reading its input; that is its business.
                let _ = stdin.write_all(&input).await;
                drop(stdin);
            };
            let read_out = read_capped(&mut stdout, MAX_OUTPUT_BYTES);
            let read_err = read_capped(&mut stderr, MAX_ERROR_TEXT);
            let ((), out, err) = tokio::join!(write, read_out, read_err);
            let status = child
                .wait()
                .await
                .map_err(|e| HandlerError::new(format!("wait failed: {e}")))?;
            let (out, err) = (out?, err?);
            if !status.success() {
                let text = String::from_utf8_lossy(&err).trim().to_owned();
                let text = if text.is_empty() {
                    format!("exited with {status}")
                } else {
                    text
                };
                return Err(HandlerError::new(text));
            }
            serde_json::from_slice(&out)
                .map_err(|e| HandlerError::new(format!("the command's output is not JSON: {e}")))
        })
    }
}

/// Reads at most `cap` bytes; more is an error rather than a silent cut.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    cap: usize,
) -> Result<Vec<u8>, HandlerError> {
    let mut buf = Vec::new();
    let n = r
        .take(cap as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| HandlerError::new(format!("read failed: {e}")))?;
    if n > cap {
        return Err(HandlerError::new(format!(
            "more than {cap} bytes of output"
        )));
    }
    Ok(buf)
}

/// POSTs each call to a local HTTP endpoint.
#[cfg(feature = "daemon")]
#[derive(Clone, Debug)]
pub struct HttpHandler {
    url: String,
    client: reqwest::Client,
}

#[cfg(feature = "daemon")]
impl HttpHandler {
    /// A handler posting to `url`.
    pub fn new(url: String) -> Self {
        HttpHandler {
            url,
            client: reqwest::Client::new(),
        }
    }
}

#[cfg(feature = "daemon")]
impl SkillHandler for HttpHandler {
    fn call(&self, ctx: CallContext, args: Value) -> HandlerFuture {
        let (url, client) = (self.url.clone(), self.client.clone());
        Box::pin(async move {
            let mut resp = client
                .post(&url)
                .header("x-skillmesh-caller", ctx.caller.to_string())
                .header("x-skillmesh-skill", ctx.skill.as_str())
                .json(&args)
                .send()
                .await
                .map_err(|e| HandlerError::new(format!("endpoint {url} unreachable: {e}")))?;
            let status = resp.status();
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
            if !status.is_success() {
                let mut text = String::from_utf8_lossy(&body).into_owned();
                text.truncate(MAX_ERROR_TEXT);
                return Err(HandlerError::new(format!(
                    "endpoint answered {status}: {text}"
                )));
            }
            serde_json::from_slice(&body)
                .map_err(|e| HandlerError::new(format!("the endpoint's answer is not JSON: {e}")))
        })
    }
}

#[cfg(feature = "daemon")]
impl Backing {
    /// The handler serving this backing.
    pub fn handler(&self) -> std::sync::Arc<dyn SkillHandler> {
        match self {
            Backing::Command(argv) => std::sync::Arc::new(CommandHandler::new(argv.clone())),
            Backing::Http(url) => std::sync::Arc::new(HttpHandler::new(url.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;
    use skillmesh_protocol::{CallId, SkillName};

    fn ctx() -> CallContext {
        CallContext {
            caller: PeerId::random(),
            call_id: CallId([0; 16]),
            skill: SkillName::new("t").expect("name"),
            deadline: std::time::Instant::now() + Duration::from_secs(5),
            cancel: Default::default(),
        }
    }

    fn sh(script: &str) -> CommandHandler {
        CommandHandler::new(vec!["sh".into(), "-c".into(), script.into()])
    }

    #[tokio::test]
    async fn a_command_gets_json_on_stdin_and_answers_on_stdout() {
        let out = sh("cat")
            .call(ctx(), serde_json::json!({"a": [1, 2]}))
            .await
            .expect("ok");
        assert_eq!(out, serde_json::json!({"a": [1, 2]}));
    }

    #[tokio::test]
    async fn a_failing_command_fails_the_call_with_its_stderr() {
        let err = sh("echo 'no such city' >&2; exit 3")
            .call(ctx(), Value::Null)
            .await
            .expect_err("fails");
        assert_eq!(err.message, "no such city");
        let err = sh("echo not json")
            .call(ctx(), Value::Null)
            .await
            .expect_err("fails");
        assert!(err.message.contains("not JSON"), "{}", err.message);
        let err = CommandHandler::new(vec!["/no/such/program".into()])
            .call(ctx(), Value::Null)
            .await
            .expect_err("fails");
        assert!(err.message.contains("cannot start"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_command_is_killed_when_the_call_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("still-running");
        let script = format!("sleep 2; touch {}", marker.display());
        let call = sh(&script).call(ctx(), Value::Null);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), call)
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "the command outlived its call");
    }

    #[test]
    fn declarations_name_their_bad_field() {
        let base = SkillDecl {
            name: "upper".into(),
            version: "1.0.0".into(),
            description: String::new(),
            mode: Mode::Sync,
            share: ShareMode::Public,
            tags: vec![],
            input_schema: None,
            output_schema: None,
            timeout: None,
            max_arg_bytes: None,
            max_concurrency: None,
            command: Some(vec!["cat".into()]),
            http: None,
        };
        assert!(base.resolve().is_ok());
        let both = SkillDecl {
            http: Some("http://127.0.0.1:1/".into()),
            ..base.clone()
        };
        assert_eq!(both.resolve().expect_err("both").field, "command");
        let https = SkillDecl {
            command: None,
            http: Some("https://example.com/".into()),
            ..base.clone()
        };
        assert_eq!(https.resolve().expect_err("https").field, "http");
        let bad = SkillDecl {
            version: "v1".into(),
            ..base
        };
        assert_eq!(bad.resolve().expect_err("version").field, "version");
    }
}
