//! Submitting checkpoints to witnesses (C2SP `tlog-witness`), and keeping their
//! cosignatures.
//!
//! ```text
//!  every second: latest signed checkpoint (size S)
//!     └─ per witness, last size it cosigned W (unknown: 0)
//!          POST add-checkpoint (old W, consistency proof W→S, the note)
//!            ├─ 200 ─▶ cosignature checked with the witness key ─▶ cosignatures.ndjson,
//!            │         served on GET /v1/checkpoints/latest
//!            └─ 409 "W'" ─▶ W = W' (and W' > S: the witness saw more than this log
//!                          holds: entries were removed; the node refuses to start so)
//! ```

use std::io::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use custos_store::witness::{AddCheckpoint, CosignerKey};

use crate::Api;

/// A witness the node submits its checkpoints to.
#[derive(Clone, Debug)]
pub struct WitnessTarget {
    pub key: CosignerKey,
    /// The witness's submission prefix (`…/add-checkpoint` is appended).
    pub url: String,
}

impl WitnessTarget {
    /// Parses `<verifier key>@<url>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (key, url) = text
            .split_once('@')
            .ok_or_else(|| format!("`{text}` is not `<witness verifier key>@<url>`"))?;
        let key = CosignerKey::parse(key).map_err(|error| error.to_string())?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("`{url}` is not an http(s) URL"));
        }
        Ok(Self {
            key,
            url: url.trim_end_matches('/').to_owned(),
        })
    }
}

/// The latest cosignature of each witness: (witness name, checkpoint size, line).
pub type Cosigned = Arc<RwLock<Vec<(String, u64, String)>>>;

/// What one submission round learned from a witness.
enum Round {
    /// Cosigned at this size.
    Cosigned(u64),
    /// The witness's latest size is this (409).
    Behind(u64),
    Failed(String),
}

struct Submitter {
    api: Api,
    client: reqwest::Client,
    file: std::path::PathBuf,
    cosigned: Cosigned,
}

impl Submitter {
    async fn round(&self, target: &WitnessTarget, old: u64) -> Round {
        let checkpoint = match self.api.checkpoint().await {
            Ok(checkpoint) => checkpoint,
            Err(error) => return Round::Failed(error.message),
        };
        let size = checkpoint.size;
        let proof = if old == 0 || old >= size {
            Vec::new()
        } else {
            match self.api.consistency(old, size).await {
                Ok(proof) => proof["consistency_path"]
                    .as_array()
                    .map(|path| {
                        path.iter()
                            .filter_map(|hash| {
                                let mut out = [0u8; 32];
                                hex::decode_to_slice(hash.as_str()?, &mut out).ok()?;
                                Some(out)
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                Err(error) => return Round::Failed(error.message),
            }
        };
        let body = AddCheckpoint {
            old: old.min(size),
            proof,
            note: checkpoint.note.clone(),
        }
        .encode();
        let response = match self
            .client
            .post(format!("{}/add-checkpoint", target.url))
            .body(body)
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) => return Round::Failed(error.to_string()),
        };
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        match status {
            200 => {
                let line = text
                    .lines()
                    .find(|line| line.starts_with(&format!("\u{2014} {} ", target.key.name)))
                    .map(|line| format!("{line}\n"));
                let Some(line) = line else {
                    return Round::Failed("the witness answered 200 without its cosignature".into());
                };
                if let Err(error) = target.key.verify(&format!("{}{line}", checkpoint.note)) {
                    return Round::Failed(format!("the witness's answer does not verify: {error}"));
                }
                self.keep(&target.key.name, size, &line, &checkpoint.note);
                Round::Cosigned(size)
            }
            409 => match text.trim().parse::<u64>() {
                Ok(latest) => Round::Behind(latest),
                Err(_) => Round::Failed(format!("409 without a size: `{}`", text.trim())),
            },
            _ => Round::Failed(format!("{status}: {}", text.trim())),
        }
    }

    fn keep(&self, witness: &str, size: u64, line: &str, note: &str) {
        {
            let mut cosigned = self.cosigned.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            cosigned.retain(|(name, _, _)| name != witness);
            cosigned.push((witness.to_owned(), size, line.to_owned()));
        }
        // The whole cosigned note, so `custos verify --witness KEY` can use it on its own.
        let record = serde_json::json!({
            "size": size,
            "witness": witness,
            "cosignature": line,
            "note": format!("{note}{line}"),
        });
        let appended = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)
            .and_then(|mut file| {
                file.write_all(format!("{record}\n").as_bytes())?;
                file.sync_data()
            });
        if let Err(error) = appended {
            tracing::warn!(%error, "could not keep a cosignature");
        }
    }
}

/// Before the node serves: a witness that cosigned more than this log holds means its
/// tail was removed. Unreachable witnesses are only reported.
pub(crate) async fn check_at_start(api: &Api, targets: &[WitnessTarget], cosigned: &Cosigned) -> Result<(), String> {
    let submitter = submitter(api, cosigned);
    for target in targets {
        let size = api.checkpoint().await.map(|checkpoint| checkpoint.size).unwrap_or(0);
        let mut old = 0;
        for _ in 0..2 {
            match submitter.round(target, old).await {
                Round::Cosigned(_) => break,
                Round::Behind(latest) if latest > size => {
                    return Err(format!(
                        "witness `{}` cosigned a checkpoint of {latest} entries but this log holds {size}: entries were removed from its tail; run `custos verify --witness`",
                        target.key.name
                    ));
                }
                Round::Behind(latest) => old = latest,
                Round::Failed(reason) => {
                    tracing::warn!(witness = target.key.name, %reason, "witness not reached at start");
                    break;
                }
            }
        }
    }
    Ok(())
}

fn submitter(api: &Api, cosigned: &Cosigned) -> Submitter {
    Submitter {
        api: api.clone(),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default(),
        file: api
            .data
            .join("logs")
            .join(custos_store::DEFAULT_LOG_ID)
            .join("cosignatures.ndjson"),
        cosigned: cosigned.clone(),
    }
}

/// Submits each new checkpoint to every witness, until `stopping`.
pub(crate) async fn run(
    api: Api,
    targets: Vec<WitnessTarget>,
    cosigned: Cosigned,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let submitter = submitter(&api, &cosigned);
    let mut known: Vec<u64> = vec![0; targets.len()];
    let mut failing: Vec<bool> = vec![false; targets.len()];
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        let Ok(checkpoint) = api.checkpoint().await else {
            continue;
        };
        for (position, target) in targets.iter().enumerate() {
            if known[position] == checkpoint.size {
                continue;
            }
            let mut old = known[position];
            for _ in 0..2 {
                match submitter.round(target, old).await {
                    Round::Cosigned(size) => {
                        known[position] = size;
                        failing[position] = false;
                        break;
                    }
                    Round::Behind(latest) if latest > checkpoint.size => {
                        tracing::error!(
                            witness = target.key.name,
                            witnessed = latest,
                            size = checkpoint.size,
                            "a witness cosigned more entries than this log holds: entries were removed"
                        );
                        custos_http::metrics::WITNESS_ROUNDS
                            .with_label_values(&["behind"])
                            .inc();
                        break;
                    }
                    Round::Behind(latest) => old = latest,
                    Round::Failed(reason) => {
                        if !failing[position] {
                            tracing::warn!(witness = target.key.name, %reason, "witness submission failed; retrying");
                        }
                        failing[position] = true;
                        custos_http::metrics::WITNESS_ROUNDS
                            .with_label_values(&["failed"])
                            .inc();
                        break;
                    }
                }
            }
            if !failing[position] && known[position] == checkpoint.size {
                custos_http::metrics::WITNESS_ROUNDS
                    .with_label_values(&["cosigned"])
                    .inc();
            }
        }
    }
}
