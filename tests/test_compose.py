"""The Docker Compose stack, built and run the way a user runs it (docker/README.md), in two
variants, one module-scoped stack each (the module runs first: see conftest.py, so no other
engine or Ray cluster of the session competes for the host's ports and cores):

- `bridge`: the production `docker-compose.yml`, unchanged, on bridge networks with published
  ports. This machine's own engine has no bridge (and the host's networking must not change),
  so the test starts a second Docker engine inside a network namespace it creates
  (tests/netns_docker.py): its bridges and iptables rules live there, the image is copied over
  with `docker save | docker load`, and the host reaches the published ports through a
  forwarder that connects from inside the namespace.
- `host-network`: the same file merged with `docker/compose.host-network.yml`, on the host's
  engine (what hosts without a bridge run).

Each variant: the images built from the wheelhouse and a local base image
(`docker/build-images.sh`, what `make images` runs, once); `up -d --scale ray-worker=2` with
the two secrets (TODI_API_KEY, RAY_AUTH_TOKEN) and the health checks; strangers kept out (the
teacher's `/v1` and Ray's job API and client refuse requests without the key or the token, and
a refused job's command leaves no trace; the published ports listen on 127.0.0.1 only and do
not answer on another address of the machine); the README's pipeline through the one-shot
services: `prepare`, `precompute` (a job over REST with TODI_API_KEY), `train` through the Ray
client, `train` again as a Ray job (`ray job submit` with the token), `eval`; a `--ray`
precompute whose vLLM teacher actors run on the stack's Ray worker nodes; the student loaded
with transformers; the teacher's health when its engine dies; `down -v`.
Placement is read from Ray's own records (the state API on the head's dashboard, with the
token). Nothing Ray-related runs in this pytest process: clients are subprocesses with the
token in their own environment. A failure names the service and prints its last log lines.
Nothing here is skipped: without an engine the set-up fails and says why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.netns_docker import OTHER_ADDRESS, NetnsDocker

ROOT = Path(__file__).resolve().parents[1]
DOCKER = "/usr/bin/docker"  # Debian's CLI, which matches the Debian engine
COMPOSE_FILES = ("docker-compose.yml", "docker/compose.host-network.yml")
PROJECT = "todi-stack-test"
API_KEY = "compose-test-key"
RAY_TOKEN = "compose-test-ray-token-5f0c2b7e"
MODEL = "/data/todi/models/smollm2-135m-instruct"
IMAGE = "todi-distill/cpu:dev"
BUILD_TIMEOUT = 2400
UP_TIMEOUT = 900
VARIANTS = ("bridge", "host-network")
PUBLISHED = ("TEACHER_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_PORT")
# The production file's defaults: inside the namespace the stack has the port space to itself.
DEFAULT_PORTS = {"TEACHER_PORT": 8000, "RAY_GCS_PORT": 6379, "RAY_DASHBOARD_PORT": 8265,
                 "RAY_CLIENT_PORT": 10001}  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.compose, pytest.mark.timeout(5400)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    variant: str
    env: dict[str, str]
    ports: dict[str, int]  # where this process reaches each published port (host loopback)
    inner: dict[str, int]  # the stack's own ports (inside its network)
    tmp: Path
    compose_file: Path
    netns: NetnsDocker | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    # -- commands --------------------------------------------------------------------------
    def compose(self, *args: str, timeout: float = 600, check: bool = True):
        argv = ["docker-compose", "-f", str(self.compose_file), "--project-directory", str(ROOT),
                "-p", PROJECT]  # fmt: skip
        proc = subprocess.run(
            [*argv, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            service = next((a for a in args if a in SERVICES), None)
            self.fail(f"`docker-compose {' '.join(args)}` exited {proc.returncode}:\n"
                      f"{_tail(proc.stdout + proc.stderr)}", service)  # fmt: skip
        return proc

    def run_job(self, service: str, *command: str, timeout: float = 900) -> str:
        """`docker compose run --rm SERVICE [command]`; its output."""
        proc = self.compose("run", "--rm", "-T", service, *command, timeout=timeout, check=False)
        if proc.returncode != 0:
            self.fail(
                f"one-shot service `{service}` exited {proc.returncode}:\n"
                f"{_tail(proc.stdout + proc.stderr, 60)}",
                None,
            )
        return proc.stdout

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).stdout.split()
        if not cid:
            self.fail(f"service `{service}` has no container", service)
        return cid[0]

    def docker(self, *args: str, timeout: float = 300, check: bool = True):
        proc = subprocess.run(
            [DOCKER, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            self.fail(f"`docker {' '.join(args)}` exited {proc.returncode}: {_tail(proc.stderr)}")
        return proc

    def logs(self, service: str, lines: int = 40) -> str:
        proc = self.compose("logs", "--no-color", "--tail", str(lines), service, check=False)
        return proc.stdout + proc.stderr

    def fail(self, message: str, service: str | None = None) -> None:
        names = [service] if service else list(DEFAULT_SERVICES)
        logs = "\n".join(f"--- last log lines of `{s}` ---\n{self.logs(s)}" for s in names)
        pytest.fail(f"{message}\n{logs}", pytrace=False)

    # -- the stack's own interfaces ---------------------------------------------------------
    @property
    def teacher_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['TEACHER_PORT']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['RAY_DASHBOARD_PORT']}"

    def http(self, method: str, path: str, body: Any = None, key: str | None = API_KEY):
        """(status, JSON body) of a request to the teacher's published port."""
        return _request(self.teacher_url + path, method, body, key)

    def ray_http(self, method: str, path: str, body: Any = None, token: str | None = RAY_TOKEN):
        """(status, body) of a request to the head's dashboard / job API."""
        return _request(self.dashboard_url + path, method, body, token)

    def ray_state(self, kind: str, **filters: str) -> list[dict[str, Any]]:
        """Ray's own records: the state API (`/api/v0/nodes|actors`) of the head's dashboard,
        what `ray.util.state` and `ray list` call, with the token."""
        params: dict[str, Any] = {"limit": 10_000, "detail": "true", "timeout": 30}
        if filters:
            params["filter_keys"] = list(filters)
            params["filter_predicates"] = ["="] * len(filters)
            params["filter_values"] = list(filters.values())
        status, body = self.ray_http("GET", f"/api/v0/{kind}?" + urllib.parse.urlencode(
            params, doseq=True))  # fmt: skip
        assert status == 200 and body["result"], (status, body)
        return body["data"]["result"]["result"]

    def ray_env(self, token: str | None = RAY_TOKEN) -> dict[str, str]:
        """The environment of a Ray client process on the host: the token (or none at all:
        no RAY_AUTH_*, a HOME without ~/.ray/auth_token)."""
        env = {k: v for k, v in self.env.items() if not k.startswith("RAY_")}
        if token is None:
            home = self.tmp / "stranger-home"
            home.mkdir(exist_ok=True)
            return {**env, "HOME": str(home)}
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}

    def on_volume(self, path: str) -> bool:
        """Whether `path` exists on the shared volume (asked inside the head's container)."""
        proc = self.docker("exec", self.container("ray-head"), "test", "-e", path, check=False)
        return proc.returncode == 0

    def health(self, service: str) -> str:
        cid = self.container(service)
        out = self.docker("inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}", cid)
        return out.stdout.strip()

    def copy_in(self, src: Path, service: str, dest: str) -> None:
        self.docker("cp", str(src), f"{self.container(service)}:{dest}")

    def copy_out(self, service: str, src: str, dest: Path) -> None:
        self.docker("cp", f"{self.container(service)}:{src}", str(dest))


SERVICES = {"teacher-cpu", "ray-head", "ray-worker", "prepare", "precompute", "train", "eval"}
DEFAULT_SERVICES = ("teacher-cpu", "ray-head", "ray-worker")


def _request(url: str, method: str, body: Any = None, bearer: str | None = None):
    """(status, JSON body, or the text when it is not JSON) of one HTTP request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if bearer:
        req.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(argv)}` exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}",
            pytrace=False,
        )
    return proc.stdout


def _dataset(path: Path, rows: int, offset: int) -> Path:
    """JSONL rows of chatterbot-corpus prompt/response pairs (the package the demo uses)."""
    from todi.services.answers import chatterbot_prompts

    prompts = chatterbot_prompts()
    with path.open("w") as f:
        for i in range(rows):
            a, b = prompts[offset + 2 * i], prompts[offset + 2 * i + 1]
            f.write(json.dumps({"id": f"row-{offset + i}", "prompt": a, "response": b}) + "\n")
    return path


def _host_network_file(env: dict[str, str], dest: Path) -> Path:
    """docker-compose.yml + docker/compose.host-network.yml, merged by compose itself, less
    the published ports: compose 1.29 refuses `ports` next to `network_mode: host` (moot there:
    each service listens on the host's own port) and an override file cannot remove a key."""
    import yaml

    argv = ["docker-compose", *(a for f in COMPOSE_FILES for a in ("-f", f))]
    merged = yaml.safe_load(_run([*argv, "--profile", "jobs", "config"], timeout=120, env=env))
    for svc in merged["services"].values():
        if svc.get("network_mode") == "host":
            svc.pop("ports", None)
    dest.write_text(yaml.safe_dump(merged, sort_keys=False))
    return dest


def _wait_healthy(stack: Stack, timeout: float) -> None:
    """Every default service's containers report `healthy` (the compose health checks)."""
    deadline = time.monotonic() + timeout
    status: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        status = {}
        for service in DEFAULT_SERVICES:
            ids = stack.compose("ps", "-q", service).stdout.split()
            status[service] = [
                stack.docker(
                    "inspect", "-f", "{{.State.Status}}/{{.State.Health.Status}}", c
                ).stdout.strip()
                for c in ids
            ]
        bad = [s for s, v in status.items() if any(x.startswith(("exited", "dead")) for x in v)]
        if bad:
            stack.fail(f"service `{bad[0]}` stopped while starting: {status}", bad[0])
        if all(v and all(x == "running/healthy" for x in v) for v in status.values()):
            return
        time.sleep(5)
    unhealthy = next(s for s, v in status.items() if not all(x == "running/healthy" for x in v))
    stack.fail(f"not healthy after {timeout:.0f} s: {status}", unhealthy)


@pytest.fixture(scope="session")
def built_image() -> dict[str, Any]:
    """The CPU image, built once for both variants on the host's engine (started when none
    runs); the build's own environment (no secrets: they are never part of an image)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "RAY_"))},
        "IMAGE_TAG": "dev",
        "BASE_IMAGE": "todi-distill/base:bookworm",
        "DOCKER": DOCKER,
        "PIP": f"{sys.executable} -m pip",
    }
    env.pop("DOCKER_HOST", None)
    engine = _run(["bash", ".ci/docker-engine.sh", "start"], timeout=120).strip()
    try:
        t0 = time.monotonic()
        _run(["bash", "docker/build-images.sh"], timeout=BUILD_TIMEOUT, env=env)
        yield {"env": env, "build_s": time.monotonic() - t0}
    finally:
        if engine.endswith("started"):
            subprocess.run(["bash", ".ci/docker-engine.sh", "stop"], cwd=ROOT, timeout=120)


def _stack_env(base: dict[str, str], ports: dict[str, int]) -> dict[str, str]:
    return {
        **base,
        **{k: str(v) for k, v in ports.items()},
        "TODI_API_KEY": API_KEY,
        "RAY_AUTH_TOKEN": RAY_TOKEN,
        # Sized for a 2-core, 24 GB machine running three vLLM engines at its peak.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TEACHER_SHM_SIZE": "2gb",
        "RAY_SHM_SIZE": "1gb",
        "RAY_OBJECT_STORE_BYTES": "300000000",
        "TRAIN_WORKERS": "2",
        "TRAIN_MAX_STEPS": "3",
    }


@pytest.fixture(scope="module", params=VARIANTS)
def stack(request, built_image, tmp_path_factory) -> Stack:
    variant = request.param
    tmp = tmp_path_factory.mktemp(f"compose-{variant}")
    netns = None
    notes: dict[str, Any] = {"build_s": built_image["build_s"]}
    if variant == "bridge":
        # The production file as it is, with its default ports, on an engine in a namespace.
        env = _stack_env(built_image["env"], {})
        netns = NetnsDocker()
        t0 = time.monotonic()
        try:
            netns.start()
            notes["image_copied"] = netns.load_image(IMAGE, built_image["env"])
        except Exception as exc:
            netns.stop()
            pytest.fail(f"the namespaced Docker engine failed: {exc}\n{netns.log_tail()}",
                        pytrace=False)  # fmt: skip
        notes["engine_s"] = time.monotonic() - t0
        env["DOCKER_HOST"] = netns.host
        inner = dict(DEFAULT_PORTS)
        ports = dict(zip(PUBLISHED, netns.forward([inner[p] for p in PUBLISHED]), strict=True))
        compose_file = ROOT / "docker-compose.yml"
    else:
        inner = {name: _free_port() for name in DEFAULT_PORTS}
        env = _stack_env(built_image["env"], inner)
        ports = {p: inner[p] for p in PUBLISHED}
        compose_file = _host_network_file(env, tmp / "compose.host.yml")
    stack = Stack(variant=variant, env=env, ports=ports, inner=inner, tmp=tmp,
                  compose_file=compose_file, netns=netns, notes=notes)  # fmt: skip
    try:
        stack.compose("down", "-v", "--remove-orphans", check=False)  # a stack left by a crash
        t0 = time.monotonic()
        stack.compose("up", "-d", "--no-build", "--scale", "ray-worker=2", timeout=UP_TIMEOUT)
        _wait_healthy(stack, UP_TIMEOUT)
        stack.notes["up_s"] = time.monotonic() - t0
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False)
        if netns is not None:
            netns.stop()
        print(f"\ncompose stack {variant}: {json.dumps(stack.notes, default=str)}")


# ------------------------------------------------------------------------------------------


def test_up_gives_a_healthy_stack_of_three_ray_nodes(stack):
    for service in DEFAULT_SERVICES:
        assert stack.health(service) == "running healthy", service
    assert len(stack.compose("ps", "-q", "ray-worker").stdout.split()) == 2
    nodes = [n for n in stack.ray_state("nodes") if n["state"] == "ALIVE"]
    assert len(nodes) == 3, nodes
    heads = [n for n in nodes if n["is_head_node"]]
    assert len(heads) == 1
    # The head takes no tasks (--num-cpus=0): training and teacher actors go to the workers.
    assert heads[0]["resources_total"].get("CPU", 0) == 0
    stack.notes["head_node"] = heads[0]["node_id"]
    stack.notes["worker_nodes"] = {n["node_id"] for n in nodes if not n["is_head_node"]}


def test_rest_from_the_host(stack):
    status, body = stack.http("GET", "/healthz", key=None)
    assert status == 200 and body["status"] == "ok", body
    status, body = stack.http("GET", "/v1/teacher")
    assert status == 200, body
    assert body["backend"] == "vllm" and body["vocab_size"] >= 49152, body
    status, body = stack.http(
        "POST", "/v1/logprobs", {"texts": ["The capital of France is Paris"], "top_k": 5}
    )
    assert status == 200, body
    result = body["results"][0]
    assert len(result["topk_ids"]) == len(result["input_ids"]) - 1 > 0
    assert all(len(row) == 5 for row in result["topk_ids"])
    assert all(v <= 0.0 for row in result["topk_logprobs"] for v in row)
    status, body = stack.http("GET", "/v1/teacher", key=None)
    assert status == 401, body
    status, body = stack.http("POST", "/v1/logprobs", {"texts": ["x y"], "top_k": 5}, key="no")
    assert status == 401, body


# -- strangers are kept out ------------------------------------------------------------------
V1_ROUTES = (
    ("GET", "/v1/teacher", None),
    ("POST", "/v1/logprobs", {"texts": ["x y"], "top_k": 2}),
    ("POST", "/v1/jobs", {"dataset": "train.jsonl", "out": "stranger", "top_k": 2,
                          "job_id": "stranger-job"}),
    ("GET", "/v1/jobs", None),
    ("GET", "/v1/jobs/stranger-job", None),
    ("DELETE", "/v1/jobs/stranger-job", None),
)  # fmt: skip
# Ray's dashboard: only its health checks, its login endpoints and the static UI are public.
RAY_PRIVATE_ROUTES = ("/api/jobs/", "/api/v0/nodes", "/api/v0/actors", "/api/v0/tasks",
                      "/api/cluster_status", "/nodes?view=summary", "/logical/actors")  # fmt: skip


def test_the_teacher_refuses_every_v1_route_without_the_key(stack):
    for method, path, body in V1_ROUTES:
        for key in (None, "wrong-key"):
            status, answer = stack.http(method, path, body, key=key)
            assert status == 401, (method, path, key, status, answer)
    status, answer = stack.http("GET", "/v1/jobs/stranger-job")
    assert status == 404, answer  # the stranger's job was never created


def test_rays_job_api_refuses_a_stranger_and_runs_nothing(stack):
    status, body = stack.ray_http("GET", "/api/authentication_mode", token=None)
    assert status == 200 and body == {"authentication_mode": "token"}, body
    for path in RAY_PRIVATE_ROUTES:
        status, body = stack.ray_http("GET", path, token=None)
        assert status == 401, (path, status, body)
        status, body = stack.ray_http("GET", path, token="wrong-token")
        assert status == 403, (path, status, body)
    # A job whose command would leave a file on the shared volume.
    marker = f"/data/runs/stranger-was-here-{stack.variant}"
    spec = {"entrypoint": f"touch {marker}", "submission_id": "stranger-job"}
    for token, refused in ((None, 401), ("wrong-token", 403)):
        status, body = stack.ray_http("POST", "/api/jobs/", spec, token=token)
        assert status == refused, (token, status, body)
    # The same through Ray's own CLI, as a stranger on the host would run it.
    ray_cli = str(Path(sys.executable).parent / "ray")
    for token in (None, "wrong-token"):
        proc = subprocess.run(
            [ray_cli, "job", "submit", "--address", stack.dashboard_url, "--submission-id",
             "stranger-cli-job", "--no-wait", "--", "touch", marker],
            capture_output=True, text=True, timeout=300, env=stack.ray_env(token),
        )  # fmt: skip
        assert proc.returncode != 0, proc.stdout
        assert re.search(r"Authentication (required|failed)", proc.stdout + proc.stderr), (
            proc.stdout + proc.stderr
        )
    # The owner, with the token: the same kind of job runs and leaves its file, so the check
    # below would see a stranger's.
    owner = f"/data/runs/owner-was-here-{stack.variant}"
    status, body = stack.ray_http(
        "POST", "/api/jobs/", {"entrypoint": f"touch {owner}", "submission_id": "owner-job"}
    )
    assert status == 200, body
    deadline = time.monotonic() + 300
    while (job := _ray_job(stack, "owner-job"))["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job["status"] == "SUCCEEDED", job
    assert stack.on_volume(owner)
    status, jobs = stack.ray_http("GET", "/api/jobs/")
    assert status == 200
    ids = {j.get("submission_id") for j in jobs}
    assert "owner-job" in ids and not ids & {"stranger-job", "stranger-cli-job"}, ids
    assert not stack.on_volume(marker), "a refused job's command ran"


# Ray's client retries a refused handshake for about 30 s and then reports a generic
# "connection timeout"; the server's reason is in its debug log, which the probe prints.
RAY_CLIENT_PROBE = """
import logging, sys, time
import ray
logging.basicConfig(stream=sys.stdout, level=logging.WARNING)
logging.getLogger("ray.util.client.worker").setLevel(logging.DEBUG)
t0 = time.monotonic()
try:
    ray.init(sys.argv[1], logging_level="ERROR")
except Exception as exc:
    print(f"refused after {time.monotonic() - t0:.1f} s: {type(exc).__name__}: {exc}")
    sys.exit(3)
@ray.remote(num_cpus=0)
def touch(path):
    open(path, "w").close()
ray.get(touch.remote(sys.argv[2]))
print("connected and ran")
"""


def test_rays_client_refuses_a_stranger(stack):
    marker = f"/data/runs/stranger-client-{stack.variant}"
    address = f"ray://127.0.0.1:{stack.ports['RAY_CLIENT_PORT']}"
    t0 = time.monotonic()
    probes = [  # both at once: each waits out the client's retries
        subprocess.Popen(
            [sys.executable, "-c", RAY_CLIENT_PROBE, address, marker],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=stack.ray_env(token),
        )
        for token in (None, "wrong-token")
    ]
    for proc in probes:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 3, out
        # It reached the client server, which refused the handshake for want of the token.
        assert "ChannelConnectivity.READY" in out, out
        assert "Invalid or missing authentication token" in out, out
    stack.notes["ray_client_refusals_s"] = round(time.monotonic() - t0, 1)
    assert not stack.on_volume(marker), "a refused client's task ran"


def _listening(port: int) -> list[tuple[str, str]]:
    """(local address, socket inode) of the host's listening TCP sockets on `port`."""
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, _, hexport = fields[1].partition(":")
            if fields[3] != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            if width == 8:
                text = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                text = socket.inet_ntop(socket.AF_INET6, words).removeprefix("::ffff:")
            out.append((text, fields[9]))
    return out


def _container_of_socket(inode: str) -> str | None:
    """The Docker container (full id) whose process holds the socket, from /proc."""
    target = f"socket:[{inode}]"
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if not any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                continue
            cgroup = (fd_dir.parent / "cgroup").read_text()
        except OSError:
            continue
        found = re.search(r"/docker/([0-9a-f]{64})", cgroup)
        return found.group(1) if found else None
    return None


OTHER_ADDRESS_PROBE = """
import json, socket, sys, urllib.error, urllib.request
other, ports, key = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
def answers(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False
control = socket.socket()
control.bind(("0.0.0.0", 0))
control.listen(1)
def get(url, key=None):
    req = urllib.request.Request(url)
    if key:
        req.add_header("Authorization", "Bearer " + key)
    try:
        return urllib.request.urlopen(req, timeout=30).status
    except urllib.error.HTTPError as err:
        return err.code
print(json.dumps({
    "loopback": {p: answers("127.0.0.1", p) for p in ports},
    "other": {p: answers(other, p) for p in ports},
    "control_other": answers(other, control.getsockname()[1]),
    "teacher_with_key": get(f"http://127.0.0.1:{ports[0]}/v1/teacher", key),
    "teacher_without_key": get(f"http://127.0.0.1:{ports[0]}/v1/teacher"),
}))
"""


def test_published_ports_listen_on_loopback_only(stack):
    inner = [stack.inner[p] for p in PUBLISHED]
    if stack.netns is None:
        # Host networking: the services' own sockets are the host's; read them, send nothing.
        # (Other processes of this machine may hold the same port number on another address.)
        label = f"label=com.docker.compose.project={PROJECT}"
        ours = set(stack.docker("ps", "-q", "--no-trunc", "--filter", label).stdout.split())
        for name in PUBLISHED:
            port = stack.inner[name]
            mine = {addr for addr, inode in _listening(port) if _container_of_socket(inode) in ours}
            assert mine, f"{name} {port}: no socket of the stack listens there"
            assert all(a.startswith("127.") for a in mine), f"{name} {port}: listens on {mine}"
        return
    # Bridge: from inside the namespace, the published ports answer on 127.0.0.1 and not on
    # the namespace's other address (where a socket bound to every address does answer).
    proc = stack.netns.run_in(
        [sys.executable, "-c", OTHER_ADDRESS_PROBE, OTHER_ADDRESS, json.dumps(inner), API_KEY]
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert all(seen["loopback"].values()), seen
    assert not any(seen["other"].values()), seen
    assert seen["control_other"], seen
    assert (seen["teacher_with_key"], seen["teacher_without_key"]) == (200, 401), seen
    for service in ("teacher-cpu", "ray-head"):
        bindings = json.loads(stack.docker(
            "inspect", "-f", "{{json .HostConfig.PortBindings}}", stack.container(service)
        ).stdout)  # fmt: skip
        assert bindings and all(b["HostIp"] == "127.0.0.1" for v in bindings.values() for b in v), (
            service,
            bindings,
        )


def test_prepare_and_precompute_jobs_over_rest(stack):
    train = _dataset(stack.tmp / "train.jsonl", rows=32, offset=0)
    heldout = _dataset(stack.tmp / "heldout.jsonl", rows=8, offset=100)
    stack.copy_in(train, "teacher-cpu", "/data/datasets/train.jsonl")
    stack.copy_in(heldout, "teacher-cpu", "/data/datasets/heldout.jsonl")
    stack.run_job("prepare")
    out = stack.run_job("precompute")  # the service's default command
    final = json.loads(out.strip().splitlines()[-1])
    assert final["state"] == "succeeded" and final["sequences_done"] == 32, final
    stack.run_job(
        "precompute", "todi", "precompute", "--dataset", "/data/datasets/heldout.jsonl",
        "--out", "/data/shards/heldout", "--top-k", "20", "--no-progress",
        "--server", f"http://teacher-cpu:{stack.inner['TEACHER_PORT']}",
    )  # fmt: skip
    verified = stack.run_job("train", "todi", "shards", "verify", "/data/shards/train")
    assert verified.startswith("ok:"), verified


def _train_workers(stack: Stack) -> list[dict[str, Any]]:
    return stack.ray_state("actors", class_name="RayTrainWorker")


def _assert_spread_over_workers(stack: Stack, actors: list[dict[str, Any]], n: int) -> None:
    nodes = {a["node_id"] for a in actors}
    assert len(actors) >= n, actors
    assert stack.notes["head_node"] not in nodes, "a training worker ran on the head"
    assert nodes <= stack.notes["worker_nodes"]
    assert len(nodes) == n, f"{n} workers on {len(nodes)} node(s): {nodes}"


def test_train_through_the_ray_client_spreads_over_worker_nodes(stack):
    before = {a["actor_id"] for a in _train_workers(stack)}
    out = stack.run_job("train", timeout=1800)  # --ray-address ray://ray-head:PORT
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert summary["steps"] == 3, summary
    workers = [a for a in _train_workers(stack) if a["actor_id"] not in before]
    _assert_spread_over_workers(stack, workers, 2)


def _ray_job(stack: Stack, submission_id: str) -> dict[str, Any]:
    status, job = stack.ray_http("GET", f"/api/jobs/{submission_id}")
    assert status == 200, (status, job)
    return job


def test_train_as_a_ray_job(stack):
    """`ray job submit` to the head's job API, from the host, with the token: what a Ray user
    runs."""
    before = {a["actor_id"] for a in _train_workers(stack)}
    ray_cli = str(Path(sys.executable).parent / "ray")
    entrypoint = [
        "todi", "train", "--shards", "/data/shards/train",
        "--student", f"init:teacher={MODEL},layers=2", "--out", "/data/runs/student-job",
        "--workers", "2", "--placement-strategy", "SPREAD", "--max-steps", "2",
        "--ray-address", "auto",
    ]  # fmt: skip
    proc = subprocess.run(
        [ray_cli, "job", "submit", "--address", stack.dashboard_url,
         "--submission-id", "todi-train-job", "--", *entrypoint],
        capture_output=True, text=True, timeout=1800, env=stack.ray_env(),
    )  # fmt: skip
    job = _ray_job(stack, "todi-train-job")
    if proc.returncode != 0 or job["status"] != "SUCCEEDED":
        _, logs = stack.ray_http("GET", "/api/jobs/todi-train-job/logs")
        stack.fail(
            f"ray job ended {job['status']} (exit {proc.returncode}):\n"
            f"{_tail(str((logs or {}).get('logs', logs)), 40)}\n{_tail(proc.stderr)}",
            "ray-head",
        )
    # The job's driver ran on the head; its workers on the two worker nodes.
    assert job["driver_node_id"] == stack.notes["head_node"]
    workers = [a for a in _train_workers(stack) if a["actor_id"] not in before]
    _assert_spread_over_workers(stack, workers, 2)
    assert all(a["job_id"] == workers[0]["job_id"] for a in workers)


def test_eval_job(stack):
    stack.run_job("eval", timeout=900)  # --student /data/runs/student/model
    report = stack.tmp / "eval.json"
    stack.copy_out("teacher-cpu", "/data/runs/student/eval.json", report)
    metrics = json.loads(report.read_text())
    assert metrics, metrics


def test_ray_precompute_runs_teacher_actors_on_worker_nodes(stack):
    spec = {
        "dataset": "train.jsonl", "out": "train-ray", "top_k": 20, "ray": True,
        "num_actors": 2, "positions_per_shard": 64, "job_id": "ray-capture",
    }  # fmt: skip
    status, body = stack.http("POST", "/v1/jobs", spec)
    assert status == 202, body
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline:
        status, job = stack.http("GET", "/v1/jobs/ray-capture")
        if job.get("state") in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(5)
    if job.get("state") != "succeeded":
        stack.fail(f"--ray precompute job: {job}", "teacher-cpu")
    assert job["sequences_done"] == 32 and job["shards"] >= 2, job
    # Ray's records of the actor pool (class name `MapWorker(MapBatches(TeacherActor))`) and of
    # the job's driver, which runs inside the cluster because the service is a Ray client.
    everything = stack.ray_state("actors")
    actors = [a for a in everything if "TeacherActor" in a["class_name"]]
    assert actors, [a["class_name"] for a in everything]
    assert any(a["class_name"] == "_ClusterDriver" for a in everything)
    nodes = {a["node_id"] for a in actors}
    assert stack.notes["head_node"] not in nodes and nodes <= stack.notes["worker_nodes"], nodes
    stack.notes["teacher_actor_nodes"] = len(nodes)
    verified = stack.run_job("train", "todi", "shards", "verify", "/data/shards/train-ray")
    assert verified.startswith("ok:"), verified


def test_trained_student_loads_with_transformers(stack):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = stack.tmp / "student"
    stack.copy_out("teacher-cpu", "/data/runs/student/model", dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    assert model.config.num_hidden_layers == 10
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape[-1] >= tok.vocab_size and bool(logits.isfinite().all())
    shutil.rmtree(dest)


def test_teacher_health_follows_its_engine(stack):
    """Kill the vLLM engine core inside the teacher container: /healthz says so (503)."""
    killer = (
        "import os, signal\n"
        "me = str(os.getpid())\n"
        "for p in filter(str.isdigit, os.listdir('/proc')):\n"
        "    if p == me:\n"
        "        continue\n"
        "    try:\n"
        "        cmd = open(f'/proc/{p}/cmdline', 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if b'EngineCore' in cmd:\n"
        "        os.kill(int(p), signal.SIGKILL); print(p)\n"
    )
    out = stack.docker("exec", stack.container("teacher-cpu"), "python3", "-c", killer)
    assert out.stdout.split(), "no vLLM engine core process found in the teacher container"
    deadline = time.monotonic() + 60
    status, body = 200, None
    while time.monotonic() < deadline:
        status, body = stack.http("GET", "/healthz", key=None)
        if status == 503:
            break
        time.sleep(1)
    assert status == 503 and "engine" in body["detail"], body


def test_down_removes_every_container_network_and_volume(stack):
    stack.compose("down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={PROJECT}"
    assert stack.docker("ps", "-aq", "--filter", label).stdout.split() == []
    assert stack.docker("network", "ls", "-q", "--filter", label).stdout.split() == []
    assert stack.docker("volume", "ls", "-q", "--filter", label).stdout.split() == []
