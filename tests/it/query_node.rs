//! A stateless query node (`--roles query`) against a real writer and a real tansu
//! broker: the sealed store comes from the object store the writer copies it to, the
//! unsealed tail from the committed topic. Its answers are the writer's, row for row
//! (every column, signatures and payload bytes included), scoped by its own tokens; it
//! follows new events and revocations; killed with SIGKILL and started on an empty
//! directory, it rebuilds the same answers. With `--roles ingest,query` one listener
//! takes events and answers SQL. A segment changed in the object store is refused, named.
//! Over a partition set (`--log-per-partition`), each partition answers as its writer.

use std::time::{Duration, Instant};

use custos_event::{AgentKey, Signer};
use serde_json::{Value, json};

use crate::hardening::signed_lines;
use crate::respond::{enroll, get, wait_for};
use crate::stages::Broker;
use crate::support::{Server, post};

const PREFIX: &str = "query-node-test";

/// SQL rows as JSON; `None` on any answer but 200 (the node may not be ready yet).
fn rows(url: &str, token: &str, sql: &str) -> Option<Vec<Value>> {
    let (status, _, body) = sql_in(url, token, sql, None)?;
    (status == 200).then(|| serde_json::from_value(body).ok())?
}

/// `POST /v1/sql`, naming `partition` when given: the status, the partition the answer
/// says it came from, and the body; `None` when the node does not answer.
fn sql_in(url: &str, token: &str, sql: &str, partition: Option<u32>) -> Option<(u16, Option<String>, Value)> {
    let mut request = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/sql"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(json!({ "sql": sql }).to_string())
        .timeout(Duration::from_secs(60));
    if let Some(partition) = partition {
        request = request.header("x-custos-partition", partition.to_string());
    }
    let response = request.send().ok()?;
    let status = response.status().as_u16();
    let answered = response
        .headers()
        .get("x-custos-partition")
        .map(|value| value.to_str().unwrap().to_owned());
    Some((status, answered, response.json().ok()?))
}

fn query_node(data: &std::path::Path, brokers: &str, archive: &str) -> Server {
    Server::start_with(
        data,
        &[
            "--kafka",
            brokers,
            "--kafka-prefix",
            PREFIX,
            "--roles",
            "query",
            "--object-store",
            archive,
        ],
    )
}

const ALL_EVENTS: &str = "SELECT * FROM events ORDER BY log_index";
const ALL_AGENTS: &str = "SELECT did, realm, status, events, last_seq, last_log_index FROM agents ORDER BY did";

/// Waits until the query node answers `sql` exactly as the writer does.
fn same_answer(writer: (&str, &str), node: (&str, &str), sql: &str) -> Vec<Value> {
    let expected = rows(writer.0, writer.1, sql).expect("the writer answers");
    let started = Instant::now();
    loop {
        let answer = rows(node.0, node.1, sql);
        if answer.as_ref() == Some(&expected) {
            return expected;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the query node never gave the writer's answer to `{sql}`: {} rows there, {} on the writer",
            answer.map_or(0, |rows| rows.len()),
            expected.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_query_node_answers_as_the_writer_from_object_storage_and_the_topic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let archive = format!("file://{}", dir.path().join("archive").display());
    let writer = Server::start_with(
        &dir.path().join("writer"),
        &[
            "--kafka",
            &broker.addr,
            "--kafka-prefix",
            PREFIX,
            "--roles",
            "writer",
            "--object-store",
            &archive,
        ],
    );
    let token = writer.token();
    let url = writer.url.clone();
    // Two realms; enough events for sealed segments (500 entries each) and a tail.
    let mut signers: Vec<Signer> = (0..4u8)
        .map(|n| {
            let realm = if n % 2 == 0 { "eng" } else { "ops" };
            let key = AgentKey::from_seed(&[140 + n; 32]);
            enroll(&url, &token, key.did(), realm);
            Signer::new(key, realm)
        })
        .collect();
    for _ in 0..3 {
        for signer in &mut signers {
            let (status, answer) = post(&url, "/v1/events", None, signed_lines(signer, 110)).unwrap();
            assert_eq!(status, 200, "{answer}");
        }
    }
    let sealed = dir.path().join("archive/logs/0/segments.ndjson");
    wait_for("the writer to copy sealed segments to the object store", || {
        std::fs::read_to_string(&sealed).is_ok_and(|text| text.lines().count() >= 2)
    });

    // The first node pins the writer's log key, as an operator would (`--log-key`).
    let log_key = std::fs::read_to_string(dir.path().join("writer/logs/0/checkpoint.pub")).unwrap();
    let node_dir = dir.path().join("query");
    let node = Server::start_with(
        &node_dir,
        &[
            "--kafka",
            &broker.addr,
            "--kafka-prefix",
            PREFIX,
            "--roles",
            "query",
            "--object-store",
            &archive,
            "--log-key",
            log_key.trim(),
        ],
    );
    let node_token = node.token();
    wait_for("the query node to be ready", || {
        reqwest::blocking::get(format!("{}/readyz", node.url)).is_ok_and(|response| response.status() == 200)
    });
    // Segments were sealed before it started: it reads the topic from shortly before
    // the last one, not from the topic's beginning.
    let log = node.log.lock().unwrap().clone();
    assert!(log.contains("shortly before the last sealed segment"), "{log}");
    let events = same_answer((&url, &token), (&node.url, &node_token), ALL_EVENTS);
    assert!(events.len() > 1_300, "{} rows", events.len());
    same_answer((&url, &token), (&node.url, &node_token), ALL_AGENTS);

    // Realm scoping holds on the query node with its own realm-scoped token.
    let (status, created) = post(
        &node.url,
        "/v1/tokens",
        Some(&node_token),
        json!({"role": "analyst", "realms": ["eng"]}).to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{created}");
    let analyst = created["token"].as_str().unwrap().to_owned();
    let scoped = rows(&node.url, &analyst, "SELECT DISTINCT realm FROM events").unwrap();
    assert_eq!(scoped, vec![json!({"realm": "eng"})]);
    let count = |url: &str, token: &str, sql: &str| rows(url, token, sql).unwrap()[0]["n"].clone();
    assert_eq!(
        count(&node.url, &analyst, "SELECT count(*) AS n FROM events"),
        count(&url, &token, "SELECT count(*) AS n FROM events WHERE realm = 'eng'")
    );
    let (status, _) = get(&node.url, "/v1/events?realm=ops", &analyst);
    assert!(status == 403 || status == 200, "{status}");
    if status == 200 {
        assert!(
            get(&node.url, "/v1/events?realm=ops", &analyst).1["events"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }

    // New events and a revocation reach the query node through the topic.
    let started = Instant::now();
    let (status, answer) = post(&url, "/v1/events", None, signed_lines(&mut signers[0], 1)).unwrap();
    assert_eq!(status, 200, "{answer}");
    let index = answer[0]["log_index"].as_u64().unwrap();
    wait_for("the new event on the query node", || {
        rows(
            &node.url,
            &node_token,
            &format!("SELECT log_index FROM events WHERE log_index = {index}"),
        )
        .is_some_and(|rows| rows.len() == 1)
    });
    eprintln!(
        "freshness: visible on the query node {:?} after the writer's answer",
        started.elapsed()
    );
    // A burst of one agent's largest events: their committed records are cut to fit the
    // broker's record size (one record of them all would be refused, and would stop the
    // committed topic for every reader).
    let blob = "x".repeat(40 * 1024);
    let burst: Vec<String> = (0..24)
        .map(|index| {
            let object = json!({"kind": "tool_call", "action": format!("large-{index}"), "attrs": {"blob": blob}});
            signers[0]
                .sign_object(object.as_object().unwrap().clone(), chrono::Utc::now())
                .unwrap()
                .to_json()
        })
        .collect();
    let (status, answer) = post(&url, "/v1/events", None, burst.join("\n").into_bytes()).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer
            .as_array()
            .unwrap()
            .iter()
            .all(|result| result["status"] == "accepted"),
        "{answer}"
    );
    wait_for("the burst of large events on the query node", || {
        rows(
            &node.url,
            &node_token,
            "SELECT count(*) AS n FROM events WHERE action LIKE 'large-%'",
        )
        .is_some_and(|rows| rows[0]["n"] == 24)
    });
    let revoked = signers[1].did().to_owned();
    let (status, answer) = post(
        &url,
        &format!("/v1/agents/{revoked}/revoke"),
        Some(&token),
        json!({"reason": "test"}).to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    wait_for("the revocation on the query node", || {
        rows(
            &node.url,
            &node_token,
            &format!("SELECT status FROM agents WHERE did = '{revoked}'"),
        )
        .is_some_and(|rows| rows == vec![json!({"status": "revoked"})])
    });

    // Evidence bundles are signed by the writer's node key: the query node says so.
    let (status, answer) = post(
        &node.url,
        "/v1/evidence",
        Some(&node_token),
        json!({"realm": "eng", "agent": null, "from": "2020-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"})
            .to_string()
            .into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 501, "{answer}");
    assert_eq!(answer["error"], "writer_only");

    // Stateless: SIGKILL it, throw its copy away, start it again: the same answers.
    node.kill();
    std::fs::remove_dir_all(node_dir.join("replica")).unwrap();
    let node = query_node(&node_dir, &broker.addr, &archive);
    same_answer((&url, &token), (&node.url, &node_token), ALL_EVENTS);
    same_answer((&url, &token), (&node.url, &node_token), ALL_AGENTS);
    let log = node.stop();
    assert!(!log.contains("panicked"), "{log}");

    // `--roles ingest,query`: one listener takes events and answers SQL.
    let both_dir = dir.path().join("ingest-query");
    let both = Server::start_with(
        &both_dir,
        &[
            "--kafka",
            &broker.addr,
            "--kafka-prefix",
            PREFIX,
            "--roles",
            "ingest,query",
            "--object-store",
            &archive,
        ],
    );
    let both_token = both.token();
    wait_for("the ingest node to know the agents", || {
        let (status, answer) = post(&both.url, "/v1/events", None, signed_lines(&mut signers[2], 1)).unwrap();
        status == 200 && answer[0]["status"] == "accepted"
    });
    same_answer((&url, &token), (&both.url, &both_token), ALL_EVENTS);
    let log = both.stop();
    assert!(!log.contains("panicked"), "{log}");
    writer.stop();
    let refused =
        |name: &str, extra: &[&str]| refused_query_node(&dir.path().join(name), &broker.addr, PREFIX, &archive, extra);
    let stranger = custos_store::checkpoint::NoteKey {
        name: "custos/stranger".into(),
        public: AgentKey::from_seed(&[9; 32]).public_key(),
    };

    // The key a node read first is trusted across restarts. Whoever can write the bucket
    // puts a whole store of their own making there (valid, signed by another key): the
    // node, its disposable copy thrown away, refuses it rather than trusting its key.
    let archive_dir = dir.path().join("archive");
    let remembered = std::fs::read_to_string(both_dir.join("trusted-log-keys/0.pub")).unwrap();
    let original = std::fs::read_to_string(archive_dir.join("logs/0/checkpoint.pub")).unwrap();
    assert_eq!(remembered.trim(), original.trim());
    let forged_dir = dir.path().join("forged");
    let forger = Server::start_with(
        &dir.path().join("forger"),
        &[
            "--no-detect",
            "--object-store",
            &format!("file://{}", forged_dir.display()),
        ],
    );
    let forger_token = forger.token();
    let mut puppet = Signer::new(AgentKey::from_seed(&[66; 32]), "eng");
    enroll(&forger.url, &forger_token, puppet.did(), "eng");
    for _ in 0..6 {
        let (status, answer) = post(&forger.url, "/v1/events", None, signed_lines(&mut puppet, 100)).unwrap();
        assert_eq!(status, 200, "{answer}");
    }
    wait_for("the forged store's sealed segment", || {
        forged_dir.join("logs/0/segments.ndjson").exists()
    });
    forger.stop();
    let kept_dir = dir.path().join("archive-kept");
    std::fs::rename(&archive_dir, &kept_dir).unwrap();
    std::fs::rename(&forged_dir, &archive_dir).unwrap();
    std::fs::remove_dir_all(both_dir.join("replica")).unwrap();
    let swapped = refused("ingest-query", &[]);
    assert!(swapped.contains("log key this node trusts"), "{swapped}");
    std::fs::remove_dir_all(&archive_dir).unwrap();
    std::fs::rename(&kept_dir, &archive_dir).unwrap();

    // A segment changed in the object store (same size, one byte): a query node starting
    // from it refuses, naming the segment.
    let segments = dir.path().join("archive/logs/0/segments");
    let segment = std::fs::read_dir(&segments)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|extension| extension == "parquet"))
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&segment, bytes).unwrap();
    let stderr = refused("query-tampered", &[]);
    let name = segment.file_name().unwrap().to_str().unwrap();
    // A node pinned to another key refuses the copy before reading any segment.
    let pinned = refused("query-pinned", &["--log-key", &stranger.verifier_string()]);
    assert!(pinned.contains("log key this node trusts"), "{pinned}");
    assert!(stderr.contains(name) && stderr.contains("blake3"), "{stderr}");
    drop(broker);
}

/// A query node (`--roles query`) on `archive` that must stop at start: its error output.
/// One still running after a minute took the store instead: killed, and the test fails.
fn refused_query_node(data: &std::path::Path, brokers: &str, prefix: &str, archive: &str, extra: &[&str]) -> String {
    let log = data.with_extension("refused.log");
    let mut child = crate::support::custos()
        .args(["serve", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--kafka", brokers, "--kafka-prefix", prefix])
        .args(["--roles", "query", "--object-store", archive])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    match status {
        Some(status) => assert!(!status.success(), "{stderr}"),
        None => panic!("the query node started on a store it should have refused: {stderr}"),
    }
    stderr
}

/// Posts `body` to an ingest node until every event in it is stored (an ingest node
/// learns an enrollment from the control topic, so the first tries may be refused).
fn stored_through(url: &str, body: &[u8]) {
    wait_for("the ingest node to store the batch", || {
        let (status, answer) = post(url, "/v1/events", None, body.to_vec()).unwrap();
        status == 200
            && answer
                .as_array()
                .unwrap()
                .iter()
                .all(|result| result["status"] == "accepted" || result["status"] == "duplicate")
    });
}

/// The API of the node writing partition `partition`'s log in one of the
/// `--log-per-partition` writer processes (printed as it takes the partition), and the
/// set's admin token (the partitions' nodes share the writers' edge token table).
fn partition_api(writers: &[&Server], store: &std::path::Path, partition: u32) -> (String, String) {
    let prefix = format!("partition {partition}: this process writes its log");
    let holder = || {
        writers
            .iter()
            .map(|writer| writer.log.lock().unwrap().clone())
            .find(|log| log.lines().any(|line| line.starts_with(&prefix)))
    };
    wait_for("the partition's node", || holder().is_some());
    let log = holder().unwrap();
    let line = log.lines().rfind(|line| line.starts_with(&prefix)).unwrap();
    let url = line.rsplit("API on ").next().unwrap().trim_end_matches(')').to_owned();
    // The partitions' nodes share the set's token table with the writers' edge.
    let token = std::fs::read_to_string(store.join("edge/admin.token")).unwrap();
    (url, token.trim().to_owned())
}

/// A query node over a partition set (`--log-per-partition`) written by two writer
/// processes (partitions 0 and 1, and 2), each copying only its own partitions to the
/// object store: a replica per partition, each fed by its own partition of the
/// committed topic. Every partition answers on it as that partition's writer does, row
/// for row. A request reads the partition it
/// names, else that of the realm it asks about, else that of its caller's realm, and
/// the answer says which. SQL naming none reads every partition of its caller's realms,
/// each row saying its partition (log indexes repeat across partitions); REST reads
/// with a cursor need one partition. New events reach the right replica. A query node
/// started as if the store were one log refuses the set, naming the flag.
#[test]
fn a_query_node_over_a_partition_set_answers_each_partition_as_its_writer() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let prefix = "query-parts-test";
    let archive = format!("file://{}", dir.path().join("archive").display());
    let store = dir.path().join("writers");
    let writer_of = |partitions: &str| {
        crate::cluster::partition_writer_with(&store, &broker.addr, prefix, partitions, &["--object-store", &archive])
    };
    let writer = writer_of("0,1");
    let other = writer_of("2");
    let token = std::fs::read_to_string(store.join("edge/admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    // One realm on each partition.
    let realms = crate::cluster::realms_per_partition(3);
    let mut signers: Vec<Signer> = realms
        .iter()
        .enumerate()
        .map(|(n, realm)| {
            let key = AgentKey::from_seed(&[150 + n as u8; 32]);
            enroll(&writer.url, &token, key.did(), realm);
            Signer::new(key, realm)
        })
        .collect();
    // Partitions 0 and 2 (one per writer process) get a sealed segment (500 entries)
    // and a tail; partition 1 a tail only.
    for (n, signer) in signers.iter_mut().enumerate() {
        for _ in 0..if n == 1 { 1 } else { 6 } {
            stored_through(&writer.url, &signed_lines(signer, 110));
        }
    }
    for partition in [0, 2] {
        let sealed = dir
            .path()
            .join(format!("archive/partitions/{partition}/logs/0/segments.ndjson"));
        wait_for("each writer to copy its partition's sealed segment", || {
            std::fs::read_to_string(&sealed).is_ok_and(|text| text.lines().count() >= 1)
        });
    }

    // Pinned: each partition's log key, in partition order, as an operator would.
    let keys: Vec<String> = (0..3)
        .map(|partition| {
            let path =
                custos_store::partitions::PartitionSet::store_dir(&store, partition).join("logs/0/checkpoint.pub");
            std::fs::read_to_string(path).unwrap().trim().to_owned()
        })
        .collect();
    let node = Server::start_with(
        &dir.path().join("query"),
        &[
            "--kafka",
            &broker.addr,
            "--kafka-prefix",
            prefix,
            "--roles",
            "query",
            "--log-per-partition",
            "--object-store",
            &archive,
            "--log-key",
            &keys.join(","),
        ],
    );
    let node_token = node.token();
    wait_for("the query node to be ready", || {
        reqwest::blocking::get(format!("{}/readyz", node.url)).is_ok_and(|response| response.status() == 200)
    });
    assert!(
        node.log.lock().unwrap().contains("a partition set of 3 logs"),
        "{}",
        node.log.lock().unwrap()
    );

    // Each partition, named, answers as its writer does, each row saying its partition.
    for partition in 0..3u32 {
        let (url, partition_token) = partition_api(&[&writer, &other], &store, partition);
        let (_, _, every) = sql_in(&node.url, &node_token, "SELECT * FROM events", Some(partition)).unwrap();
        assert!(
            every
                .as_array()
                .is_some_and(|rows| rows.iter().all(|row| row["partition"] == partition)),
            "partition {partition}: {every}"
        );
        for sql in [ALL_EVENTS, ALL_AGENTS] {
            let expected = rows(&url, &partition_token, sql).expect("the partition's writer answers");
            assert!(!expected.is_empty(), "partition {partition}: {sql}");
            wait_for("the query node's partition to answer as its writer", || {
                sql_in(&node.url, &node_token, sql, Some(partition)).is_some_and(|(status, answered, body)| {
                    status == 200
                        && answered == Some(partition.to_string())
                        && without_partition(&body, partition) == json!(expected)
                })
            });
        }
    }
    let (_, _, events) = sql_in(&node.url, &node_token, ALL_EVENTS, Some(0)).unwrap();
    assert_eq!(
        events.as_array().unwrap().len(),
        660,
        "partition 0 holds its realm's events"
    );

    // An admin naming no partition: SQL reads every partition's log, each row saying
    // whose it is; a bad partition is named.
    let (status, answered, body) = sql_in(
        &node.url,
        &node_token,
        "SELECT partition, realm, count(*) AS n, min(log_index) AS first FROM events \
         GROUP BY partition, realm ORDER BY partition",
        None,
    )
    .unwrap();
    assert_eq!((status, answered.as_deref()), (200, Some("0,1,2")), "{body}");
    let first = body[0]["first"].clone();
    assert_eq!(
        body,
        json!([
            {"partition": 0, "realm": realms[0], "n": 660, "first": first},
            {"partition": 1, "realm": realms[1], "n": 110, "first": first},
            {"partition": 2, "realm": realms[2], "n": 660, "first": first},
        ]),
        "each partition's log has its own log indexes, from the same start"
    );
    // Joins, filters on the partition and every table span the set.
    let (status, _, body) = sql_in(
        &node.url,
        &node_token,
        "SELECT a.partition, a.realm, count(*) AS n FROM events e JOIN agents a \
         ON e.agent = a.did AND e.partition = a.partition \
         WHERE e.partition <> 1 GROUP BY a.partition, a.realm ORDER BY a.partition",
        None,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!([
            {"partition": 0, "realm": realms[0], "n": 660},
            {"partition": 2, "realm": realms[2], "n": 660},
        ])
    );
    // The checkpoints table is each partition's own, side by side.
    let (_, _, body) = sql_in(
        &node.url,
        &node_token,
        "SELECT partition, max(size) AS size FROM checkpoints GROUP BY partition ORDER BY partition",
        None,
    )
    .unwrap();
    // The access log names the partitions a query read.
    let access = std::fs::read_to_string(dir.path().join("query/access.ndjson")).unwrap();
    let last: Value = serde_json::from_str(access.lines().last().unwrap()).unwrap();
    assert_eq!(last["partitions"], json!([0, 1, 2]), "{last}");
    let one_by_one: Vec<Value> = (0..3u32)
        .filter_map(|partition| {
            let (_, _, body) = sql_in(
                &node.url,
                &node_token,
                "SELECT max(size) AS size FROM checkpoints HAVING count(*) > 0",
                Some(partition),
            )
            .unwrap();
            body.as_array()?
                .first()
                .map(|row| json!({"partition": partition, "size": row["size"]}))
        })
        .collect();
    assert!(!one_by_one.is_empty());
    assert_eq!(body, json!(one_by_one));
    let (status, _, answer) = sql_in(&node.url, &node_token, "SELECT 1", Some(7)).unwrap();
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("bad_partition")),
        "{answer}"
    );
    assert!(answer["message"].as_str().unwrap().contains("`7`"), "{answer}");

    // A token limited to one realm reads that realm's partition without naming it.
    let (status, created) = post(
        &node.url,
        "/v1/tokens",
        Some(&node_token),
        json!({"role": "analyst", "realms": [realms[1]]})
            .to_string()
            .into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{created}");
    let analyst = created["token"].as_str().unwrap().to_owned();
    let (status, answered, body) = sql_in(
        &node.url,
        &analyst,
        "SELECT realm, count(*) AS n FROM events GROUP BY realm",
        None,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(answered.as_deref(), Some("1"));
    assert_eq!(body, json!([{"realm": realms[1], "n": 110}]));
    // One limited to two realms reads their two partitions, and nothing of the third.
    let (status, created) = post(
        &node.url,
        "/v1/tokens",
        Some(&node_token),
        json!({"role": "analyst", "realms": [realms[2], realms[0]]})
            .to_string()
            .into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{created}");
    let two_realms = created["token"].as_str().unwrap().to_owned();
    let (status, answered, body) = sql_in(
        &node.url,
        &two_realms,
        "SELECT partition, count(*) AS n FROM events GROUP BY partition ORDER BY partition",
        None,
    )
    .unwrap();
    assert_eq!((status, answered.as_deref()), (200, Some("0,2")), "{body}");
    assert_eq!(body, json!([{"partition": 0, "n": 660}, {"partition": 2, "n": 660}]));
    let (_, _, body) = sql_in(&node.url, &two_realms, "SELECT count(*) AS n FROM agents", Some(1)).unwrap();
    assert_eq!(
        body,
        json!([{"n": 0}]),
        "partition 1, named, shows none of its other realm"
    );

    // REST: the realm asked about picks the partition.
    let response = reqwest::blocking::Client::new()
        .get(format!("{}/v1/events?realm={}&limit=1000", node.url, realms[2]))
        .bearer_auth(&node_token)
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-custos-partition"], "2");
    let page: Value = response.json().unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 660);
    assert!(events.iter().all(|event| event["realm"] == realms[2].as_str()));
    // The access log says which partition each read went to.
    let access = std::fs::read_to_string(dir.path().join("query/access.ndjson")).unwrap();
    let last: Value = serde_json::from_str(access.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["route"].as_str(), last["partition"].as_u64()),
        (Some("/v1/events"), Some(2)),
        "{last}"
    );

    // A new event reaches its partition's replica through the committed topic.
    stored_through(&writer.url, &signed_lines(&mut signers[2], 1));
    wait_for("the new event on the query node", || {
        sql_in(&node.url, &node_token, "SELECT count(*) AS n FROM events", Some(2))
            .is_some_and(|(status, _, body)| status == 200 && body == json!([{"n": 661}]))
    });
    // Verifying the store from the page or the API checks the whole copied set (a
    // cross-partition checkpoint is copied only once every head it binds is: partition
    // 1 has sealed nothing yet, so none binds it here).
    let verified = reqwest::blocking::Client::new()
        .post(format!("{}/v1/integrity/verify", node.url))
        .bearer_auth(&node_token)
        .timeout(Duration::from_secs(120))
        .send()
        .unwrap();
    let verified: Value = verified.json().unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
    assert!(verified["entries"].as_u64().unwrap() >= 1_000, "{verified}");

    // The console on this node: an admin without a partition sees every partition's
    // fleet; naming one at sign-in, that partition's.
    console_on_a_partition(&node.url, &node_token, signers[2].did(), dir.path());
    let log = node.stop();
    assert!(!log.contains("panicked"), "{log}");

    let refused =
        |name: &str, extra: &[&str]| refused_query_node(&dir.path().join(name), &broker.addr, prefix, &archive, extra);
    // The same object store read as one log: refused, naming the flag.
    let stderr = refused("query-one-log", &[]);
    assert!(
        stderr.contains("partition set of 3 logs") && stderr.contains("--log-per-partition"),
        "{stderr}"
    );
    // Partition 0's and 2's keys swapped: a log signed by a key not pinned for it.
    let swapped = [keys[2].clone(), keys[1].clone(), keys[0].clone()].join(",");
    let stderr = refused("query-swapped", &["--log-per-partition", "--log-key", &swapped]);
    assert!(stderr.contains("log key this node trusts"), "{stderr}");
    // Two keys for three partitions: refused before anything is read.
    let stderr = refused(
        "query-short",
        &["--log-per-partition", "--log-key", &keys[..2].join(",")],
    );
    assert!(
        stderr.contains("names 2 keys") && stderr.contains("3 partitions"),
        "{stderr}"
    );
    // Each writer took its preferred partitions, so each copied its own.
    assert!(
        other
            .log
            .lock()
            .unwrap()
            .contains("partition 2: this process writes its log")
    );
    assert!(
        !other
            .log
            .lock()
            .unwrap()
            .contains("partition 0: this process writes its log")
    );
    // Stopped (partition 2's writer first, so that the writer of partition 0 binds its
    // final head), every log is sealed and copied, and the copy holds cross-partition
    // checkpoints binding them: `custos verify` of the object store checks them all.
    other.stop();
    writer.stop();
    let output = crate::support::run(&["verify", &archive, "--json"]);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(output.status.success(), "{report:#}");
    assert_eq!(report["partitions"]["partitions"], 3, "{report:#}");
    assert!(report["partitions"]["checkpoints"].as_u64().unwrap() >= 1, "{report:#}");
}

/// `rows` (SQL rows as JSON) without their `partition` column, checking it says
/// `partition` in every row that has it (`SELECT *` has it; a query naming its columns
/// has it only when it names it).
fn without_partition(rows: &Value, partition: u32) -> Value {
    let mut rows = rows.clone();
    for row in rows.as_array_mut().into_iter().flatten() {
        let row = row.as_object_mut().unwrap();
        if let Some(named) = row.remove("partition") {
            assert_eq!(named, json!(partition), "{row:?}");
        }
    }
    rows
}

/// Signs in to the console at `url` with `token`: without a partition, the fleet is
/// every partition's (read through SQL, which spans the set) and the integrity page,
/// which reads one log, says to name one; with partition 2, the fleet is that
/// partition's (`did` alone) and the header says so.
fn console_on_a_partition(url: &str, token: &str, did: &str, dir: &std::path::Path) {
    use crate::console::{click, eventually, in_browser, sign_in, text_of};
    use fantoccini::Locator;
    in_browser(url, &dir.join("chromium"), async |client| {
        sign_in(&client, token, "").await;
        let whoami = eventually("signed in without a partition", || async {
            text_of(&client, "#whoami").await.filter(|text| !text.is_empty())
        })
        .await;
        assert!(whoami.contains("every partition"), "{whoami}");
        eventually("every partition's fleet", || async {
            let rows = client.find_all(Locator::Css("#fleet-table tbody tr")).await.ok()?;
            (rows.len() == 3).then_some(())
        })
        .await;
        click(&client, "a[href='#integrity']").await;
        let refused = eventually("the integrity page's refusal", || async {
            text_of(&client, "#integrity-view .view-error")
                .await
                .filter(|text| text.contains("partition_required"))
        })
        .await;
        assert!(refused.contains("sign in naming a partition"), "{refused}");
        click(&client, "#signout").await;
        sign_in(&client, token, "2").await;
        eventually("signed in to partition 2", || async {
            text_of(&client, "#whoami")
                .await
                .filter(|text| text.contains("partition 2"))
        })
        .await;
        click(&client, "a[href='#fleet']").await;
        let row = eventually("partition 2's fleet", || async {
            let rows = client.find_all(Locator::Css("#fleet-table tbody tr")).await.ok()?;
            (rows.len() == 1).then_some(())?;
            rows[0].attr("data-did").await.ok().flatten()
        })
        .await;
        assert_eq!(row, did);
    });
}
