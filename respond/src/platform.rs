//! Actions carried out on agent platforms' APIs: VaultysClaw's disconnect and
//! policy revocation, and their undos.
//!
//! ```text
//!  ActionRecord (executed, Enforcement::Platform) ──▶ Platforms::carry_out
//!        disconnect_agent: GET /api/agents/{did} (the snapshot) ─▶ DELETE /api/agents/{did}
//!        revoke_policy:    GET /api/policies/{id}                ─▶ DELETE /api/policies/{id}
//!        restore_agent / restore_policy (undo): POST the snapshot back
//!        ◀── record.platform = {operation, url, status, snapshot}; failed when it failed
//! ```
//!
//! The record is logged after the call, with what the platform answered, so the log
//! says what was done, not what was meant. A dry-run record never calls anything.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

/// VaultysClaw's API, as `custos serve --vaultysclaw-url … --vaultysclaw-token-file …`
/// configures it.
#[derive(Clone)]
pub struct VaultysClawTarget {
    pub base_url: String,
    pub token: String,
    /// Where the adapter keeps its agents' names (`DATA/attest/vaultysclaw/vaultysclaw`):
    /// `<did:key suffix>.enrolled` holds the VaultysClaw agentDid a Custos key stands for.
    pub names: PathBuf,
    pub timeout: Duration,
}

impl std::fmt::Debug for VaultysClawTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultysClawTarget")
            .field("base_url", &self.base_url)
            .field("token", &"**REDACTED**")
            .finish()
    }
}

/// LastID's operator webhook (`custos serve --lastid-webhook URL`): it receives signed
/// recommendations, and LastID's operator signs the revocation itself.
#[derive(Clone)]
pub struct LastIdTarget {
    pub url: String,
    /// HMAC secret for `X-Custos-Signature` (as the `webhook` action signs).
    pub secret: Vec<u8>,
    /// `DATA/attest/lastid`: each realm's `<did:key suffix>.enrolled` names the LastID
    /// agent a Custos key stands for.
    pub names: PathBuf,
    pub timeout: Duration,
}

impl std::fmt::Debug for LastIdTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastIdTarget").field("url", &self.url).finish()
    }
}

impl LastIdTarget {
    /// The LastID agent the Custos key `did` stands for.
    pub fn agent_did(&self, did: &str) -> Result<String, String> {
        let file = format!("{}.enrolled", did.trim_start_matches("did:key:"));
        let realms = std::fs::read_dir(&self.names).map_err(|_| format!("`{did}` is not a LastID agent's key"))?;
        for realm in realms.flatten() {
            if let Ok(name) = std::fs::read_to_string(realm.path().join(&file))
                && !name.trim().is_empty()
            {
                return Ok(name.trim().to_owned());
            }
        }
        Err(format!("`{did}` is not a LastID agent's key"))
    }

    /// POSTs `body` (the recommendation) to the operator webhook; answers what to record.
    pub fn send(&self, body: &Value) -> Result<Value, String> {
        let bytes = serde_json::to_vec(body).map_err(|error| error.to_string())?;
        let response = reqwest::blocking::Client::builder()
            .timeout(self.timeout)
            .build()
            .map_err(|error| error.to_string())?
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-custos-signature", crate::webhook::signature(&self.secret, &bytes))
            .body(bytes)
            .send()
            .map_err(|error| format!("POST {}: {error}", self.url))?;
        let status = response.status().as_u16();
        let text: String = response.text().unwrap_or_default().chars().take(2000).collect();
        if !(200..300).contains(&status) {
            return Err(format!("the LastID operator webhook answered {status}: {text}"));
        }
        let answer = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
        Ok(json!({ "url": self.url, "status": status, "response": answer }))
    }
}

/// The platforms this responder may act on.
#[derive(Clone, Debug, Default)]
pub struct Platforms {
    pub vaultysclaw: Option<VaultysClawTarget>,
    pub lastid: Option<LastIdTarget>,
}

/// A path segment with the characters that would change the URL's meaning escaped.
fn segment(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

impl VaultysClawTarget {
    /// The VaultysClaw agentDid the Custos key `did` attests for.
    fn agent_did(&self, did: &str) -> Result<String, String> {
        let path = self
            .names
            .join(format!("{}.enrolled", did.trim_start_matches("did:key:")));
        let name = std::fs::read_to_string(&path)
            .map_err(|_| format!("`{did}` is not an agent the VaultysClaw adapter enrolled"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("the VaultysClaw adapter's record of `{did}` names no agent"));
        }
        Ok(name.to_owned())
    }

    fn client(&self) -> Result<reqwest::blocking::Client, String> {
        reqwest::blocking::Client::builder()
            .timeout(self.timeout)
            .build()
            .map_err(|error| error.to_string())
    }

    /// Carries out `operation` on `subject`; answers what to record (`operation`, `url`,
    /// `status`, `snapshot`) or why it failed.
    pub fn carry_out(&self, operation: &str, subject: &str, undo_of: Option<&Value>) -> Result<Value, String> {
        let base = self.base_url.trim_end_matches('/');
        let (collection, id) = match operation {
            "disconnect_agent" | "restore_agent" => ("agents", self.agent_did(subject)?),
            "revoke_policy" | "restore_policy" => ("policies", subject.to_owned()),
            other => return Err(format!("VaultysClaw has no operation `{other}`")),
        };
        let client = self.client()?;
        let url = format!("{base}/api/{collection}/{}", segment(&id));
        if operation.starts_with("restore_") {
            let snapshot = undo_of
                .and_then(|platform| platform.get("snapshot"))
                .filter(|snapshot| !snapshot.is_null())
                .ok_or_else(|| format!("nothing to restore: VaultysClaw had no record of {collection}/{id} before"))?;
            let url = format!("{base}/api/{collection}");
            let response = client
                .post(&url)
                .bearer_auth(&self.token)
                .json(snapshot)
                .send()
                .map_err(|error| format!("POST {url}: {error}"))?;
            let status = response.status().as_u16();
            if !response.status().is_success() {
                return Err(format!("POST {url} answered {status}"));
            }
            return Ok(json!({ "operation": operation, "url": url, "status": status, "snapshot": snapshot }));
        }
        let before = client
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .map_err(|error| format!("GET {url}: {error}"))?;
        let snapshot = match before.status().as_u16() {
            200 => before.json::<Value>().unwrap_or(Value::Null),
            404 => {
                return Err(format!(
                    "GET {url} answered 404: VaultysClaw has no such {collection} entry"
                ));
            }
            status => return Err(format!("GET {url} answered {status}")),
        };
        let response = client
            .delete(&url)
            .bearer_auth(&self.token)
            .send()
            .map_err(|error| format!("DELETE {url}: {error}"))?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            return Err(format!("DELETE {url} answered {status}"));
        }
        Ok(json!({ "operation": operation, "url": url, "status": status, "snapshot": snapshot }))
    }
}

impl Platforms {
    /// Carries out a platform enforcement; `Err` says why it could not be.
    pub fn carry_out(
        &self,
        platform: &str,
        operation: &str,
        subject: &str,
        undo_of: Option<&Value>,
    ) -> Result<Value, String> {
        match platform {
            "vaultysclaw" => self
                .vaultysclaw
                .as_ref()
                .ok_or_else(|| {
                    "VaultysClaw is not configured (custos serve --vaultysclaw-url, --vaultysclaw-token-file)"
                        .to_owned()
                })?
                .carry_out(operation, subject, undo_of),
            "lastid" => Err("LastID recommendations are signed by the responder: use Platforms::recommend".into()),
            other => Err(format!("no platform `{other}`")),
        }
    }
}
