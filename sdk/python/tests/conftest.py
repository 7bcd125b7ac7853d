"""A real `custos serve` on loopback for the end-to-end tests.

`CUSTOS_BIN` names the binary (the project's test command sets it). Without it these
tests fail rather than skip: an SDK untested against a node proves nothing.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import threading
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


class Node:
    def __init__(self, data: pathlib.Path, extra=()):
        binary = os.environ.get("CUSTOS_BIN")
        if not binary:
            pytest.fail("set CUSTOS_BIN to the custos binary (scripts/test does)")
        self.data = data
        self.process = subprocess.Popen(
            [binary, "serve", "--data", str(data), "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.log = []
        found = threading.Event()

        def read():
            for line in self.process.stderr:
                self.log.append(line)
                if line.startswith("custos serving on "):
                    self.url = line.split()[3]
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(60):
            self.process.kill()
            pytest.fail("custos serve did not start:\n" + "".join(self.log))
        self.admin = (data / "admin.token").read_text().strip()

    def call(self, method, path, body=None, token=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token or self.admin}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def sql(self, text):
        status, rows = self.call("POST", "/v1/sql", {"sql": text})
        assert status == 200, rows
        return rows

    def enroll(self, did, realm):
        status, answer = self.call("POST", "/v1/agents", {"did": did, "realm": realm})
        assert status == 201, answer

    def token(self, role, realms):
        status, answer = self.call("POST", "/v1/tokens", {"role": role, "realms": realms})
        assert status == 201, answer
        return answer["token"]

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture
def node(tmp_path):
    server = Node(tmp_path / "node")
    yield server
    server.stop()


@pytest.fixture
def vectors():
    return json.loads((REPO / "docs" / "test-vectors.json").read_text())


@pytest.fixture
def mapping_cases():
    return json.loads((REPO / "sdk" / "otel-mapping.json").read_text())["cases"]
