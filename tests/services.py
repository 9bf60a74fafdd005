"""Local stand-ins for a lab's cluster, all on 127.0.0.1: a two-node Ray cluster (a head and a second
`ray start --address ...` with its own temp dir, ports and a custom resource), an S3-compatible object store
(moto's server) and an MLflow tracking server serving artifacts. Used by tests/test_cluster.py; the README's
"On a cluster" section runs the same commands.

Only this cluster's processes are ever stopped (by temp dir and ports): `ray stop` would kill every Ray on the
machine, this test process's own included.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
BUCKET = "camae-test"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict:
    """This venv first on PATH; Ray 2.60's `ray start` turns on token auth, so clients must say so."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", *AWS):
        env.pop(key, None)
    return env


def wait_http(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def kill_tree(match) -> None:
    """Kill every process whose command line satisfies `match`, with its children (Ray's agents retitle
    themselves, so whole trees are taken)."""
    import psutil

    victims = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and match(f"{cmdline} "):
                for p in [proc, *proc.children(recursive=True)]:
                    victims[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    for proc in victims.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=30)


# ----------------------------------------------------------------------------------------------------------------
# Object store and tracking server


@dataclass
class ObjectStore:
    """moto's S3 server with one bucket; `env` is what a job's runtime env passes to every node."""

    port: int
    process: subprocess.Popen

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        return {**AWS, "AWS_ENDPOINT_URL": self.endpoint}

    def keys(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, **_boto_creds())
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read_text(self, key: str) -> str:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, **_boto_creds())
        return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(30)


def _boto_creds() -> dict:
    return {"aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
            "region_name": AWS["AWS_DEFAULT_REGION"]}


def start_object_store(log_dir: Path) -> ObjectStore:
    import boto3

    port = free_port()
    log = open(log_dir / "moto.log", "w")  # noqa: SIM115 -- lives as long as the server
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                               stderr=subprocess.STDOUT, env=base_env())
    store = ObjectStore(port, process)
    wait_http(store.endpoint + "/moto-api/")
    boto3.client("s3", endpoint_url=store.endpoint, **_boto_creds()).create_bucket(Bucket=BUCKET)
    return store


@dataclass
class TrackingServer:
    """`mlflow server` over SQLite with --serve-artifacts (artifacts on local disk, sent through the server)."""

    port: int
    root: Path
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TrackingServer:
        log = open(self.root / "mlflow-server.log", "a")  # noqa: SIM115 -- lives as long as the server
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--serve-artifacts",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=base_env(), start_new_session=True)
        wait_http(self.uri + "/health", 120)
        return self

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, 9)  # uvicorn/gunicorn workers too
            self.process.wait(30)
            self.process = None


# ----------------------------------------------------------------------------------------------------------------
# Two Ray nodes on one machine


@dataclass
class RayNode:
    """One `ray start` with its own temp dir and ports."""

    temp_dir: str
    args: list[str]
    ports: list[int] = field(default_factory=list)

    def start(self) -> None:
        for attempt in range(3):
            done = subprocess.run(["ray", "start", *self.args], env=base_env(), capture_output=True, text=True,
                                  timeout=240)
            if done.returncode == 0:
                return
            self.stop()
            time.sleep(2 * (attempt + 1))
        raise RuntimeError(f"ray start {' '.join(self.args)} failed:\n{done.stdout}\n{done.stderr}")

    def stop(self) -> None:
        kill_tree(lambda cmd: self.temp_dir in cmd or any(f"={p} " in cmd or f":{p} " in cmd for p in self.ports))


def _node_ports(taken: set[int]) -> tuple[list[str], list[int]]:
    """A node's component ports and a worker port range of its own. Neither may hold a port already `taken` (the
    cluster's other ports and ranges: seen in CI, a GCS port inside the head's worker range made `ray start` refuse),
    and what is chosen here is added to `taken`."""
    names = ["node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port"]
    ports = []
    while len(ports) < len(names):
        port = free_port()
        if port not in taken and port not in ports:
            ports.append(port)
    while True:
        low = free_port() // 10 * 10
        if not any(low <= port <= low + 40 for port in taken | set(ports)):
            break
    taken |= {*ports, *range(low, low + 41)}
    args = [f"--{n}={p}" for n, p in zip(names, ports, strict=True)]
    return [*args, f"--min-worker-port={low}", f"--max-worker-port={low + 40}"], ports


@dataclass
class TwoNodeCluster:
    """A head (resource `head_node`) and a second node (resource `node2`), each with logical CPUs oversubscribed
    so that training workers leave Ray Data some; both carry `slot: 1`, so one worker asking for a slot lands on
    each node."""

    head: RayNode
    node2: RayNode
    port: int
    dashboard: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def restart_node2(self) -> None:
        self.node2.stop()
        self.node2.start()

    def stop(self) -> None:
        self.node2.stop()
        self.head.stop()
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start` points later ray.init() calls at its head
        if current.is_file() and str(self.port) in current.read_text():
            current.unlink()

    def submit(self, args: list[str], runtime_env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir <repo> -- <args>`, as the README's cluster section does."""
        repo = Path(__file__).resolve().parents[1]
        env_json = {"excludes": ["/.venv", "/outputs", "/data", "/.git"], **runtime_env}
        cmd = ["ray", "job", "submit", f"--address={self.dashboard_url}", "--working-dir", str(repo),
               "--runtime-env-json", json.dumps(env_json), "--", *args]
        for _ in range(12):  # right after `ray start` the head may refuse with "No available agent"
            job = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=timeout)
            if "No available agent" not in job.stdout + job.stderr:
                return job
            time.sleep(5)
        return job


def start_two_node_cluster(head_cpus: int = 4, node2_cpus: int = 3) -> TwoNodeCluster:
    port, dashboard, client = free_port(), free_port(), free_port()
    taken = {port, dashboard, client}
    args, ports = _node_ports(taken)
    head_temp = tempfile.mkdtemp(prefix="camaeh", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    head_args = ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={head_cpus}",
                 f"--temp-dir={head_temp}", "--resources", json.dumps({"head_node": 1, "slot": 1}),
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                 f"--ray-client-server-port={client}", *args]
    head = RayNode(head_temp, head_args, [port, dashboard, client, *ports])
    args2, ports2 = _node_ports(taken)
    temp2 = tempfile.mkdtemp(prefix="camae2", dir="/tmp")
    node2 = RayNode(temp2, [f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", f"--num-cpus={node2_cpus}",
                            f"--temp-dir={temp2}", "--resources", json.dumps({"node2": 1, "slot": 1}), *args2], ports2)
    cluster = TwoNodeCluster(head, node2, port, dashboard)
    try:
        head.start()
        node2.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
