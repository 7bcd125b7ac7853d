//! The query API through a real `custos serve`: SQL over Parquet segments and the
//! unsealed tail, every answer format, the limits, refusals, and realm-escape attempts.

use std::time::Duration;

use custos_event::{AgentKey, Signer};
use serde_json::{Value, json};

use crate::respond::{enroll, get, send};
use crate::support::{Server, post};

/// Runs SQL; returns (status, body bytes, content type).
fn sql(url: &str, token: &str, query: &str, accept: &str) -> (u16, Vec<u8>, String) {
    let response = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/sql"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("accept", accept)
        .body(json!({ "sql": query }).to_string())
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, response.bytes().unwrap().to_vec(), kind)
}

fn rows(url: &str, token: &str, query: &str) -> Vec<Value> {
    let (status, body, _) = sql(url, token, query, "application/json");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "{query}: {text}");
    serde_json::from_slice::<Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The physical plan `EXPLAIN` gives for `query` (empty if it gives none).
fn physical_plan(url: &str, token: &str, query: &str) -> String {
    rows(url, token, &format!("EXPLAIN {query}"))
        .iter()
        .find(|row| row["plan_type"] == "physical_plan")
        .and_then(|row| row["plan"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn error(url: &str, token: &str, query: &str) -> (u16, Value) {
    let (status, body, _) = sql(url, token, query, "application/json");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn token(url: &str, admin: &str, role: &str, realms: &[&str]) -> String {
    let (status, answer) = post(
        url,
        "/v1/tokens",
        Some(admin),
        json!({"role": role, "realms": realms}).to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{answer}");
    answer["token"].as_str().unwrap().to_owned()
}

struct Fleet {
    server: Server,
    admin: String,
    eng: String,
    /// The did:key of the agent enrolled in `ops`.
    ops_agent: String,
    _dir: tempfile::TempDir,
}

/// A node with 300 eng events and 300 ops events: segments of 500 entries, so part of
/// the log is sealed Parquet and part is the unsealed tail.
fn fleet(extra: &[&str]) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--no-detect"];
    args.extend_from_slice(extra);
    let server = Server::start_with(&dir.path().join("store"), &args);
    let admin = server.token();
    let url = server.url.clone();
    let mut ops_agent = String::new();
    for realm in ["eng", "ops"] {
        let key = AgentKey::generate().unwrap();
        enroll(&url, &admin, key.did(), realm);
        if realm == "ops" {
            ops_agent = key.did().to_owned();
        }
        let mut signer = Signer::new(key, realm);
        for batch in 0..3 {
            let objects: Vec<Value> = (0..100)
                .map(|i| {
                    json!({"kind": "tool_call", "action": format!("tool{}", i % 4),
                           "target": format!("{realm}/secret/{batch}/{i}"), "bytes_out": i})
                })
                .collect();
            let results = send(&url, &mut signer, &objects);
            assert!(results.iter().all(|result| result["status"] == "accepted"));
        }
    }
    // Sealing runs off the append path: wait for the first Parquet segment to land.
    let segments = server.data.join("logs/0/segments");
    crate::respond::wait_for("the first sealed segment", || {
        std::fs::read_dir(&segments)
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .any(|f| f.path().extension().is_some_and(|e| e == "parquet"))
            })
            .unwrap_or(false)
    });
    let eng = token(&url, &admin, "analyst", &["eng"]);
    Fleet {
        server,
        admin,
        eng,
        ops_agent,
        _dir: dir,
    }
}

#[test]
fn sql_sees_segments_and_tail_in_every_format() {
    let fleet = fleet(&[]);
    let url = &fleet.server.url;
    // 2 enrollments + 600 events: `fleet` waited for a sealed segment; the rest is tail.
    let all = rows(
        url,
        &fleet.admin,
        "SELECT realm, count(*) AS n FROM events GROUP BY realm ORDER BY realm",
    );
    assert_eq!(
        all,
        vec![json!({"realm": "eng", "n": 300}), json!({"realm": "ops", "n": 300})]
    );
    // Freshness: the newest event (in the tail) is visible at once.
    let newest = rows(url, &fleet.admin, "SELECT max(log_index) AS last FROM events");
    let (_, checkpoint) = get(url, "/v1/checkpoints/latest", &fleet.admin);
    assert!(newest[0]["last"].as_u64().unwrap() >= 600, "{newest:?} {checkpoint}");

    for (accept, kind) in [
        ("application/x-ndjson", "application/x-ndjson"),
        ("text/csv", "text/csv"),
        (
            "application/vnd.apache.arrow.stream",
            "application/vnd.apache.arrow.stream",
        ),
        ("application/vnd.apache.parquet", "application/vnd.apache.parquet"),
    ] {
        let (status, body, got) = sql(
            url,
            &fleet.admin,
            "SELECT log_index, agent FROM events ORDER BY log_index LIMIT 5",
            accept,
        );
        assert_eq!(status, 200, "{accept}");
        assert_eq!(got, kind);
        match accept {
            "application/x-ndjson" => assert_eq!(String::from_utf8(body).unwrap().lines().count(), 5),
            "text/csv" => assert_eq!(String::from_utf8(body).unwrap().lines().count(), 6),
            "application/vnd.apache.arrow.stream" => {
                let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None).unwrap();
                let count: usize = reader.map(|batch| batch.unwrap().num_rows()).sum();
                assert_eq!(count, 5);
            }
            _ => {
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(body))
                        .unwrap()
                        .build()
                        .unwrap();
                let count: usize = reader.map(|batch| batch.unwrap().num_rows()).sum();
                assert_eq!(count, 5);
            }
        }
    }

    // The few-valued text columns stay dictionaries: a filter on one compares the
    // dictionary (no per-row cast to string in the plan), Arrow answers keep the type,
    // and text answers show plain strings.
    let physical = physical_plan(
        url,
        &fleet.admin,
        "SELECT realm, action, count(*) AS n FROM events WHERE kind = 'tool_call' GROUP BY realm, action",
    );
    assert!(
        physical.contains("kind@") && physical.contains("= tool_call"),
        "{physical}"
    );
    assert!(!physical.contains("CAST(kind"), "kind is cast per row: {physical}");
    // Grouping by dictionaries numbers groups by key (custos_query::dictagg), and counts
    // what the stock aggregate counts over the same rows as plain strings.
    assert!(physical.contains("DictionaryGroupExec"), "{physical}");
    let by_key = rows(
        url,
        &fleet.admin,
        "SELECT realm, action, count(*) AS n FROM events WHERE kind = 'tool_call' GROUP BY realm, action \
         ORDER BY realm, action",
    );
    let by_text = rows(
        url,
        &fleet.admin,
        "SELECT realm, action, count(*) AS n FROM (SELECT CAST(realm AS VARCHAR) AS realm, \
         CAST(action AS VARCHAR) AS action FROM events WHERE kind = 'tool_call') GROUP BY realm, action \
         ORDER BY realm, action",
    );
    assert!(by_key.len() > 1, "{by_key:?}");
    assert_eq!(by_key, by_text);
    // The filter on a few-valued column runs after decoding, above AfterDecoding
    // (custos_query's decoding rule); one on an identifier runs in the Parquet scan.
    assert!(physical.contains("AfterDecoding"), "{physical}");
    let agent = rows(
        url,
        &fleet.admin,
        "SELECT agent FROM events WHERE realm = 'eng' LIMIT 1",
    )[0]["agent"]
        .as_str()
        .unwrap()
        .to_owned();
    let split = format!("SELECT count(*) AS n FROM events WHERE agent = '{agent}' AND action = 'tool1'");
    let physical = physical_plan(url, &fleet.admin, &split);
    let scan = physical
        .lines()
        .find(|line| line.contains("file_type=parquet"))
        .unwrap_or_else(|| panic!("no Parquet scan: {physical}"));
    assert!(scan.contains("agent@") && scan.contains(&agent), "{physical}");
    assert!(
        !scan.contains("tool1"),
        "the action filter went into the scan: {physical}"
    );
    // 300 eng events, actions tool0..tool3 in turn: 75 of each, across segment and tail.
    assert_eq!(rows(url, &fleet.admin, &split), vec![json!({"n": 75})]);
    let (status, body, _) = sql(
        url,
        &fleet.admin,
        "SELECT realm, kind, action FROM events WHERE kind = 'tool_call' ORDER BY log_index LIMIT 2",
        "application/vnd.apache.arrow.stream",
    );
    assert_eq!(status, 200);
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None).unwrap();
    let kind = reader.schema().field_with_name("kind").unwrap().data_type().clone();
    assert_eq!(
        kind,
        arrow::datatypes::DataType::Dictionary(
            Box::new(arrow::datatypes::DataType::Int32),
            Box::new(arrow::datatypes::DataType::Utf8)
        )
    );
    let (_, csv, _) = sql(
        url,
        &fleet.admin,
        "SELECT realm, kind, action FROM events WHERE kind = 'tool_call' ORDER BY log_index LIMIT 2",
        "text/csv",
    );
    assert_eq!(
        String::from_utf8(csv).unwrap(),
        "realm,kind,action\neng,tool_call,tool0\neng,tool_call,tool1\n"
    );

    // REST: filters and cursor pagination on log_index.
    let (status, page) = get(url, "/v1/events?realm=eng&action=tool1&limit=50", &fleet.admin);
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"].as_array().unwrap().len(), 50);
    let next = page["next"].as_u64().unwrap();
    let (_, rest) = get(
        url,
        &format!("/v1/events?realm=eng&action=tool1&after={next}&limit=50"),
        &fleet.admin,
    );
    assert_eq!(rest["events"].as_array().unwrap().len(), 25);
    assert!(rest["next"].is_null());
    assert!(rest["events"][0]["log_index"].as_u64().unwrap() > next);
    let (status, bad) = get(url, "/v1/events?from=yesterday", &fleet.admin);
    assert_eq!(status, 400);
    assert!(bad["message"].as_str().unwrap().contains("yesterday"), "{bad}");

    // Every read is in the access log: who, what, how many rows.
    let log = std::fs::read_to_string(fleet.server.data.join("access.ndjson")).unwrap();
    assert!(
        log.lines()
            .any(|line| line.contains("GROUP BY realm") && line.contains("\"rows\":2")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|line| line.contains("/v1/events") && line.contains("\"rows\":50")),
        "{log}"
    );
    fleet.server.stop();
}

#[test]
fn writes_files_and_settings_are_refused() {
    let fleet = fleet(&[]);
    let url = &fleet.server.url;
    for query in [
        "CREATE TABLE x AS SELECT 1",
        "CREATE EXTERNAL TABLE leak STORED AS CSV LOCATION '/etc/passwd'",
        "INSERT INTO events SELECT * FROM events",
        "COPY (SELECT * FROM events) TO '/tmp/custos-leak.parquet'",
        "DROP TABLE events",
        "SET datafusion.execution.batch_size = 1",
        "CREATE VIEW v AS SELECT 1",
    ] {
        let (status, answer) = error(url, &fleet.admin, query);
        assert!(status == 403 || status == 400, "{query}: {status} {answer}");
        assert!(
            answer["error"] == "read_only" || answer["error"] == "bad_sql",
            "{query}: {answer}"
        );
    }
    assert!(!std::path::Path::new("/tmp/custos-leak.parquet").exists());
    for query in [
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_parquet('/etc/passwd')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM tail",
        "SELECT * FROM segments",
    ] {
        let (status, answer) = error(url, &fleet.admin, query);
        assert_eq!(status, 400, "{query}: {answer}");
    }
    let (status, answer) = error(url, &fleet.admin, "SELEC nonsense");
    assert_eq!((status, answer["error"].as_str()), (400, Some("bad_sql")), "{answer}");
    fleet.server.stop();
}

#[test]
fn a_realm_scoped_token_cannot_escape_its_realm() {
    let fleet = fleet(&[]);
    let url = &fleet.server.url;
    let eng = &fleet.eng;
    let only_eng = |query: &str| {
        for row in rows(url, eng, query) {
            assert!(
                row.to_string().contains("eng") || !row.to_string().contains("ops"),
                "{query}: {row}"
            );
        }
    };
    assert_eq!(rows(url, eng, "SELECT count(*) AS n FROM events")[0]["n"], 300);
    assert_eq!(
        rows(url, eng, "SELECT count(*) AS n FROM events WHERE realm = 'ops'")[0]["n"],
        0
    );
    assert_eq!(
        rows(
            url,
            eng,
            "SELECT count(*) AS n FROM events WHERE realm <> 'eng' OR realm IS NULL"
        )[0]["n"],
        0
    );
    only_eng("SELECT DISTINCT realm FROM events");
    // Subqueries, CTEs, unions, joins, self-joins.
    for query in [
        "SELECT count(*) AS n FROM (SELECT * FROM events) e WHERE e.realm = 'ops'",
        "WITH x AS (SELECT * FROM events) SELECT count(*) AS n FROM x WHERE realm = 'ops'",
        "SELECT count(*) AS n FROM (SELECT realm FROM events UNION ALL SELECT realm FROM findings UNION ALL SELECT realm FROM actions) u WHERE realm = 'ops'",
        "SELECT count(*) AS n FROM events a JOIN events b ON a.log_index = b.log_index WHERE b.realm = 'ops'",
        "SELECT count(*) AS n FROM agents WHERE realm = 'ops'",
        "SELECT count(*) AS n FROM events WHERE target LIKE 'ops/%'",
        "SELECT count(*) AS n FROM events WHERE log_index IN (SELECT log_index FROM events WHERE realm = 'ops')",
    ] {
        assert_eq!(rows(url, eng, query)[0]["n"], 0, "{query}");
    }
    // information_schema lists the caller's tables only; the raw log is not there.
    let tables: Vec<String> = rows(
        url,
        eng,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .iter()
    .map(|row| row["table_name"].as_str().unwrap().to_owned())
    .collect();
    let mut sorted = tables.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["actions", "agents", "checkpoints", "events", "findings"],
        "{tables:?}"
    );
    // No rejected inputs (their realm is unverified) for a scoped token.
    let (status, _) = error(url, eng, "SELECT * FROM rejected");
    assert_eq!(status, 400);
    // No answer format carries another realm's values, not even inside an Arrow or
    // Parquet dictionary that no row uses.
    for accept in [
        "application/json",
        "application/x-ndjson",
        "text/csv",
        "application/vnd.apache.arrow.stream",
        "application/vnd.apache.parquet",
    ] {
        let (status, body, _) = sql(url, eng, "SELECT * FROM events WHERE log_index % 2 = 0", accept);
        assert_eq!(status, 200, "{accept}");
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains(&fleet.ops_agent), "{accept} carries the ops agent");
        if accept == "application/vnd.apache.arrow.stream" {
            let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None).unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let realm = batch.column_by_name("realm").unwrap();
                let dictionary = realm
                    .as_any()
                    .downcast_ref::<arrow::array::DictionaryArray<arrow::datatypes::Int32Type>>()
                    .unwrap();
                let values = format!("{:?}", dictionary.values());
                assert!(!values.contains("ops"), "the realm dictionary holds {values}");
            }
        }
    }
    // REST is scoped the same way, whatever filter is asked for.
    let (_, page) = get(url, "/v1/events?realm=ops", eng);
    assert_eq!(page["events"].as_array().unwrap().len(), 0, "{page}");
    // An auditor sees checkpoints only.
    let auditor = token(url, &fleet.admin, "auditor", &[]);
    let (status, answer) = error(url, &auditor, "SELECT count(*) FROM events");
    assert_eq!(status, 400, "{answer}");
    assert!(!rows(url, &auditor, "SELECT size FROM checkpoints").is_empty());
    assert_eq!(get(url, "/v1/events", &auditor).0, 403);
    fleet.server.stop();
}

#[test]
fn limits_answer_with_clear_errors() {
    let fleet = fleet(&[
        "--query-max-rows",
        "100",
        "--query-memory-mib",
        "1",
        "--query-timeout-secs",
        "1",
    ]);
    let url = &fleet.server.url;
    let (status, answer) = error(url, &fleet.admin, "SELECT * FROM events");
    assert_eq!((status, answer["error"].as_str()), (413, Some("row_cap")), "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("100"), "{answer}");
    assert_eq!(rows(url, &fleet.admin, "SELECT * FROM events LIMIT 100").len(), 100);
    let (status, answer) = error(
        url,
        &fleet.admin,
        "SELECT a.target, b.target, count(*) FROM events a CROSS JOIN events b GROUP BY a.target, b.target ORDER BY 3 DESC LIMIT 1",
    );
    assert!(
        (status == 413 && answer["error"] == "query_memory") || (status == 408 && answer["error"] == "query_timeout"),
        "{status} {answer}"
    );
    let (status, answer) = error(
        url,
        &fleet.admin,
        "SELECT count(*) FROM generate_series(1, 5000000000) a",
    );
    assert!(
        (status == 408 && answer["error"] == "query_timeout") || (status == 413 && answer["error"] == "query_memory"),
        "{status} {answer}"
    );
    fleet.server.stop();
}

#[test]
fn ocsf_export_is_scoped_paged_and_well_formed() {
    let fleet = fleet(&[]);
    let url = &fleet.server.url;
    let fetch = |path: &str, token: &str| -> (u16, Option<u64>, String) {
        let response = reqwest::blocking::Client::new()
            .get(format!("{url}{path}"))
            .bearer_auth(token)
            .send()
            .unwrap();
        let next = response
            .headers()
            .get("x-custos-next")
            .map(|value| value.to_str().unwrap().parse().unwrap());
        (response.status().as_u16(), next, response.text().unwrap())
    };
    // The eng analyst sees eng's 300 events only, as API Activity, across segment and tail.
    let (status, next, body) = fetch("/v1/ocsf/events?limit=10000", &fleet.eng);
    assert_eq!(status, 200, "{body}");
    assert_eq!(next, None);
    let objects: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(objects.len(), 300);
    for object in &objects {
        assert_eq!(object["class_uid"], 6003);
        assert_eq!(object["category_uid"], 6);
        assert!(object["metadata"]["log_index"].is_u64(), "{object}");
        assert!(object.to_string().contains("eng/secret"), "{object}");
    }
    // Another realm: refused, not emptied.
    let (status, _, body) = fetch("/v1/ocsf/events?realm=ops", &fleet.eng);
    assert_eq!(status, 403, "{body}");
    // Pages of 128 with the cursor cover the same 300 once each; NDJSON line by line.
    let mut seen = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let path = match after {
            Some(after) => format!("/v1/ocsf/events?limit=128&format=ndjson&after={after}"),
            None => "/v1/ocsf/events?limit=128&format=ndjson".to_owned(),
        };
        let (status, next, body) = fetch(&path, &fleet.eng);
        assert_eq!(status, 200, "{body}");
        for line in body.lines() {
            let object: Value = serde_json::from_str(line).unwrap();
            seen.push(object["metadata"]["log_index"].as_u64().unwrap());
        }
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let all: Vec<u64> = objects
        .iter()
        .map(|object| object["metadata"]["log_index"].as_u64().unwrap())
        .collect();
    assert_eq!(seen, all);
    // The admin sees both realms; --no-detect means no findings or actions yet.
    let (_, _, body) = fetch("/v1/ocsf/events?limit=10000", &fleet.admin);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&body).unwrap().len(), 600);
    let (status, _, body) = fetch("/v1/ocsf/findings", &fleet.admin);
    assert_eq!((status, body.as_str()), (200, "[]"));
    for (path, status, named) in [
        ("/v1/ocsf/logins", 404, "`logins`"),
        ("/v1/ocsf/events?format=xml", 400, "`format=xml`"),
        ("/v1/ocsf/events?from=today", 400, "`from=today`"),
    ] {
        let (got, _, body) = fetch(path, &fleet.admin);
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains(named), "{path}: {body}");
    }
}
