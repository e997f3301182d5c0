"""A Docker engine confined to a network namespace, for running the production compose file
(bridge networks, published ports, iptables) on a machine whose own engine has no bridge.

The host's networking is never touched: the namespace is created here, the engine is started
inside it with `nsenter --net` (its bridges, veth pairs, NAT rules and ip_forward live in the
namespace; only its unix socket, a file, is visible from the host), and traffic goes only to
loopback addresses inside the namespace. From the host:
- `docker -H unix://<socket>` / DOCKER_HOST drive the engine (compose included);
- `forward()` starts a small forwarder (this module run as a script) that listens on the host's
  loopback and connects, from inside the namespace, to the namespace's 127.0.0.1: a client on
  the host then reaches the stack's published ports as a client inside the namespace would;
- `run_in()` runs a command inside the namespace (`ip netns exec`).
Needs root, iproute2, nsenter and dockerd.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

DOCKER = "/usr/bin/docker"
CLONE_NEWNET = 0x40000000
# An address of the namespace other than loopback (TEST-NET-2, RFC 5737: routed nowhere),
# standing for a machine's public address.
OTHER_ADDRESS = "198.51.100.7"


class EngineError(RuntimeError):
    pass


class NetnsDocker:
    def __init__(self, name: str = "todi-test-ns") -> None:
        self.name = name
        self.netns = f"/run/netns/{name}"
        self.socket = f"/run/{name}-docker.sock"
        self.host = f"unix://{self.socket}"
        self.data_root = Path(f"/var/lib/{name}-docker")  # kept: images survive a rerun
        self.exec_root = Path(f"/run/{name}-docker")
        self.pidfile = Path(f"/run/{name}-docker.pid")
        self.log = Path(f"/var/log/{name}-docker.log")
        self.proc: subprocess.Popen | None = None
        self.forwarders: list[subprocess.Popen] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> None:
        if os.geteuid() != 0:
            raise EngineError("a Docker engine in a network namespace needs root")
        tools = {t: shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
                 for t in ("ip", "nsenter", "dockerd")}  # fmt: skip
        missing = [t for t, path in tools.items() if path is None]
        if missing:
            raise EngineError(f"missing tools: {', '.join(missing)}")
        self._stop_leftover()
        if Path(self.netns).exists():
            _check(["ip", "netns", "delete", self.name])
        _check(["ip", "netns", "add", self.name])
        ip = ["ip", "-n", self.name]
        _check([*ip, "link", "set", "lo", "up"])
        # The "other address": on one end of a veth pair whose two ends both stay inside the
        # namespace (the kernel here has veth, which Docker's bridges need, but no dummy).
        _check([*ip, "link", "add", "todi-other", "type", "veth", "peer", "name", "todi-other-p"])
        _check([*ip, "addr", "add", f"{OTHER_ADDRESS}/24", "dev", "todi-other"])
        _check([*ip, "link", "set", "todi-other", "up"])
        _check([*ip, "link", "set", "todi-other-p", "up"])
        self.data_root.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [tools["nsenter"], f"--net={self.netns}", tools["dockerd"],
                 "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                 "--pidfile", str(self.pidfile), "-H", self.host,
                 "--storage-driver=overlay2", "--exec-opt", "native.cgroupdriver=cgroupfs"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"dockerd in {self.name} exited:\n{self.log_tail()}")
            if self.docker("info", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise EngineError(f"dockerd in {self.name} did not answer in {timeout:.0f} s")

    def stop(self) -> None:
        for fwd in self.forwarders:
            if fwd.poll() is None:
                fwd.terminate()
                fwd.wait(10)
        self.forwarders.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None
        if Path(self.netns).exists():
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)

    def _stop_leftover(self) -> None:
        """An engine of this name left by a crashed run (its own pidfile) would hold the data
        root: stop that one process, by its id."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"dockerd" in cmdline and str(self.data_root).encode() in cmdline:
            os.kill(pid, signal.SIGTERM)
            for _ in range(120):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- use -----------------------------------------------------------------------------------
    def docker(self, *args: str, check: bool = True, timeout: float = 300):
        proc = subprocess.run([DOCKER, "-H", self.host, *args], capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        if check and proc.returncode != 0:
            raise EngineError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def load_image(self, image: str, host_env: dict[str, str]) -> bool:
        """Copy `image` from the host's engine (`docker save | docker load`) unless the same
        image id is already there; True when it was copied."""
        inspect = [DOCKER, "image", "inspect", "-f", "{{.Id}}", image]
        want = subprocess.run(
            inspect, env=host_env, capture_output=True, text=True, check=True
        ).stdout.strip()
        have = self.docker("image", "inspect", "-f", "{{.Id}}", image, check=False).stdout.strip()
        if have == want:
            return False
        save = subprocess.Popen([DOCKER, "save", image], stdout=subprocess.PIPE, env=host_env)
        load = subprocess.run([DOCKER, "-H", self.host, "load"], stdin=save.stdout,
                              capture_output=True, text=True, timeout=1800)  # fmt: skip
        assert save.stdout is not None
        save.stdout.close()
        if save.wait() != 0 or load.returncode != 0:
            raise EngineError(f"docker save | load of {image} failed: {load.stderr.strip()}")
        return True

    def run_in(self, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        """A command inside the namespace."""
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, timeout=timeout, **kw)  # fmt: skip

    def forward(self, ports: list[int]) -> list[int]:
        """Host loopback ports that lead to these ports of the namespace's 127.0.0.1."""
        log = Path(f"/tmp/{self.name}-forward-{len(self.forwarders)}.log")
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, __file__, self.netns, *map(str, ports)],
                stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        self.forwarders.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if len(line) != len(ports):
            raise EngineError(f"port forwarder failed: {log.read_text()[-2000:]}")
        return [int(p) for p in line]


def _check(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise EngineError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")


# -- the forwarder (run as a script) -----------------------------------------------------------
def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)  # pass the half-close on
    except OSError:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _serve(listener: socket.socket, target: int) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            out = socket.create_connection(("127.0.0.1", target), timeout=10)
        except OSError:
            conn.close()  # the namespace's port does not answer: neither does this one
            continue
        out.settimeout(None)
        for a, b in ((conn, out), (out, conn)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _forward_main(netns: str, targets: list[int]) -> None:
    listeners = []
    for _ in targets:  # bound in the host's namespace, before switching
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        listeners.append(s)
    fd = os.open(netns, os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:  # sockets made from now on live in the namespace
        raise OSError(ctypes.get_errno(), f"setns({netns})")
    os.close(fd)
    print(" ".join(str(s.getsockname()[1]) for s in listeners), flush=True)
    threads = [
        threading.Thread(target=_serve, args=(s, t), daemon=True)
        for s, t in zip(listeners, targets, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    _forward_main(sys.argv[1], [int(p) for p in sys.argv[2:]])
