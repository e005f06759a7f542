"""Fixtures: a real Depot on free ports in a temporary data directory.

Every test talks to it over real HTTP and TLS; the generated certificate is
the trust anchor (``verify=depot.cert``), never verification switched off.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

DEPOT = pathlib.Path(__file__).resolve().parent.parent / "depot.py"


def free_port():
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DepotProcess:
    """One Depot process: start, stop, kill, and an HTTPS client for its API."""

    def __init__(self, data_dir, port=None, extra=(), env=None):
        self.data_dir = pathlib.Path(data_dir)
        self.port = port or free_port()
        self.extra = list(extra)
        self.env = env or {}
        self.url = "https://127.0.0.1:%d" % self.port
        self.cert = str(self.data_dir / "cert.pem")
        self.log_path = self.data_dir.parent / (self.data_dir.name + ".log")
        self.process = None
        self.session = requests.Session()

    def command(self):
        return [sys.executable, str(DEPOT), "--host", "127.0.0.1",
                "--port", str(self.port), "--data-dir", str(self.data_dir),
                *self.extra]

    def start(self, wait=True):
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(), stdout=self.log_file, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env})
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("Depot exited with %s:\n%s"
                                   % (self.process.returncode, self.log()))
            try:
                if os.path.exists(self.cert):
                    answer = self.session.get(self.url + "/api/v1/health",
                                              verify=self.cert, timeout=2)
                    if answer.status_code == 200:
                        return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError("Depot did not answer in %d s:\n%s"
                           % (timeout, self.log()))

    def log(self):
        return self.log_path.read_text(errors="replace") \
            if self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Stop the process with ``sig``; returns its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log_file.close()
        self.session.close()
        self.session = requests.Session()
        return code

    def kill(self):
        return self.stop(signal.SIGKILL)

    def restart(self):
        self.stop()
        return self.start()

    def request(self, method, path, **kwargs):
        """An HTTPS request to the main port, verified with Depot's certificate."""
        kwargs.setdefault("verify", self.cert)
        kwargs.setdefault("timeout", 60)
        return self.session.request(method, self.url + path, **kwargs)

    def api(self, method, path, **kwargs):
        """A request to the management API (``path`` below /api/v1)."""
        return self.request(method, "/api/v1" + path, **kwargs)

    def create_repository(self, name, kind, **fields):
        answer = self.api("POST", "/repositories",
                          json={"name": name, "type": kind, **fields})
        assert answer.status_code == 201, answer.text
        return answer.json()


class DockerRepository:
    """A docker repository of the test Depot with its own plain-HTTP port."""

    def __init__(self, depot, name, port):
        self.depot, self.name, self.port = depot, name, port
        self.host = "127.0.0.1:%d" % port
        self.url = "http://" + self.host


@pytest.fixture(scope="session")
def depot(tmp_path_factory):
    """A Depot shared by the tests of a session (each uses its own repositories)."""
    process = DepotProcess(tmp_path_factory.mktemp("depot") / "data").start()
    yield process
    process.stop()


@pytest.fixture
def fresh_depot(tmp_path):
    """A Depot of the test's own, for tests that stop, kill or restart it."""
    process = DepotProcess(tmp_path / "data").start()
    yield process
    process.stop()


_counter = iter(range(1, 1 << 30))


@pytest.fixture
def docker_repo(depot):
    """A new docker repository on a free plain-HTTP port, deleted afterwards."""
    name = "docker-%d" % next(_counter)
    port = free_port()
    depot.create_repository(name, "docker", config={"http_port": port})
    yield DockerRepository(depot, name, port)
    depot.api("DELETE", "/repositories/" + name)


@pytest.fixture
def raw_repo(depot):
    """A new raw repository; yields its name, deleted afterwards."""
    name = "raw-%d" % next(_counter)
    depot.create_repository(name, "raw")
    yield name
    depot.api("DELETE", "/repositories/" + name)
