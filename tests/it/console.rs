//! The web console in a real headless Chromium, driven over WebDriver (chromedriver):
//! sign in, open a finding and its evidence, approve a pending action, and watch the
//! agent's status change. `scripts/test` installs Debian's `chromium` and
//! `chromium-driver`; without them this test fails and says so.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custos_event::{AgentKey, Signer};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::respond::{enroll, send, wait_for};
use crate::support::{Server, playbook_dir, post};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a free loopback port, killed on drop.
pub(crate) struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    pub(crate) fn start() -> Self {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(binary).exists(),
                "{binary} is missing: run scripts/test, which installs Debian's chromium and chromium-driver"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for("chromedriver to listen", || {
            TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
        });
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session in headless Chromium")
}

/// Opens `url` in a fresh headless Chromium (profile in `profile`) and runs `drive` on
/// it, then closes the browser.
pub(crate) fn in_browser(url: &str, profile: &std::path::Path, drive: impl AsyncFnOnce(Client)) {
    let driver = Driver::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = browser(&driver, profile).await;
        client.goto(url).await.unwrap();
        drive(client.clone()).await;
        client.close().await.unwrap();
    });
}

/// Polls `check` until it yields a value, failing after a minute with `what`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the element `css` selects.
pub(crate) async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|error| panic!("no `{css}` to click: {error}"))
        .click()
        .await
        .unwrap();
}

/// Opens the first finding of the findings timeline; answers its evidence events' text.
async fn open_a_finding(client: &Client) -> String {
    click(client, "a[href='#findings']").await;
    let open = eventually("a finding in the timeline", || async {
        client.find(Locator::Css("#findings-list a.open-finding")).await.ok()
    })
    .await;
    open.click().await.unwrap();
    eventually("the finding's evidence events", || async {
        text_of(client, "#finding-evidence tbody tr.evidence-row").await
    })
    .await
}

/// Fills the sign-in form with `token` (and `partition`, for a query node over a
/// partition set) and submits it.
pub(crate) async fn sign_in(client: &Client, token: &str, partition: &str) {
    for (id, value) in [("token", token), ("partition", partition)] {
        let field = client.find(Locator::Id(id)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }
    click(client, "#signin-button").await;
}

pub(crate) async fn text_of(client: &Client, css: &str) -> Option<String> {
    let element = client.find(Locator::Css(css)).await.ok()?;
    element.text().await.ok()
}

#[test]
fn sign_in_open_a_finding_approve_and_see_the_agent_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let playbooks = playbook_dir(
        dir.path(),
        "gate.yml",
        "name: gated-revoke\nmatch:\n  types: [credential_misuse]\nactions:\n  - require_approval:\n      expires_in_secs: 600\n  - revoke_agent: {}\n",
    );
    let server = Server::start_with(
        &dir.path().join("store"),
        &["--no-shipped-playbooks", "--playbooks", playbooks.to_str().unwrap()],
    );
    let (url, admin) = (server.url.clone(), server.token());
    let (status, answer) = post(
        &url,
        "/v1/tokens",
        Some(&admin),
        json!({"role": "responder"}).to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{answer}");
    let responder = answer["token"].as_str().unwrap().to_owned();

    // A small fleet with ordinary traffic, and one agent that uses a credential it does
    // not own. The target holds markup: the console must show it as text.
    let mut bystanders = Vec::new();
    for seed in 40..43u8 {
        let key = AgentKey::from_seed(&[seed; 32]);
        enroll(&url, &admin, key.did(), "eng");
        let mut signer = Signer::new(key, "eng");
        let objects: Vec<Value> = (0..20)
            .map(|i| json!({"kind": "tool_call", "action": "search", "target": format!("doc{i}")}))
            .collect();
        send(&url, &mut signer, &objects);
        bystanders.push(signer);
    }
    let culprit = AgentKey::from_seed(&[49; 32]);
    let did = culprit.did().to_owned();
    enroll(&url, &admin, &did, "eng");
    let mut signer = Signer::new(culprit, "eng");
    let results = send(
        &url,
        &mut signer,
        &[
            json!({"kind": "credential_use", "target": "<img src=x onerror=alert(1)>cred-prod",
                 "attrs": {"credential_owner": "did:key:z6MkOwner"}}),
        ],
    );
    assert_eq!(results[0]["status"], "accepted", "{results:?}");
    wait_for("a pending approval", || {
        let (_, answer) = crate::respond::get(&url, "/v1/approvals", &admin);
        answer["pending"].as_array().is_some_and(|pending| !pending.is_empty())
    });

    in_browser(&url, &dir.path().join("chromium"), async |client| {
        // A wrong token is refused with a message; the right one signs in.
        client
            .find(Locator::Id("token"))
            .await
            .unwrap()
            .send_keys("cus_wrong")
            .await
            .unwrap();
        click(&client, "#signin-button").await;
        eventually("the refusal", || async {
            text_of(&client, "#signin-error")
                .await
                .filter(|text| text.contains("401"))
        })
        .await;
        let field = client.find(Locator::Id("token")).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(&responder).await.unwrap();
        click(&client, "#signin-button").await;

        // Fleet overview: every agent, the culprit at the top by risk.
        let first_row = eventually("the fleet table", || async {
            let rows = client.find_all(Locator::Css("#fleet-table tbody tr")).await.ok()?;
            (rows.len() == 4).then_some(())?;
            rows[0].attr("data-did").await.ok().flatten()
        })
        .await;
        assert_eq!(first_row, did, "the riskiest agent comes first");
        let status_cell = format!("#fleet-table tr[data-did='{did}'] td.status");
        assert_eq!(text_of(&client, &status_cell).await.as_deref(), Some("active"));

        // The agent's page: its baseline and its recent findings.
        let link = format!("#fleet-table tr[data-did='{did}'] a");
        client.find(Locator::Css(&link)).await.unwrap().click().await.unwrap();
        let facts = eventually("the agent's page", || async {
            text_of(&client, "#agent-facts")
                .await
                .filter(|text| text.contains("windows learned"))
        })
        .await;
        assert!(facts.contains("learning"), "{facts}");
        let recent = text_of(&client, "#agent-findings").await.unwrap();
        assert!(recent.contains("critical") || recent.contains("high"), "{recent}");

        // Findings timeline: open the finding, see its explanation and evidence events.
        let evidence = open_a_finding(&client).await;
        assert!(evidence.contains("credential_use"), "{evidence}");
        assert!(
            evidence.contains("<img src=x onerror=alert(1)>cred-prod"),
            "markup in a payload must show as text: {evidence}"
        );
        let images = client.find_all(Locator::Css("#finding-evidence img")).await.unwrap();
        assert!(images.is_empty(), "payload markup became an element");
        let title = text_of(&client, "#finding-title").await.unwrap();
        assert!(!title.is_empty());

        // Pending actions: approve the revocation.
        click(&client, "a[href='#actions']").await;
        let approve = eventually("the approve button", || async {
            client
                .find(Locator::Css("#pending-list li.approval button.approve"))
                .await
                .ok()
        })
        .await;
        approve.click().await.unwrap();
        eventually("the approval list to empty", || async {
            text_of(&client, "#pending-list")
                .await
                .filter(|text| text.contains("nothing is waiting"))
        })
        .await;

        // The agent's status changes in the fleet view, and the live feed saw it.
        click(&client, "a[href='#fleet']").await;
        eventually("the agent to show as revoked", || async {
            text_of(&client, &status_cell).await.filter(|text| text == "revoked")
        })
        .await;
        eventually("the live feed to report the revocation", || async {
            text_of(&client, "#live-list")
                .await
                .filter(|text| text.contains("revoked"))
        })
        .await;

        // Store integrity: the checkpoint, and a verification run from the page is refused
        // to a responder (admin only) with the reason shown.
        click(&client, "a[href='#integrity']").await;
        eventually("the tree size", || async {
            text_of(&client, "#integrity-tree-size")
                .await
                .filter(|text| text.parse::<u64>().is_ok_and(|size| size > 60))
        })
        .await;
        click(&client, "#verify-now").await;
        eventually("the refusal", || async {
            text_of(&client, "#integrity-error")
                .await
                .filter(|text| text.contains("403"))
        })
        .await;

        // SQL box: results as a table.
        click(&client, "a[href='#sql']").await;
        click(&client, "#sql-run").await;
        let table = eventually("SQL results", || async {
            text_of(&client, "#sql-result table")
                .await
                .filter(|text| text.contains("tool_call"))
        })
        .await;
        assert!(table.contains("60"), "{table}");
    });
    let (_, agent) = crate::respond::get(&url, &format!("/v1/agents/{did}"), &admin);
    assert_eq!(agent["status"], "revoked");
}

#[test]
fn the_console_is_static_and_locked_down() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--no-detect"]);
    let response = reqwest::blocking::get(format!("{}/", server.url)).unwrap();
    assert_eq!(response.status(), 200);
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let page = response.text().unwrap();
    assert!(
        page.contains("Sign in") && !page.contains("<script>"),
        "no inline script"
    );
    // The page holds no data: what it shows comes from the API, which wants a token.
    let response = reqwest::blocking::get(format!("{}/v1/integrity", server.url)).unwrap();
    assert_eq!(response.status(), 401);
    let (status, answer) = post(&server.url, "/v1/integrity/verify", Some(&server.token()), Vec::new()).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["ok"], true, "{answer}");
    let response = reqwest::blocking::Client::new()
        .get(format!("{}/v1/integrity", server.url))
        .bearer_auth(server.token())
        .send()
        .unwrap();
    let integrity: Value = response.json().unwrap();
    assert_eq!(integrity["last_verify"]["ok"], true, "{integrity}");
}

/// The console served by a stateless query node (`--roles query`), which has no agents,
/// findings or approvals routes: it finds that out from the node's `/openapi.json` and
/// reads the same facts through SQL. Sign in, see the fleet and an agent's page, a
/// finding of the detector with its evidence events, a revocation made on the writer,
/// the note that approvals are the writer's, and the store's checkpoint.
#[test]
fn the_console_on_a_query_node_reads_through_sql() {
    let dir = tempfile::tempdir().unwrap();
    let broker = crate::stages::Broker::start(dir.path());
    let archive = format!("file://{}", dir.path().join("archive").display());
    let cluster = |name: &str, roles: &str| {
        Server::start_with(
            &dir.path().join(name),
            &[
                "--kafka",
                &broker.addr,
                "--kafka-prefix",
                "console-query",
                "--roles",
                roles,
                "--object-store",
                &archive,
            ],
        )
    };
    let writer = cluster("writer", "writer,detector");
    let (url, admin) = (writer.url.clone(), writer.token());
    let mut dids = Vec::new();
    for seed in 60..63u8 {
        let key = AgentKey::from_seed(&[seed; 32]);
        enroll(&url, &admin, key.did(), "eng");
        dids.push(key.did().to_owned());
        let mut signer = Signer::new(key, "eng");
        // 3 × 200 events: a sealed segment (500 entries), so a checkpoint reaches the
        // object store.
        for _ in 0..2 {
            let objects: Vec<Value> = (0..100)
                .map(|i| json!({"kind": "tool_call", "action": "search", "target": format!("doc{i}")}))
                .collect();
            send(&url, &mut signer, &objects);
        }
    }
    // An agent using a credential it does not own: the detector's finding.
    let culprit = AgentKey::from_seed(&[69; 32]);
    enroll(&url, &admin, culprit.did(), "eng");
    let mut signer = Signer::new(culprit, "eng");
    let results = send(
        &url,
        &mut signer,
        &[json!({"kind": "credential_use", "target": "cred-prod", "attrs": {"credential_owner": "did:key:z6MkOwner"}})],
    );
    assert_eq!(results[0]["status"], "accepted", "{results:?}");
    wait_for("the detector's finding on the writer", || {
        let (_, answer) = crate::respond::get(&url, "/v1/findings", &admin);
        answer["findings"]
            .as_array()
            .is_some_and(|findings| !findings.is_empty())
    });
    let sealed = dir.path().join("archive/logs/0/segments.ndjson");
    wait_for("a sealed segment in the object store", || sealed.exists());
    let node = cluster("query", "query");
    let node_admin = node.token();
    wait_for("the query node to be ready", || {
        reqwest::blocking::get(format!("{}/readyz", node.url)).is_ok_and(|response| response.status() == 200)
    });

    in_browser(&node.url, &dir.path().join("chromium"), async |client| {
        sign_in(&client, &node_admin, "").await;
        let whoami = eventually("signed in", || async {
            text_of(&client, "#whoami").await.filter(|text| !text.is_empty())
        })
        .await;
        assert!(
            whoami.contains("query node") && whoami.contains("tree size"),
            "{whoami}"
        );

        // The fleet, from the agents table.
        eventually("the fleet table", || async {
            let rows = client.find_all(Locator::Css("#fleet-table tbody tr")).await.ok()?;
            (rows.len() == 4).then_some(())
        })
        .await;
        let events_cell = format!("#fleet-table tr[data-did='{}'] td:nth-child(5)", dids[0]);
        assert_eq!(text_of(&client, &events_cell).await.as_deref(), Some("200"));

        // An agent's page, from the SQL tables: no baseline here, said so.
        let link = format!("#fleet-table tr[data-did='{}'] a", dids[0]);
        client.find(Locator::Css(&link)).await.unwrap().click().await.unwrap();
        let facts = eventually("the agent's page", || async {
            text_of(&client, "#agent-facts")
                .await
                .filter(|text| text.contains("kept by the detector"))
        })
        .await;
        assert!(facts.contains("eng") && facts.contains("active"), "{facts}");

        // The detector's finding, from the findings table, and its evidence events.
        let evidence = open_a_finding(&client).await;
        assert!(
            evidence.contains("credential_use") && evidence.contains("cred-prod"),
            "{evidence}"
        );

        // Approvals are the writer's; the page says so instead of failing.
        click(&client, "a[href='#actions']").await;
        eventually("the note on approvals", || async {
            text_of(&client, "#pending-list li.query-node-note").await
        })
        .await;
        assert!(
            client.find(Locator::Css("#actions-view .view-error")).await.is_err(),
            "the actions view failed"
        );

        // A revocation on the writer shows in the fleet view of the query node.
        let (target, revoked, token) = (url.clone(), dids[1].clone(), admin.clone());
        let (status, answer) = tokio::task::spawn_blocking(move || {
            post(
                &target,
                &format!("/v1/agents/{revoked}/revoke"),
                Some(&token),
                json!({"reason": "console test"}).to_string().into_bytes(),
            )
            .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(status, 200, "{answer}");
        // A query node has no live panel: the page is reloaded (the token stays in the
        // tab's session) until the fleet view shows it.
        click(&client, "a[href='#fleet']").await;
        let status_cell = format!("#fleet-table tr[data-did='{}'] td.status", dids[1]);
        eventually("the revocation on the query node's fleet view", || async {
            client.refresh().await.ok()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            text_of(&client, &status_cell).await.filter(|text| text == "revoked")
        })
        .await;

        // The store's checkpoint, as the query node holds it.
        click(&client, "a[href='#integrity']").await;
        eventually("the tree size", || async {
            text_of(&client, "#integrity-tree-size")
                .await
                .filter(|text| text.parse::<u64>().is_ok_and(|size| size >= 500))
        })
        .await;
    });
    node.stop();
    writer.stop();
}
