//! Kafka connection settings (TLS, SASL): a refused setting and a bad key file are
//! refused at start, naming the setting and never printing the key's password; and a
//! writer and an ingest node authenticate to a real broker that requires SASL/SCRAM.
//!
//! TLS itself is not exercised against a broker: tansu 0.6 takes `--cert`/`--key` but
//! does not serve TLS with them, so no Kafka-protocol broker that installs here speaks it.

use std::os::unix::fs::PermissionsExt as _;

use custos_event::{AgentKey, Signer};

use crate::cluster::post_events;
use crate::hardening::signed_lines;
use crate::respond::{enroll, wait_for};
use crate::stages::Broker;
use crate::support::{Server, custos, stderr};

const KEY_PASSWORD: &str = "Client-key-pass-7Q";

/// Settings Custos owns are refused, and a key file that cannot be read stops the node
/// at start, naming the setting, without printing the password given with it.
#[test]
fn kafka_settings_are_checked_at_start_and_secrets_stay_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let serve = |extra: &[&str]| {
        custos()
            .args(["serve", "--data"])
            .arg(&data)
            .args(["--listen", "127.0.0.1:0", "--kafka", "127.0.0.1:9", "--roles", "ingest"])
            .args(extra)
            .output()
            .unwrap()
    };
    let output = serve(&["--kafka-config", "enable.auto.commit=true"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("enable.auto.commit"), "{}", stderr(&output));

    let output = serve(&["--kafka-config", "security.protocol=tls"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("security.protocol=`tls`"),
        "{}",
        stderr(&output)
    );

    let properties = dir.path().join("kafka.properties");
    std::fs::write(
        &properties,
        format!("security.protocol=ssl\nssl.key.location=/nonexistent/client.key\nssl.key.password={KEY_PASSWORD}\n"),
    )
    .unwrap();
    let output = serve(&["--kafka-config-file", properties.to_str().unwrap()]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("ssl.key.location"), "{text}");
    assert!(!text.contains(KEY_PASSWORD), "the password was printed: {text}");

    std::fs::write(&properties, "sasl.password\n").unwrap();
    let output = serve(&["--kafka-config-file", properties.to_str().unwrap()]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("kafka.properties:1") && text.contains("key=value"),
        "{text}"
    );
}

const SASL_PASSWORD: &str = "Scram-pass-41x";

/// A settings file for SCRAM-SHA-512 as `password`, owner-only.
fn sasl_settings(dir: &std::path::Path, name: &str, password: &str) -> String {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "# a broker that requires SASL\nsecurity.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\n\
             sasl.username=custos\nsasl.password={password}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A broker that requires SASL/SCRAM: a writer and a stateless ingest node given the
/// password work through it end to end (topics, the control topic, a submission and its
/// receipt); a node given a wrong password stops at start, saying the broker refused
/// the authentication, without printing the password it was given.
#[test]
fn nodes_authenticate_to_a_broker_that_requires_sasl() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_authenticated(dir.path(), "custos", SASL_PASSWORD);
    let settings = sasl_settings(dir.path(), "sasl.properties", SASL_PASSWORD);
    let node = |name: &str, roles: &str| {
        Server::start_with(
            &dir.path().join(name),
            &[
                "--kafka",
                &broker.addr,
                "--kafka-prefix",
                "sasl-test",
                "--roles",
                roles,
                "--kafka-config-file",
                &settings,
            ],
        )
    };
    let writer = node("writer", "writer");
    let ingest = node("ingest", "ingest");
    let key = AgentKey::from_seed(&[61; 32]);
    enroll(&writer.url, &writer.token(), key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    let probe = signed_lines(&mut signer, 1);
    wait_for("the ingest node to learn the agent from the control topic", || {
        post_events(&ingest.url, &probe).is_some_and(|results| results[0]["reason"] != "unknown_agent")
    });
    let results = post_events(&ingest.url, &signed_lines(&mut signer, 5)).expect("the ingest node answers");
    assert_eq!(results.len(), 5);
    for result in &results {
        assert_eq!(result["status"], "accepted", "{result}");
    }

    let wrong = "Not-the-pass-9";
    let refused = custos()
        .args(["serve", "--data"])
        .arg(dir.path().join("refused"))
        .args(["--listen", "127.0.0.1:0", "--kafka", &broker.addr, "--roles", "ingest"])
        .args([
            "--kafka-config-file",
            &sasl_settings(dir.path(), "wrong.properties", wrong),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let text = stderr(&refused);
    assert!(
        text.contains("cannot reach the Kafka brokers") && text.contains("SASL authentication"),
        "{text}"
    );
    assert!(!text.contains(wrong), "the password was printed: {text}");
    drop(broker);
}
