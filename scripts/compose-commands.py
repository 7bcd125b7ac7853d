"""Runs the `stages`, `writer`, `ingest` and `query` command lines of deploy/compose.yaml
against a local tansu broker: the same arguments, with the broker address, data
directories, the shared archive volume and listen addresses replaced by local ones. The
writer must become ready (/readyz 200) trusting the keys the stage process printed, the
ingest node ready once it has read the control topic, the query node ready once it has
read the archive and the committed topic, and all must stop cleanly on SIGTERM."""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import yaml


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, check, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.1)
    sys.exit(f"compose-commands: timed out waiting for {what}")


def main():
    compose = yaml.safe_load(open(sys.argv[1]))
    binary = os.environ["CUSTOS_BIN"]
    tansu = os.environ["CUSTOS_TANSU"]
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        broker = f"127.0.0.1:{port}"
        tansu_process = subprocess.Popen(
            [tansu, "broker", "--listener-url", f"tcp://{broker}", "--advertised-listener-url", f"tcp://{broker}",
             "--storage-engine", "sqlite://tansu.db"],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait("tansu", lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0)
            listen = f"127.0.0.1:{free_port()}"

            def local(service, data, listen=listen):
                args = compose["services"][service]["command"]
                out = []
                for arg in args:
                    arg = arg.replace("/var/lib/custos-archive", os.path.join(tmp, "archive"))
                    arg = arg.replace("kafka:9092", broker).replace("/var/lib/custos", data)
                    out.append(arg.replace("0.0.0.0:7600", listen))
                return out

            stages_args = local("stages", os.path.join(tmp, "stages"))
            print("compose-commands: custos " + " ".join(stages_args), file=sys.stderr)
            stages = subprocess.Popen([binary] + stages_args, stderr=subprocess.PIPE, text=True)
            keys = None
            for line in stages.stderr:
                match = re.match(r"start the writer with: --trust-detector (\S+) --trust-responder (\S+)", line)
                if match:
                    keys = match.groups()
                    break
            if keys is None:
                sys.exit("compose-commands: the stages service did not print its keys")
            # Keep reading its log so a full pipe never blocks it.
            threading.Thread(target=lambda: [None for _ in stages.stderr], daemon=True).start()
            env = dict(os.environ, CUSTOS_TRUST_DETECTOR=keys[0], CUSTOS_TRUST_RESPONDER=keys[1])
            writer_args = local("writer", os.path.join(tmp, "writer"))
            print("compose-commands: custos " + " ".join(writer_args), file=sys.stderr)
            writer = subprocess.Popen([binary] + writer_args, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            def ready(address):
                try:
                    return urllib.request.urlopen(f"http://{address}/readyz", timeout=1).status == 200
                except OSError:
                    return False

            wait("the writer's /readyz", lambda: ready(listen))
            ingest_listen = f"127.0.0.1:{free_port()}"
            ingest_args = local("ingest", os.path.join(tmp, "ingest"), ingest_listen)
            print("compose-commands: custos " + " ".join(ingest_args), file=sys.stderr)
            ingest = subprocess.Popen([binary] + ingest_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait("the ingest node's /readyz", lambda: ready(ingest_listen))
            query_listen = f"127.0.0.1:{free_port()}"
            query_args = local("query", os.path.join(tmp, "query"), query_listen)
            print("compose-commands: custos " + " ".join(query_args), file=sys.stderr)
            query = subprocess.Popen([binary] + query_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait("the query node's /readyz", lambda: ready(query_listen))
            for name, process in (("query", query), ("ingest", ingest), ("writer", writer), ("stages", stages)):
                process.send_signal(signal.SIGTERM)
                code = process.wait(timeout=120)
                if code != 0:
                    sys.exit(f"compose-commands: the {name} service exited with {code}")
            print("compose-commands: the services started, the writer, the ingest node and the query node were ready, all stopped cleanly",
                  file=sys.stderr)
        finally:
            tansu_process.kill()
            tansu_process.wait()


main()
