//! Runs `custos` as a child process.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn custos() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_custos"));
    command
        .env_remove("CUSTOS_TOKEN")
        .env_remove("CUSTOS_URL")
        .env_remove("CUSTOS_DATA");
    command
}

pub(crate) fn run(args: &[&str]) -> Output {
    custos().args(args).output().unwrap()
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A `custos serve` child process.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) url: String,
    pub(crate) data: PathBuf,
    pub(crate) log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    pub(crate) fn start(data: &Path) -> Self {
        Self::start_with(data, &[])
    }

    /// [`Server::start`] with extra `serve` arguments.
    pub(crate) fn start_with(data: &Path, extra: &[&str]) -> Self {
        let mut command = custos();
        command
            .args(["serve", "--data"])
            .arg(data)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--segment-max-entries",
                "500",
                "--checkpoint-every",
                "100",
            ])
            .args(extra);
        Self::spawn(command, data)
    }

    /// Runs `command` (a `custos serve`, possibly wrapped) and waits until it listens.
    pub(crate) fn spawn(mut command: Command, data: &Path) -> Self {
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (found, address) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("custos serving on ") {
                    let _ = found.send(rest.split_whitespace().next().unwrap_or_default().to_owned());
                }
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let url = address
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("serve did not start: {}", log.lock().unwrap()));
        Self {
            child,
            url,
            data: data.to_owned(),
            log,
        }
    }

    pub(crate) fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// SIGTERM, then wait for a clean exit.
    pub(crate) fn stop(mut self) -> String {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "serve exited with {status}: {}",
                    self.log.lock().unwrap()
                );
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "serve did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        self.log.lock().unwrap().clone()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush, seal or checkpoint.
    pub(crate) fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// A node a test did not stop (it returned early, or failed) is killed, not left running.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn post(
    url: &str,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Result<(u16, serde_json::Value)> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut request = client.post(format!("{url}{path}")).body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send()?;
    let status = response.status().as_u16();
    let text = response.text()?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    ))
}

/// The package's directory as cargo gives it to the running test, so a test binary that
/// cargo reuses from another checkout of the same tree reads this checkout's files.
pub(crate) fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

/// `dir/playbooks/` holding one playbook, `file`, for `serve --playbooks`.
pub(crate) fn playbook_dir(dir: &Path, file: &str, yaml: &str) -> PathBuf {
    let playbooks = dir.join("playbooks");
    std::fs::create_dir_all(&playbooks).unwrap();
    std::fs::write(playbooks.join(file), yaml).unwrap();
    playbooks
}

/// One HTTP/1.1 request as a test's stand-in server reads it (for the platforms that
/// cannot run here: their fakes answer one request per connection).
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    /// Header names in lowercase.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Request {
    pub(crate) fn read(stream: &std::net::TcpStream) -> Option<Request> {
        use std::io::Read as _;
        let mut reader = std::io::BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
        let mut headers = Vec::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let length = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        Some(Request {
            method,
            path,
            headers,
            body,
        })
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Answers a stand-in server's request with a JSON body and closes the connection.
pub(crate) fn answer(mut stream: std::net::TcpStream, status: u16, body: &str) {
    use std::io::Write as _;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
