//! Starts a real node on 127.0.0.1 with a temporary store.

use custos_event::{AgentKey, Envelope, Kind, Payload, Signer};
use custos_ingest::{ItemResultView, NodeConfig, Running};
use serde_json::Value;

pub(crate) struct Node {
    pub(crate) running: Option<Running>,
    pub(crate) url: String,
    pub(crate) token: String,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: NodeConfig,
    http: reqwest::Client,
}

pub(crate) fn config(dir: &std::path::Path) -> NodeConfig {
    let mut config = NodeConfig::new(dir.to_owned(), "127.0.0.1:0".parse().unwrap());
    config.log.segment_max_entries = 200;
    config.log.checkpoint_every = 50;
    config
}

impl Node {
    pub(crate) async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        Self::start_in(dir, config).await
    }

    pub(crate) async fn start_in(dir: tempfile::TempDir, config: NodeConfig) -> Self {
        Self::start_hooked(dir, config, custos_ingest::Hooks::default()).await
    }

    pub(crate) async fn start_hooked(dir: tempfile::TempDir, config: NodeConfig, hooks: custos_ingest::Hooks) -> Self {
        let running = custos_ingest::start_with(config.clone(), hooks).await.unwrap();
        let token = match &running.admin_token {
            Some(secret) => secret.0.clone(),
            None => std::fs::read_to_string(dir.path().join("admin.token"))
                .unwrap()
                .trim()
                .to_owned(),
        };
        Self {
            url: format!("http://{}", running.addr),
            running: Some(running),
            token,
            dir,
            config,
            http: reqwest::Client::new(),
        }
    }

    pub(crate) async fn stop(mut self) -> (tempfile::TempDir, NodeConfig) {
        self.running.take().unwrap().shutdown().await.unwrap();
        (self.dir, self.config)
    }

    pub(crate) async fn send(&self, body: impl Into<Vec<u8>>) -> Vec<ItemResultView> {
        let response = self
            .http
            .post(format!("{}/v1/events", self.url))
            .body(body.into())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        response.json().await.unwrap()
    }

    pub(crate) async fn send_one(&self, envelope: &Envelope) -> ItemResultView {
        self.send(envelope.to_json()).await.remove(0)
    }

    pub(crate) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut builder = self.http.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            builder = builder.bearer_auth(token);
        }
        if let Some(body) = body {
            builder = builder.json(&body);
        }
        let response = builder.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub(crate) async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let token = self.token.clone();
        self.request(method, path, Some(&token), body).await
    }

    pub(crate) async fn enroll(&self, did: &str, realm: &str) {
        let (status, body) = self
            .admin(
                reqwest::Method::POST,
                "/v1/agents",
                Some(serde_json::json!({"did": did, "realm": realm})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// A new enrolled agent's signer.
    pub(crate) async fn agent(&self, seed: u8, realm: &str) -> Signer {
        let key = AgentKey::from_seed(&[seed; 32]);
        self.enroll(key.did(), realm).await;
        Signer::new(key, realm)
    }
}

pub(crate) fn event(kind: Kind) -> Payload {
    let mut payload = Payload::new(kind, chrono::Utc::now());
    payload.action = Some("http.get".into());
    payload.target = Some("https://api.example.com/v1/orders".into());
    payload
}

pub(crate) fn ndjson(envelopes: &[Envelope]) -> Vec<u8> {
    envelopes
        .iter()
        .map(Envelope::to_json)
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}
