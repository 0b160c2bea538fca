//! Skills a daemon serves without Rust code: declared in the config file (`[[skills]]`) or
//! added through the local API, and backed by a command or a local HTTP endpoint.
//!
//! A *command* gets the arguments as JSON on stdin and prints the result as JSON on stdout (a
//! stream skill: one JSON value per line, each a chunk as it is printed); a non-zero exit fails
//! the call with stderr as the message. When the call is cancelled or runs out of time the
//! process gets SIGTERM, and SIGKILL [`KILL_GRACE`] later if it is still there.
//!
//! An *HTTP endpoint* gets the arguments as the JSON body of a POST and answers with the result
//! as JSON (a stream skill: an NDJSON or Server-Sent Events body, one chunk per line or event);
//! any status but 2xx fails the call. A cancelled call aborts the request.

mod command;
#[cfg(feature = "daemon")]
mod http;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use skillmesh_protocol::{Mode, ShareMode, SkillSpec, ValidationError};
use tokio::io::AsyncReadExt;

pub use command::{CommandHandler, KILL_GRACE};
#[cfg(feature = "daemon")]
pub use http::HttpHandler;

#[cfg(feature = "daemon")]
use crate::skills::Handler;
use crate::skills::HandlerError;

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
    /// `sync` (default), `stream` or `async`.
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

impl Backing {
    /// The handler serving this backing in `mode`.
    #[cfg(feature = "daemon")]
    pub fn handler(&self, mode: Mode) -> Handler {
        use std::sync::Arc;
        match (self, mode) {
            (Backing::Command(argv), Mode::Stream) => {
                Handler::Stream(Arc::new(CommandHandler::new(argv.clone())))
            }
            (Backing::Command(argv), _) => {
                Handler::Unary(Arc::new(CommandHandler::new(argv.clone())))
            }
            (Backing::Http(url), Mode::Stream) => {
                Handler::Stream(Arc::new(HttpHandler::new(url.clone())))
            }
            (Backing::Http(url), _) => Handler::Unary(Arc::new(HttpHandler::new(url.clone()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let stream = SkillDecl {
            mode: Mode::Stream,
            ..base.clone()
        };
        assert_eq!(stream.resolve().expect("stream").0.mode, Mode::Stream);
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
