//! Kafka connection settings (TLS, SASL): a refused setting and a bad key file are
//! refused at start, naming the setting and never printing the key's password.

use crate::support::{custos, stderr};

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
