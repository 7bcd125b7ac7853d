//! The Python and TypeScript SDKs' own suites (sdk/*/tests), run against this build's
//! `custos serve`: byte-for-byte test vectors, the crash-safe chain, resends answered
//! `duplicate`, a playbook's revocation seen by the `EnforcementFeed` within a second,
//! and the OpenTelemetry bridge. scripts/test installs both packages as users do (pip;
//! npm from the packed tarball) and names them in `CUSTOS_SDK_PYTHON` / `CUSTOS_SDK_TS`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn installed(variable: &str, default: &str) -> PathBuf {
    if let Ok(path) = std::env::var(variable) {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = Path::new(&home).join(".cache/custos-tools").join(default);
    assert!(
        path.exists(),
        "nothing at {}: run scripts/test (it installs the SDKs) or set {variable}",
        path.display()
    );
    path
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(mut command: Command, what: &str) {
    let output = command
        .env("CUSTOS_BIN", env!("CARGO_BIN_EXE_custos"))
        .env("CUSTOS_REPO", repo())
        .output()
        .unwrap_or_else(|error| panic!("cannot run the {what} suite: {error}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the {what} suite failed:\n{text}");
    // A suite that collected nothing proves nothing.
    assert!(!text.contains("no tests ran") && !text.contains("# tests 0"), "{text}");
    eprintln!("{text}");
}

#[test]
fn the_python_sdk_suite_passes_against_a_real_node() {
    let python = installed("CUSTOS_SDK_PYTHON", "sdk-venv/bin/python");
    let mut command = Command::new(python);
    command
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(repo().join("sdk/python/tests"))
        .current_dir(repo().join("sdk/python"));
    run(command, "Python SDK");
}

#[test]
fn the_typescript_sdk_suite_passes_against_a_real_node() {
    let project = installed("CUSTOS_SDK_TS", "ts-consumer");
    let mut command = Command::new("node");
    command.args(["--test", "test/"]).current_dir(project);
    run(command, "TypeScript SDK");
}
