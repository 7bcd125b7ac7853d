//! `custos witness`: a C2SP `tlog-witness` for Custos logs (or any log whose checkpoints
//! are Ed25519 signed notes), so a second machine holds proof of how far each log grew.
//!
//! ```text
//!  POST /add-checkpoint            the tlog-witness protocol (store::witness::decide)
//!  GET  /checkpoints/latest?origin=O  the latest checkpoint cosigned for O, cosignature
//!                                  included (for `custos verify --witness-url`)
//!  DATA/witness.key                its Ed25519 key (created once, owner-only)
//!  DATA/witness-state.json         per origin, the latest cosigned checkpoint (fsynced
//!                                  before every answer)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Args;
use custos_store::checkpoint::NoteKey;
use custos_store::witness::{AddCheckpoint, Cosigner, Decision, Latest};

#[derive(Args)]
#[command(after_help = "\
Examples:
  custos witness --data ./witness --log \"$(cat ./store/logs/0/checkpoint.pub)\"
  custos witness --data /var/lib/custos-witness --listen 0.0.0.0:7610 --name witness.example.org/w1 \\
      --log 'custos/1a2b…/0+abcd1234+AR…' --log 'custos/5e6f…/0+0a0b0c0d+AQ…'

Prints its verifier key at start; give it to nodes (`custos serve --witness KEY@URL`)
and to auditors (`custos verify --witness KEY --witness-url URL`).")]
pub(crate) struct WitnessArgs {
    /// Directory for the witness key and its state (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7610")]
    listen: SocketAddr,
    /// The witness's name in its cosignatures (a schema-less URL, by convention).
    #[arg(long, default_value = "custos-witness")]
    name: String,
    /// A log's checkpoint verifier key (`DATA/logs/0/checkpoint.pub` of a node), repeat
    /// for more. Only these logs are witnessed.
    #[arg(long = "log", value_name = "VERIFIER_KEY", required = true)]
    logs: Vec<String>,
}

struct Witness {
    cosigner: Cosigner,
    logs: Vec<NoteKey>,
    state_path: PathBuf,
    /// Checked and updated under one lock, so two requests cannot roll the state back.
    latest: tokio::sync::Mutex<BTreeMap<String, Latest>>,
}

pub(crate) async fn run(args: WitnessArgs) -> anyhow::Result<()> {
    let logs = args
        .logs
        .iter()
        .map(|text| NoteKey::parse_verifier(text).with_context(|| format!("`--log {text}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.name.is_empty() || args.name.contains(char::is_whitespace) || args.name.contains('+') {
        anyhow::bail!("`--name {}` must be non-empty, without spaces or `+`", args.name);
    }
    fs_err::create_dir_all(&args.data)?;
    let key = custos_store::keyfile::load_or_create(&args.data.join("witness.key"))?;
    let cosigner = Cosigner::new(&args.name, key);
    let state_path = args.data.join("witness-state.json");
    let latest: BTreeMap<String, Latest> = match fs_err::read(&state_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", state_path.display()))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(error) => return Err(error.into()),
    };
    let vkey = cosigner.key.vkey();
    let witness = Arc::new(Witness {
        cosigner,
        logs,
        state_path,
        latest: tokio::sync::Mutex::new(latest),
    });
    let router = Router::new()
        .route("/add-checkpoint", post(add_checkpoint))
        .route("/checkpoints/latest", get(latest_checkpoint))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(witness);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on `{}`", args.listen))?;
    let addr = listener.local_addr()?;
    eprintln!("witness key {vkey}");
    eprintln!("custos witness on http://{addr} (data {})", args.data.display());
    let limits = custos_http::serve::HttpLimits {
        max_body_bytes: custos_store::witness::MAX_REQUEST_BYTES,
        body_budget_bytes: 16 * 1024 * 1024,
        ..Default::default()
    };
    let descriptors = custos_http::serve::raise_descriptor_limit();
    let connections = custos_http::serve::connection_limit(&limits, descriptors);
    let bodies = Arc::new(custos_http::serve::BodyBudget::new(limits.clone()));
    let router = router.layer(axum::middleware::from_fn_with_state(
        bodies,
        custos_http::serve::budget_bodies,
    ));
    custos_http::serve::serve(listener, router, limits, connections, super::serve::wait_for_signal()).await;
    eprintln!("witness stopped");
    Ok(())
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

async fn add_checkpoint(State(witness): State<Arc<Witness>>, body: Bytes) -> Response {
    let Ok(body) = std::str::from_utf8(&body) else {
        return text(StatusCode::BAD_REQUEST, "the body is not UTF-8\n");
    };
    let request = match AddCheckpoint::parse(body) {
        Ok(request) => request,
        Err(reason) => return text(StatusCode::BAD_REQUEST, format!("{reason}\n")),
    };
    let origin = request.note.split('\n').next().unwrap_or_default().to_owned();
    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
    let mut latest = witness.latest.lock().await;
    match custos_store::witness::decide(&request, &witness.logs, latest.get(&origin), &witness.cosigner, now) {
        Decision::Cosign { latest: next, line } => {
            let size = next.size;
            latest.insert(origin.clone(), next);
            // Persisted before the answer: a cosigned size is never forgotten.
            if let Err(error) = persist(&witness.state_path, &latest) {
                tracing::error!(%error, "could not persist the witness state");
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the witness could not record its state\n",
                );
            }
            tracing::info!(origin, size, "cosigned");
            text(StatusCode::OK, line)
        }
        Decision::Conflict(size) => (
            StatusCode::CONFLICT,
            [(header::CONTENT_TYPE, "text/x.tlog.size")],
            format!("{size}\n"),
        )
            .into_response(),
        Decision::Refuse(status, reason) => text(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            format!("{reason}\n"),
        ),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LatestQuery {
    origin: String,
}

async fn latest_checkpoint(
    State(witness): State<Arc<Witness>>,
    query: Result<Query<LatestQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return text(StatusCode::BAD_REQUEST, "expected ?origin=<checkpoint origin>\n");
    };
    match witness.latest.lock().await.get(&query.origin) {
        Some(latest) => text(StatusCode::OK, latest.note.clone()),
        None => text(
            StatusCode::NOT_FOUND,
            format!("this witness has cosigned nothing for `{}`\n", query.origin),
        ),
    }
}

fn persist(path: &std::path::Path, latest: &BTreeMap<String, Latest>) -> std::io::Result<()> {
    use std::io::Write as _;
    let bytes = serde_json::to_vec_pretty(latest).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("json.tmp");
    {
        let mut file = fs_err::File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    fs_err::rename(&temporary, path)?;
    if let Some(parent) = path.parent() {
        custos_store::fsync_dir(parent)?;
    }
    Ok(())
}
