//! Talking to a running node over HTTP.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;

/// Where the node is and how to authenticate.
#[derive(Args, Clone, Debug)]
pub(crate) struct NodeArgs {
    /// The node's URL.
    #[arg(long, default_value = "http://127.0.0.1:7600", env = "CUSTOS_URL")]
    pub(crate) url: String,
    /// Bearer token (admin for changes).
    #[arg(long, env = "CUSTOS_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// The node's data directory, on the same host: its owner-only admin.token is used.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
}

impl NodeArgs {
    pub(crate) fn token(&self) -> anyhow::Result<String> {
        if let Some(token) = &self.token {
            return Ok(token.trim().to_owned());
        }
        if let Some(data) = &self.data {
            let path = custos_http::auth::admin_token_path(data);
            let token = fs_err::read_to_string(&path)
                .with_context(|| format!("reading the admin token file next to the store (`{}`)", path.display()))?;
            return Ok(token.trim().to_owned());
        }
        bail!("no token: pass --token, set CUSTOS_TOKEN, or pass --data DIR on the node's host")
    }
}

/// A small JSON client.
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub(crate) fn new(base: &str, token: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    pub(crate) fn from_args(args: &NodeArgs) -> anyhow::Result<Self> {
        Ok(Self::new(&args.url, Some(args.token()?)))
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    async fn finish(&self, path: &str, builder: reqwest::RequestBuilder) -> anyhow::Result<serde_json::Value> {
        let bytes = self.finish_bytes(path, builder).await?;
        serde_json::from_slice(&bytes).with_context(|| format!("{path} did not answer JSON"))
    }

    async fn finish_bytes(&self, path: &str, builder: reqwest::RequestBuilder) -> anyhow::Result<Vec<u8>> {
        let response = builder
            .send()
            .await
            .with_context(|| format!("cannot reach the node at `{}`; is `custos serve` running?", self.base))?;
        let status = response.status();
        let bytes = response.bytes().await.context("reading the node's answer")?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let detail = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|value| {
                    Some(format!(
                        "{}: {}",
                        value.get("error")?.as_str()?,
                        value.get("message")?.as_str()?
                    ))
                })
                .unwrap_or(text);
            bail!("{path} answered {status}: {detail}");
        }
        Ok(bytes.to_vec())
    }

    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.finish(path, self.request(reqwest::Method::GET, path)).await
    }

    pub(crate) async fn post_json(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        self.finish(path, self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    /// Sends envelopes as NDJSON; returns one result per envelope.
    pub(crate) async fn send_events(&self, body: Vec<u8>) -> anyhow::Result<Vec<custos_ingest::ItemResultView>> {
        let bytes = self
            .finish_bytes(
                "/v1/events",
                self.request(reqwest::Method::POST, "/v1/events")
                    .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
                    .body(body),
            )
            .await?;
        serde_json::from_slice(&bytes).context("/v1/events did not answer a list of results")
    }
}
