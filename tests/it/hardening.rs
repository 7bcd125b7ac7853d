//! The front door under attack, against a real `custos serve`: idle, slowloris and
//! slow-body sockets, a descriptor limit of 1 024, parallel huge bodies, and a flood of
//! junk from one address.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use custos_event::{AgentKey, Signer};
use serde_json::json;

use crate::respond::enroll;
use crate::support::Server;

/// `custos serve` under `ulimit -n LIMIT` (soft and hard: it cannot raise it).
fn start_limited(data: &std::path::Path, limit: u32, extra: &[&str]) -> Server {
    let mut command = std::process::Command::new("sh");
    let binary = env!("CARGO_BIN_EXE_custos");
    let mut script = format!("ulimit -n {limit} && exec '{binary}' serve --data '{}'", data.display());
    for arg in [
        "--listen",
        "127.0.0.1:0",
        "--segment-max-entries",
        "500",
        "--checkpoint-every",
        "100",
        "--no-detect",
    ]
    .iter()
    .chain(extra)
    {
        script.push_str(&format!(" '{arg}'"));
    }
    command.arg("-c").arg(script);
    Server::spawn(command, data)
}

fn connect(url: &str) -> TcpStream {
    let address = url.trim_start_matches("http://");
    let stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
}

/// Reads until the peer closes (or `limit` passes); returns what arrived.
fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Some(String::from_utf8_lossy(&seen).into_owned()),
            Ok(read) => seen.extend_from_slice(&buffer[..read]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&seen).into_owned());
            }
            Err(_) => return None,
        }
    }
}

/// `count` signed events of `signer`, as NDJSON.
pub(crate) fn signed_lines(signer: &mut Signer, count: usize) -> Vec<u8> {
    (0..count)
        .map(|index| {
            signer
                .sign_object(
                    json!({"kind": "tool_call", "action": format!("step-{index}")})
                        .as_object()
                        .unwrap()
                        .clone(),
                    chrono::Utc::now(),
                )
                .unwrap()
                .to_json()
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// At a descriptor limit of 1 024, 1 100 idle sockets take every connection slot but
/// never the store's descriptors: segments keep sealing while they are open, the ones
/// beyond the limit get a 503 at once, and all of them are closed after the header
/// timeout. Slowloris heads and idle keep-alive connections are closed the same way; a
/// body sent too slowly gets 408.
#[test]
fn idle_and_slow_sockets_never_starve_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    // The header timeout is long enough that, even on a loaded machine, the first idle
    // sockets still hold their slots when the last ones arrive.
    let server = start_limited(&data, 1024, &["--header-timeout-secs", "8", "--body-timeout-secs", "2"]);
    let admin = server.token();
    let url = server.url.clone();
    let key = AgentKey::generate().unwrap();
    enroll(&url, &admin, key.did(), "eng");
    let mut signer = Signer::new(key, "eng");

    // One keep-alive client connection, opened before the flood, keeps its slot.
    let client = reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let post = |body: Vec<u8>| {
        let response = client.post(format!("{url}/v1/events")).body(body).send().unwrap();
        assert_eq!(response.status(), 200);
        let results: Vec<serde_json::Value> = response.json().unwrap();
        results
    };
    assert_eq!(post(signed_lines(&mut signer, 10))[0]["status"], "accepted");

    let mut idle: Vec<TcpStream> = (0..1100).map(|_| connect(&url)).collect();
    // Those over the limit are told so and closed at once.
    let mut refused = 0;
    for stream in &mut idle {
        stream.set_nonblocking(true).unwrap();
    }
    let mut answered = vec![false; idle.len()];
    let started = Instant::now();
    while refused < 1100 - 1024 && started.elapsed() < Duration::from_secs(10) {
        for (stream, answered) in idle.iter_mut().zip(&mut answered) {
            let mut buffer = [0u8; 256];
            if !*answered
                && let Ok(read) = stream.read(&mut buffer)
                && read > 0
            {
                let text = String::from_utf8_lossy(&buffer[..read]);
                assert!(text.starts_with("HTTP/1.1 503"), "{text}");
                assert!(text.to_ascii_lowercase().contains("retry-after: 1"), "{text}");
                *answered = true;
                refused += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(refused >= 1100 - 1024, "only {refused} refused");
    for stream in &mut idle {
        stream.set_nonblocking(false).unwrap();
    }

    // While they hold every other slot, the store seals segments (new WAL files,
    // Parquet files, indexes): 1 500 events over the kept connection, all accepted.
    for _ in 0..3 {
        for result in post(signed_lines(&mut signer, 500)) {
            assert_eq!(result["status"], "accepted", "{result}");
        }
    }
    // Seals run in the background: wait for them to be recorded.
    let started = Instant::now();
    loop {
        let segments = std::fs::read_to_string(data.join("logs/0/segments.ndjson")).unwrap_or_default();
        if segments.lines().count() >= 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no seal recorded: {segments}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // After the header timeout every idle socket is closed by the node.
    let started = Instant::now();
    for stream in &mut idle {
        let left = Duration::from_secs(15)
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(10));
        assert!(read_to_close(stream, left).is_some(), "an idle socket stayed open");
    }
    drop(idle);

    // Slowloris: a head that never ends, one byte at a time.
    let mut slow: Vec<TcpStream> = (0..200).map(|_| connect(&url)).collect();
    for stream in &mut slow {
        stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").unwrap();
    }
    let started = Instant::now();
    let mut open = slow.len();
    while open > 0 && started.elapsed() < Duration::from_secs(30) {
        open = 0;
        for stream in &mut slow {
            if stream.write_all(b"x").is_ok() {
                open += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(open, 0, "slowloris sockets still open after {:?}", started.elapsed());

    // An idle keep-alive connection after a complete request is closed too.
    let mut kept = connect(&url);
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut first = [0u8; 64];
    let read = kept.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"));
    assert!(read_to_close(&mut kept, Duration::from_secs(30)).is_some());

    // A body trickling in: 408 once the body timeout passes.
    let mut trickle = connect(&url);
    trickle
        .write_all(b"POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n[")
        .unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    trickle.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    while started.elapsed() < Duration::from_secs(15) {
        let _ = trickle.write_all(b" ");
        let mut buffer = [0u8; 512];
        if let Ok(read) = trickle.read(&mut buffer)
            && read > 0
        {
            answer.push_str(&String::from_utf8_lossy(&buffer[..read]));
            break;
        }
    }
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");

    // The node is healthy and nothing was lost.
    let response = client.get(format!("{url}/readyz")).send().unwrap();
    assert_eq!(response.status(), 200);
    let (_, metrics) = crate::respond::get(&url, "/metrics", &admin);
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("custos_http_connections_refused_total{reason=\"limit\"}"),
        "{metrics}"
    );
    let log = server.stop();
    assert!(!log.contains("store write failed"), "{log}");
    let output = crate::support::run(&["verify", data.to_str().unwrap()]);
    assert!(output.status.success(), "{}", crate::support::stdout(&output));
}

/// The resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// 120 parallel 31 MiB bodies: past the body budget, requests get 503 with Retry-After
/// at once instead of being buffered, so the node's memory stays bounded.
#[test]
fn parallel_huge_bodies_are_bounded_by_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let server = Server::start_with(&data, &["--no-detect", "--body-budget-mib", "128"]);
    let url = server.url.clone();
    let pid = server.child.id();
    let baseline = rss(pid);
    let body = vec![b' '; 31 * 1024 * 1024];
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak.fetch_max(rss(pid), std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let statuses: Vec<(u16, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..120)
            .map(|_| {
                let body = body.clone();
                let url = url.clone();
                scope.spawn(move || {
                    let response = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(120))
                        .build()
                        .unwrap()
                        .post(format!("{url}/v1/events"))
                        .header("content-type", "application/x-ndjson")
                        .body(body)
                        .send();
                    match response {
                        Ok(response) => (
                            response.status().as_u16(),
                            response
                                .headers()
                                .get("retry-after")
                                .map(|value| value.to_str().unwrap().to_owned()),
                        ),
                        // The node may answer 503 and close before the whole body is sent.
                        Err(_) => (0, None),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|handle| handle.join().unwrap()).collect()
    });
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().unwrap();
    let busy = statuses.iter().filter(|(status, _)| *status == 503).count();
    assert!(busy >= 60, "only {busy} of 120 were refused: {statuses:?}");
    for (status, retry) in &statuses {
        if *status == 503 {
            assert_eq!(retry.as_deref(), Some("1"));
        }
    }
    // Bodies that got in were read (and answered: whitespace holds no envelope).
    assert!(statuses.iter().any(|(status, _)| *status == 200), "{statuses:?}");
    let grown = peak.load(std::sync::atomic::Ordering::SeqCst).saturating_sub(baseline);
    assert!(
        grown < 600 * 1024 * 1024,
        "the node grew by {} MiB with a 128 MiB body budget",
        grown / (1024 * 1024)
    );
    let response = reqwest::blocking::get(format!("{url}/healthz")).unwrap();
    assert_eq!(response.status(), 200);
    server.stop();
}

/// One address sending junk is limited (429 with Retry-After, nothing more kept for
/// forensics) while another address and authenticated agents are not.
#[test]
fn junk_from_one_source_is_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let server = Server::start_with(&data, &["--no-detect", "--reject-rate", "2", "--reject-burst", "20"]);
    let url = server.url.clone();
    let admin = server.token();
    let stranger = AgentKey::generate().unwrap();
    let mut junk_signer = Signer::new(stranger, "eng");
    let from = |address: &str| {
        reqwest::blocking::Client::builder()
            .local_address(address.parse::<std::net::IpAddr>().unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let attacker = from("127.0.0.2");
    let send = |client: &reqwest::blocking::Client, body: Vec<u8>| {
        let response = client.post(format!("{url}/v1/events")).body(body).send().unwrap();
        let status = response.status().as_u16();
        let retry = response
            .headers()
            .get("retry-after")
            .map(|value| value.to_str().unwrap().to_owned());
        (status, retry, response.text().unwrap())
    };
    // 30 envelopes by an unknown key: answered (each `unknown_agent`), and the source
    // has now spent more than its burst.
    let (status, _, text) = send(&attacker, signed_lines(&mut junk_signer, 30));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("unknown_agent"));
    let (status, retry, text) = send(&attacker, b"garbage".to_vec());
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("rate_limited") && text.contains("127.0.0.2"), "{text}");
    let wait: u64 = retry.unwrap().parse().unwrap();
    assert!((1..=10).contains(&wait), "{wait}");
    let (_, rejected) = crate::respond::get(&url, "/v1/rejected?limit=10000", &admin);
    let kept = rejected["rejected"].as_array().unwrap().len();
    assert_eq!(kept, 30, "the refused request is not kept item by item");

    // Another address is unaffected, and so is an enrolled agent from any address.
    let other = from("127.0.0.3");
    let (status, _, text) = send(&other, b"garbage".to_vec());
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("malformed"), "{text}");
    let key = AgentKey::generate().unwrap();
    enroll(&url, &admin, key.did(), "eng");
    let mut agent = Signer::new(key, "eng");
    let (status, _, text) = send(&other, signed_lines(&mut agent, 3));
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("rejected"), "{text}");

    // The budget refills at its rate.
    std::thread::sleep(Duration::from_secs(wait + 1));
    let (status, _, text) = send(&attacker, b"garbage".to_vec());
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("malformed"), "{text}");
    server.stop();
}

/// A tmpfs of a few MiB, mounted for one test (the tests run as root on this kind of
/// machine) and unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs failed: this test needs root");
        Self { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the disk with one more file, leaving about `leave` bytes free.
    fn fill(&self, leave: u64) {
        let free = self.free();
        let size = free.saturating_sub(leave);
        let mut number = 0;
        while self.path().join(format!("filler-{number}")).exists() {
            number += 1;
        }
        let mut file = std::fs::File::create(self.path().join(format!("filler-{number}"))).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0;
        while written < size {
            let take = chunk.len().min((size - written) as usize);
            if file.write_all(&chunk[..take]).is_err() {
                break;
            }
            written += take as u64;
        }
    }

    fn free(&self) -> u64 {
        let output = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .nth(1)
            .and_then(|line| line.trim().parse().ok())
            .unwrap()
    }

    fn empty(&self) {
        for entry in std::fs::read_dir(self.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with("filler-") {
                std::fs::remove_file(path).unwrap();
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// On a full disk the node refuses writes (503, Retry-After) but keeps answering reads;
/// it takes writes again by itself once space returns; SIGTERM on a full disk exits 0
/// and says what it could not seal; and every acknowledged event is there afterwards.
#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_recovers_by_itself() {
    let disk = SmallDisk::mount("24m");
    let data = disk.path().join("store");
    // One open segment for the whole test: nothing is sealed before the shutdown.
    let mut command = crate::support::custos();
    command.arg("serve").arg("--data").arg(&data).args([
        "--listen",
        "127.0.0.1:0",
        "--no-detect",
        "--segment-max-entries",
        "1000000",
    ]);
    let server = Server::spawn(command, &data);
    let admin = server.token();
    let url = server.url.clone();
    let key = AgentKey::generate().unwrap();
    enroll(&url, &admin, key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let acknowledged = std::cell::Cell::new(0u64);
    // Sends 50 events; returns the status and the Retry-After of a refusal.
    let send = |signer: &mut Signer| -> (u16, Option<String>) {
        let state = signer.chain().clone();
        let response = client
            .post(format!("{url}/v1/events"))
            .body(signed_lines(signer, 50))
            .send()
            .unwrap();
        let status = response.status().as_u16();
        let retry = response
            .headers()
            .get("retry-after")
            .map(|value| value.to_str().unwrap().to_owned());
        let text = response.text().unwrap();
        if status == 200 {
            let results: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
            for result in &results {
                assert_eq!(result["status"], "accepted", "{result}");
            }
            acknowledged.set(acknowledged.get() + results.len() as u64);
        } else {
            assert_eq!(status, 503, "{text}");
            assert!(text.contains("store_failed"), "{text}");
            // Nothing of a refused request is stored: the agent sends it again later.
            *signer = Signer::resume(signer.key().clone(), "eng", state);
        }
        (status, retry)
    };
    assert_eq!(send(&mut signer).0, 200);

    disk.fill(256 * 1024);
    let mut refused = None;
    for _ in 0..400 {
        let (status, retry) = send(&mut signer);
        if status == 503 {
            refused = retry;
            break;
        }
    }
    assert_eq!(refused.as_deref(), Some("1"), "the disk never filled");
    // Writes refused, reads answered.
    assert_eq!(client.get(format!("{url}/readyz")).send().unwrap().status(), 503);
    assert_eq!(crate::respond::get(&url, "/v1/agents", &admin).0, 200);
    assert_eq!(crate::respond::get(&url, "/v1/checkpoints/latest", &admin).0, 200);
    let (status, rows) = crate::support::post(
        &url,
        "/v1/sql",
        Some(&admin),
        b"SELECT count(*) AS n FROM events".to_vec(),
    )
    .unwrap();
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows[0]["n"], acknowledged.get());

    // Space returns: writes resume without a restart.
    disk.empty();
    let started = Instant::now();
    loop {
        if send(&mut signer).0 == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "writes did not resume");
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..10 {
        assert_eq!(send(&mut signer).0, 200);
    }
    assert_eq!(client.get(format!("{url}/readyz")).send().unwrap().status(), 200);

    // Full again, to the last byte, then SIGTERM: a clean exit (0) that names exactly the
    // entries it could not seal and the WAL files that hold them.
    disk.fill(64 * 1024);
    for _ in 0..400 {
        if send(&mut signer).0 == 503 {
            break;
        }
    }
    disk.fill(0);
    let log = server.stop();
    assert!(log.contains("could not seal log indexes"), "{log}");
    assert!(log.contains(".wal") && log.contains("next start seals them"), "{log}");

    // With space back, every acknowledged event is there, and the store verifies.
    disk.empty();
    let server = Server::start_with(&data, &["--no-detect"]);
    let (status, rows) = crate::support::post(
        &server.url,
        "/v1/sql",
        Some(&admin),
        b"SELECT count(*) AS n FROM events".to_vec(),
    )
    .unwrap();
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows[0]["n"], acknowledged.get());
    server.stop();
    let output = crate::support::run(&["verify", data.to_str().unwrap()]);
    assert!(output.status.success(), "{}", crate::support::stdout(&output));
}

fn sql_as(url: &str, token: &str, sql: &str) -> (u16, serde_json::Value, Option<String>) {
    let response = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
        .post(format!("{url}/v1/sql"))
        .bearer_auth(token)
        .body(sql.to_owned())
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().to_owned());
    let text = response.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        retry,
    )
}

fn healthy_within(url: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    let response = reqwest::blocking::Client::builder()
        .timeout(limit)
        .build()
        .unwrap()
        .get(format!("{url}/healthz"))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    started.elapsed()
}

/// Queries that overflowed the planner's stack (long chains of `+`, `AND`, `OR`, `UNION
/// ALL`) are refused as `bad_sql` before planning, by any role, the auditor included, and
/// the node lives on.
#[test]
fn queries_that_would_overflow_the_stack_are_refused_and_the_node_lives() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--no-detect"]);
    let admin = server.token();
    let url = server.url.clone();
    let (status, created) = crate::support::post(
        &url,
        "/v1/tokens",
        Some(&admin),
        json!({"role": "auditor"}).to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{created}");
    let auditor = created["token"].as_str().unwrap().to_owned();
    let chain = |term: &str, separator: &str, count: usize| vec![term; count].join(separator);
    for sql in [
        format!("SELECT {}", chain("1", "+", 2000)),
        format!("SELECT 1 WHERE {}", chain("true", " AND ", 2000)),
        format!("SELECT 1 WHERE {}", chain("false", " OR ", 2000)),
        chain("SELECT 1", " UNION ALL ", 5000),
        format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000)),
    ] {
        for token in [&admin, &auditor] {
            let (status, body, _) = sql_as(&url, token, &sql);
            assert_eq!(status, 400, "{}: {body}", &sql[..60]);
            assert_eq!(body["error"], "bad_sql", "{body}");
        }
    }
    // What the bounds let through still plans and runs.
    let (status, body, _) = sql_as(&url, &auditor, &format!("SELECT {} AS n", chain("1", "+", 200)));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["n"], 200);
    healthy_within(&url, Duration::from_secs(5));
    server.stop();
}

/// A query that would run for ever is stopped at the timeout, and while it runs (eight
/// of them at once) health checks and ingest answer promptly; queries beyond the
/// concurrency limits get 429; SIGTERM does not wait for a query.
#[test]
fn heavy_queries_are_bounded_in_time_and_number_and_never_freeze_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let server = Server::start_with(
        &data,
        &[
            "--no-detect",
            "--query-timeout-secs",
            "4",
            "--query-concurrency",
            "8",
            "--query-concurrency-per-token",
            "8",
        ],
    );
    let admin = server.token();
    let url = server.url.clone();
    let key = AgentKey::generate().unwrap();
    enroll(&url, &admin, key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    let cross =
        "SELECT count(*) FROM generate_series(1, 20000) a, generate_series(1, 20000) b, generate_series(1, 20000) c";
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    std::thread::scope(|scope| {
        let storm: Vec<_> = (0..8)
            .map(|_| {
                let (url, admin) = (url.clone(), admin.clone());
                scope.spawn(move || {
                    let started = Instant::now();
                    let (status, body, _) = sql_as(&url, &admin, cross);
                    (status, body, started.elapsed())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        // Health and ingest answer while eight heavy queries run.
        for _ in 0..5 {
            let took = healthy_within(&url, Duration::from_secs(5));
            assert!(took < Duration::from_secs(2), "healthz took {took:?}");
            let response = client
                .post(format!("{url}/v1/events"))
                .body(signed_lines(&mut signer, 20))
                .send()
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        for handle in storm {
            let (status, body, took) = handle.join().unwrap();
            assert_eq!(status, 408, "{body}");
            assert_eq!(body["error"], "query_timeout");
            assert!(
                took < Duration::from_secs(15),
                "the timeout took {took:?} to stop the query"
            );
        }
    });

    // Limits on how many run: per token, then overall.
    server.stop();
    let server = Server::start_with(
        &data,
        &[
            "--no-detect",
            "--query-timeout-secs",
            "4",
            "--query-concurrency",
            "2",
            "--query-concurrency-per-token",
            "1",
        ],
    );
    let url = server.url.clone();
    let (_, second, _) = {
        let (status, body) = crate::support::post(
            &url,
            "/v1/tokens",
            Some(&admin),
            json!({"role": "analyst"}).to_string().into_bytes(),
        )
        .unwrap();
        assert_eq!(status, 201);
        (status, body["token"].as_str().unwrap().to_owned(), ())
    };
    let (_, third_token, _) = {
        let (status, body) = crate::support::post(
            &url,
            "/v1/tokens",
            Some(&admin),
            json!({"role": "analyst"}).to_string().into_bytes(),
        )
        .unwrap();
        assert_eq!(status, 201);
        (status, body["token"].as_str().unwrap().to_owned(), ())
    };
    std::thread::scope(|scope| {
        let first = scope.spawn(|| sql_as(&url, &admin, cross));
        std::thread::sleep(Duration::from_millis(800));
        // The same token again: refused at once.
        let (status, body, retry) = sql_as(&url, &admin, "SELECT 1");
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"], "too_many_queries");
        assert_eq!(retry.as_deref(), Some("1"));
        // Another token: runs (the second slot overall)...
        let other = scope.spawn(|| sql_as(&url, &second, cross));
        std::thread::sleep(Duration::from_millis(800));
        // ...and a third token finds both slots taken.
        let (status, body, _) = sql_as(&url, &third_token, "SELECT 1");
        assert_eq!(status, 429, "{body}");
        assert!(body["message"].as_str().unwrap().contains("2 queries"), "{body}");
        assert_eq!(first.join().unwrap().0, 408);
        assert_eq!(other.join().unwrap().0, 408);
    });
    // Slots come back.
    assert_eq!(sql_as(&url, &third_token, "SELECT 1 AS one").0, 200);

    // SIGTERM while a heavy query runs: the node stops within its grace period.
    std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            let _ = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap()
                .post(format!("{url}/v1/sql"))
                .bearer_auth(&admin)
                .body(cross)
                .send();
        });
        std::thread::sleep(Duration::from_millis(800));
        let started = Instant::now();
        server.stop();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "SIGTERM took {:?}",
            started.elapsed()
        );
        running.join().unwrap();
    });
}

/// A query whose computed values outgrow its memory limit is stopped (413), however the
/// engine allocates them; the node's own memory does not move.
#[test]
fn computed_values_count_against_the_query_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--no-detect", "--query-memory-mib", "512"]);
    let admin = server.token();
    let url = server.url.clone();
    let pid = server.child.id();
    let before = rss(pid);
    // Stopped by the memory limit (413 query_memory), not by the query timeout (which
    // answers 408 query_timeout): no wall-clock bound needed.
    let (status, body, _) = sql_as(
        &url,
        &admin,
        "SELECT repeat('x', 100000000) FROM generate_series(1, 12)",
    );
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "query_memory", "{body}");
    assert!(body["message"].as_str().unwrap().contains("512 MiB"), "{body}");
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 128 * 1024 * 1024,
        "the node grew by {} MiB",
        grown / (1024 * 1024)
    );
    // Aggregates and sorts stay within the engine's own pool: a clean 413 too.
    let (status, body, _) = sql_as(
        &url,
        &admin,
        "SELECT repeat('x', 1000) || CAST(value AS VARCHAR) AS pad FROM generate_series(1, 3000000) ORDER BY pad",
    );
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "query_memory", "{body}");
    // The next query is fine.
    assert_eq!(sql_as(&url, &admin, "SELECT 1 AS one").0, 200);
    server.stop();
}
