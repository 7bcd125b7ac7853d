// A real `custos serve` on loopback for the end-to-end tests. CUSTOS_BIN names the
// binary and CUSTOS_REPO the repository (the project's test command sets both); without
// them the tests fail rather than skip.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export function repoFile(...parts) {
  if (!process.env.CUSTOS_REPO) throw new Error("set CUSTOS_REPO to the repository root (scripts/test does)");
  return readFileSync(join(process.env.CUSTOS_REPO, ...parts), "utf8");
}

export async function startNode() {
  if (!process.env.CUSTOS_BIN) throw new Error("set CUSTOS_BIN to the custos binary (scripts/test does)");
  const data = join(mkdtempSync(join(tmpdir(), "custos-ts-")), "node");
  const child = spawn(process.env.CUSTOS_BIN, ["serve", "--data", data, "--listen", "127.0.0.1:0"], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  const url = await new Promise((found, failed) => {
    const timer = setTimeout(() => failed(new Error(`custos serve did not start:\n${log}`)), 60_000);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      // A whole line: a chunk may end inside the address.
      const match = log.match(/custos serving on (\S+)\s/);
      if (match) {
        clearTimeout(timer);
        found(match[1]);
      }
    });
    child.on("exit", (code) => failed(new Error(`custos serve exited ${code}:\n${log}`)));
  });
  const admin = readFileSync(join(data, "admin.token"), "utf8").trim();
  const call = async (method, path, body, token = admin) => {
    const response = await fetch(url + path, {
      method,
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    return [response.status, text ? JSON.parse(text) : null];
  };
  return {
    url,
    call,
    async enroll(did, realm) {
      const [status, answer] = await call("POST", "/v1/agents", { did, realm });
      if (status !== 201) throw new Error(`enroll: ${status} ${JSON.stringify(answer)}`);
    },
    async token(role, realms) {
      const [status, answer] = await call("POST", "/v1/tokens", { role, realms });
      if (status !== 201) throw new Error(`token: ${status} ${JSON.stringify(answer)}`);
      return answer.token;
    },
    stop() {
      child.kill("SIGTERM");
    },
  };
}
