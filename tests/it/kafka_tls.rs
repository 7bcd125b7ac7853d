//! Kafka connection settings (TLS, SASL): a refused setting and a bad key file are
//! refused at start, naming the setting and never printing the key's password; a writer
//! and an ingest node authenticate to a real broker that requires SASL/SCRAM; and they
//! work through TLS with client certificates, while a node that does not trust the
//! broker's certificate, or has none of its own, stops at start saying why.
//!
//! tansu 0.6 takes `--cert`/`--key` but does not serve TLS with them, so the TLS side of
//! the broker's listener is a TLS terminator in this test (rustls, requiring a client
//! certificate from the test CA) that forwards each connection to tansu's own plaintext
//! port; tansu advertises the terminator's address, so every connection a client makes,
//! bootstrap and partition leaders alike, goes through TLS. The certificates are made by
//! the `openssl` command line.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// A writer and a stateless ingest node on `brokers` with the connection `settings`,
/// shown to work end to end: the topics, an enrollment through the control topic, and
/// five events accepted through the ingest node (a submission and its receipt).
fn writer_and_ingest_node(dir: &Path, brokers: &str, settings: &str) -> (Server, Server) {
    let node = |name: &str, roles: &str| {
        Server::start_with(
            &dir.join(name),
            &[
                "--kafka",
                brokers,
                "--kafka-prefix",
                "settings-test",
                "--roles",
                roles,
                "--kafka-config-file",
                settings,
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
    (writer, ingest)
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
    let _nodes = writer_and_ingest_node(dir.path(), &broker.addr, &settings);

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

/// Runs `openssl` in `dir`, failing the test with what it said.
fn openssl(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command line (it makes the test certificates)");
    assert!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

const CLIENT_KEY_PASSWORD: &str = "Tls-client-pass-3v";

/// A CA (`ca.pem`), a server certificate for 127.0.0.1 (`server.der`, its PKCS#8 key
/// `server.key.der`), a client certificate (`client.pem`) with its key encrypted under
/// [`CLIENT_KEY_PASSWORD`] (`client.key`), and an unrelated CA (`other-ca.pem`).
fn certificates(dir: &Path) {
    std::fs::write(
        dir.join("openssl.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = custos\n\
         [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [server]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
         extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1\n\
         [client]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
         extendedKeyUsage = clientAuth\n",
    )
    .unwrap();
    let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    for (ca, name) in [("ca", "custos test CA"), ("other-ca", "someone else's CA")] {
        let (key, pem, subject) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN={name}"));
        let mut args = vec!["req", "-x509", "-new", "-config", "openssl.cnf", "-extensions", "ca"];
        args.extend(p256);
        args.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subject]);
        openssl(dir, &args);
    }
    for (who, serial, subject) in [("server", "2", "/CN=127.0.0.1"), ("client", "3", "/CN=custos node")] {
        let (key, csr, pem) = (format!("{who}.key"), format!("{who}.csr"), format!("{who}.pem"));
        let mut args = vec!["req", "-new", "-config", "openssl.cnf"];
        args.extend(p256);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                serial,
                "-days",
                "2",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                who,
                "-out",
                &pem,
            ],
        );
    }
    openssl(
        dir,
        &["x509", "-in", "server.pem", "-outform", "DER", "-out", "server.der"],
    );
    openssl(dir, &["x509", "-in", "ca.pem", "-outform", "DER", "-out", "ca.der"]);
    openssl(
        dir,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "server.key",
            "-outform",
            "DER",
            "-out",
            "server.key.der",
        ],
    );
    let password = format!("pass:{CLIENT_KEY_PASSWORD}");
    openssl(
        dir,
        &[
            "pkcs8",
            "-topk8",
            "-in",
            "client.key",
            "-out",
            "client.key.enc",
            "-v2",
            "aes-256-cbc",
            "-passout",
            &password,
        ],
    );
    std::fs::rename(dir.join("client.key.enc"), dir.join("client.key")).unwrap();
}

/// A TLS listener that requires a client certificate from the test CA and forwards each
/// connection, decrypted, to `backend`. It counts the handshakes it completed, and the
/// ones it refused because the client presented no certificate.
struct Terminator {
    addr: String,
    handshakes: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl Terminator {
    fn start(dir: &Path, listener: std::net::TcpListener, backend: String) -> Self {
        use tokio_rustls::rustls;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(std::fs::read(dir.join("ca.der")).unwrap().into()).unwrap();
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(std::fs::read(dir.join("server.key.der")).unwrap().into());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(clients)
            .with_single_cert(vec![std::fs::read(dir.join("server.der")).unwrap().into()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let addr = listener.local_addr().unwrap().to_string();
        let (handshakes, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (done, failed) = (handshakes.clone(), refused.clone());
        runtime.spawn(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, backend, done, failed) =
                    (acceptor.clone(), backend.clone(), done.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(socket).await {
                        Ok(tls) => tls,
                        Err(error) => {
                            let refused = error
                                .get_ref()
                                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                                .is_some_and(|inner| *inner == rustls::Error::NoCertificatesPresented);
                            if refused {
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                            return;
                        }
                    };
                    done.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                });
            }
        });
        Self {
            addr,
            handshakes,
            refused,
            _runtime: runtime,
        }
    }
}

/// Settings for TLS to the broker: trust `ca`, and present the client certificate when
/// `certificate` (its key encrypted, the password given), owner-only.
fn tls_settings(dir: &Path, name: &str, ca: &str, certificate: bool) -> String {
    let path = dir.join(name);
    let mut text = format!("security.protocol=SSL\nssl.ca.location={}\n", dir.join(ca).display());
    if certificate {
        text.push_str(&format!(
            "ssl.certificate.location={}\nssl.key.location={}\nssl.key.password={CLIENT_KEY_PASSWORD}\n",
            dir.join("client.pem").display(),
            dir.join("client.key").display()
        ));
    }
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A broker reached only through TLS with client certificates: a writer and a stateless
/// ingest node given the CA, their certificate and its key's password work end to end
/// (topics, the control topic, a submission and its receipt), and every connection went
/// through the TLS listener. A node that trusts another CA stops at start naming the
/// certificate check; a node without a client certificate stops at start too, and is
/// counted as refused by the listener. No output prints the key's password.
#[test]
fn nodes_reach_a_broker_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let advertised = listener.local_addr().unwrap().to_string();
    let broker = Broker::start_behind(dir.path(), &advertised);
    let tls = Terminator::start(dir.path(), listener, broker.addr.clone());
    let settings = tls_settings(dir.path(), "tls.properties", "ca.pem", true);
    let (writer, ingest) = writer_and_ingest_node(dir.path(), &tls.addr, &settings);
    // The writer, the ingest node and their consumers each connected through TLS.
    assert!(
        tls.handshakes.load(Ordering::SeqCst) >= 2,
        "{} TLS handshakes",
        tls.handshakes.load(Ordering::SeqCst)
    );
    assert_eq!(tls.refused.load(Ordering::SeqCst), 0);

    let refused = |settings: &str| {
        let output = custos()
            .args(["serve", "--data"])
            .arg(dir.path().join("refused"))
            .args(["--listen", "127.0.0.1:0", "--kafka", &tls.addr, "--roles", "ingest"])
            .args(["--kafka-config-file", settings])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let text = stderr(&output);
        assert!(!text.contains(CLIENT_KEY_PASSWORD), "the password was printed: {text}");
        text
    };
    let text = refused(&tls_settings(dir.path(), "other-ca.properties", "other-ca.pem", true));
    assert!(
        text.contains("cannot reach the Kafka brokers") && text.contains("certificate verify failed"),
        "{text}"
    );
    let before = tls.refused.load(Ordering::SeqCst);
    let text = refused(&tls_settings(dir.path(), "no-certificate.properties", "ca.pem", false));
    assert!(
        text.contains("cannot reach the Kafka brokers") && text.contains("certificate required"),
        "{text}"
    );
    assert!(
        tls.refused.load(Ordering::SeqCst) > before,
        "the listener refused no handshake"
    );
    // The alert settles it: the node does not wait out the 10 s it gives a broker that
    // does not answer (the message says "within 10 s" only then).
    assert!(!text.contains("within 10 s"), "{text}");
    for log in [writer.stop(), ingest.stop()] {
        assert!(!log.contains(CLIENT_KEY_PASSWORD), "the key's password was logged");
    }
    drop(broker);
}
