//! The CLI's client of a running node's control API.

use serde::de::DeserializeOwned;
use serde_json::Value;
use skillmesh::control::{API_ADDR_FILE, API_TOKEN_FILE};

use super::{
    CliError, Context, EXIT_FAILED_CALL, EXIT_FAILURE, EXIT_NO_DAEMON, EXIT_NOT_FOUND, EXIT_USAGE,
};

pub(crate) struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
    data_dir: std::path::PathBuf,
}

impl Api {
    /// Finds the running node of this data dir.
    pub(crate) fn connect(ctx: &Context) -> Result<Api, CliError> {
        let read = |f: &str| std::fs::read_to_string(ctx.data_dir.join(f)).ok();
        let (Some(addr), Some(token)) = (read(API_ADDR_FILE), read(API_TOKEN_FILE)) else {
            return Err(no_daemon(&ctx.data_dir));
        };
        Ok(Api {
            base: format!("http://{}", addr.trim()),
            token: token.trim().to_owned(),
            http: reqwest::Client::new(),
            data_dir: ctx.data_dir.clone(),
        })
    }

    /// Whether a node answers at the recorded address.
    pub(crate) async fn ping(&self) -> bool {
        self.request(reqwest::Method::GET, "/v1/status")
            .send()
            .await
            .is_ok()
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Sends a request and decodes the JSON answer, or turns the API's error into a CLI error.
    pub(crate) async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, CliError> {
        let resp = self.send_raw(req).await?;
        resp.json()
            .await
            .map_err(|e| CliError::failure(format!("unreadable answer from the node: {e}")))
    }

    pub(crate) async fn send_raw(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CliError> {
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                no_daemon(&self.data_dir)
            } else {
                CliError::failure(format!("the node did not answer: {e}"))
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let body: Value = resp.json().await.unwrap_or_default();
        Err(api_error(&body))
    }
}

/// The CLI error for the API's `{"error": {"kind", "code", "message"}}`.
pub(crate) fn api_error(body: &Value) -> CliError {
    let err = &body["error"];
    let kind = err["kind"].as_str().unwrap_or("internal");
    let message = err["message"].as_str().unwrap_or("no message").to_owned();
    let code = match kind {
        "not_found" | "unreachable" | "timeout" => EXIT_NOT_FOUND,
        "remote" => EXIT_FAILED_CALL,
        "invalid" => EXIT_USAGE,
        _ => EXIT_FAILURE,
    };
    let text = match err["code"].as_str() {
        Some(c) => format!("{c}: {message}"),
        None => message,
    };
    CliError {
        message: text,
        code,
    }
}

fn no_daemon(data_dir: &std::path::Path) -> CliError {
    CliError {
        message: format!(
            "no skillmesh node is running with data dir {}; start one with: skillmesh run",
            data_dir.display()
        ),
        code: EXIT_NO_DAEMON,
    }
}
