#!/usr/bin/env python3
"""Benchmark Depot's docker registry against the reference registry.

What it measures
    Depot (``depot.py``, a docker repository served on its own HTTP port) and
    the reference registry (CNCF Distribution 2.8, Debian package
    ``docker-registry``) run side by side on 127.0.0.1, each with a fresh data
    directory under one temp dir.  The same work runs against both, the order
    alternating every round, and one table gives each figure's median over the
    rounds for Depot, for the reference, and the ratio Depot/reference:

    * push of one big blob (default 1 GiB of incompressible bytes streamed from
      a file): monolithic ``POST`` + ``PUT ?digest=`` with Content-Length, and
      streamed ``PATCH`` with ``Transfer-Encoding: chunked`` + empty
      ``PUT ?digest=`` (MB/s, MB = 10^6 bytes);
    * pull of that blob (GET, read and discard) and 64 MiB ``Range`` reads from
      its middle (MB/s);
    * push and pull of 200 blobs of 1 MiB with 4 parallel clients (blobs/s);
    * 1,000 PUTs of small distinct OCI image manifests by tag, then GET and
      HEAD of each tag, 8 parallel clients (requests/s);
    * ``GET /v2/<name>/tags/list`` (1,000 tags) and ``GET /v2/_catalog``
      (200 image names), 300 requests each with 4 parallel clients
      (complete listings/s);
    * peak resident memory (VmRSS sampled every 10 ms) of each server process
      during each big push and during the big pull (MiB), and the CPU time
      the server process used for each (less sensitive than MB/s to other
      load on the machine);
    * the machine's limits, measured every round in the same temp dir: sha256
      speed of one core and sequential write + fsync of 1 GiB (like
      ``dd bs=1M count=1024 conv=fsync``), so the table says what fraction of
      min(disk, sha256) each server reaches for the big push and pull.

    Every response is checked (status codes, digests, pulled bytes equal to
    pushed bytes -- for the big blob by an untimed GET that hashes it after each
    push and after the pull --, listings complete and exact, an upload with a
    wrong digest refused) so a broken server cannot look fast; the
    first failure stops the run and is printed with its request, status and
    body.  Every push uses content new to the server (the big blob's last
    64 KiB change per push), so no push is a cheap "already have it".

How to run
    python scripts/bench.py                          # defaults: 3 rounds, 1 GiB
    python scripts/bench.py --rounds 1 --size-mib 64 # quick run
    python scripts/bench.py --json figures.json      # also save raw figures

    Needs Python 3.9+, ``requests``, what Depot needs (bottle, cheroot, apsw,
    cryptography) and the reference registry binary
    (``apt-get install docker-registry`` -> /usr/bin/docker-registry).
    Progress goes to stderr, the table to stdout.  Servers and temp dirs are
    removed on exit, also on Ctrl-C.  The client is Python too (threads, one
    keep-alive requests.Session per thread) sharing the machine's cores with
    both servers, so for fast servers the client can be the bound: read ratios
    near 1.0 in the many-small-requests rows with that in mind.  Other load on
    the machine moves every figure; the 'per round' column shows how much.
"""

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

try:
    import requests
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("bench.py needs the Python package 'requests': pip install requests")

MiB = 1 << 20
MB = 1_000_000
CHUNK = 1 * MiB                 # read/write block for big transfers
VARIANT_TAIL = 64 * 1024        # bytes at the end of the big blob that change per push
DISK_TEST_BYTES = 1024 * MiB   # sequential write + fsync for the disk limit
RANGE_LEN = 64 * MiB
RANGE_READS = 4                 # Range reads per round (same middle range)
SMALL_SIZE = 1 * MiB
SMALL_CLIENTS = 4
MANIFEST_CLIENTS = 8
LIST_CLIENTS = 4
LIST_REQUESTS = 300
RSS_INTERVAL = 0.010
REFERENCE_BIN = "/usr/bin/docker-registry"
DEPOT_PACKAGES = ("bottle", "cheroot", "apsw", "cryptography")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

# Image names inside each registry.  All workloads use names out of the
# catalog set, so /v2/_catalog holds exactly --catalog names.
BIG_IMAGE = "bench/img-000"
SMALL_IMAGE = "bench/img-001"
TAGS_IMAGE = "bench/img-002"


def catalog_names(count):
    return [f"bench/img-{i:03d}" for i in range(count)]


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A server answered wrongly (or not at all); stops the run."""


def describe(response, note=""):
    """One precise paragraph about a response: request, status, headers, body."""
    req = response.request
    try:
        body = response.text[:800]
    except RuntimeError:  # a streamed body, already read
        body = "(streamed body, already read)"
    headers = {k: v for k, v in response.headers.items()
               if k.lower() in ("location", "range", "content-type", "content-length",
                                "docker-content-digest", "content-range", "link")}
    return (f"{req.method} {req.url} -> {response.status_code} {response.reason}"
            f"{' (' + note + ')' if note else ''}\n    headers: {headers}\n    body: {body!r}")


def expect(response, *statuses, note=""):
    if response.status_code not in statuses:
        raise BenchError(describe(response, note or f"expected {' or '.join(map(str, statuses))}"))
    return response


def check(condition, response, note):
    if not condition:
        raise BenchError(describe(response, note))


# --------------------------------------------------------------------------
# processes: the two servers and the memory sampler

def free_ports(count):
    """`count` distinct loopback ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def die_with_parent():
    """preexec_fn: the kernel kills the server if this script dies hard."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_process(argv, log_path):
    log_file = open(log_path, "wb")
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)
    finally:
        log_file.close()


def stop_process(proc):
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def log_tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def wait_until(ready, proc, what, log_path, timeout=60.0):
    """Poll ready() until it returns truthy; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} while starting; "
                             f"log {log_path}:\n{log_tail(log_path)}")
        try:
            if ready():
                return
        except requests.RequestException as e:
            last_error = e
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer within {timeout:.0f}s (last error: {last_error}); "
                     f"log {log_path}:\n{log_tail(log_path)}")


class Server:
    """A registry under test: `url` is its http://host:port base, `pid` the
    process whose memory is sampled."""
    name = "server"

    def __init__(self, work_dir):
        self.work_dir = work_dir
        self.proc = None
        self.url = None
        self.state = {}          # per-server setup already done (catalog images ...)

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        stop_process(self.proc)


class ReferenceRegistry(Server):
    name = "reference"

    def __init__(self, work_dir, binary, label="reference"):
        super().__init__(work_dir)
        self.binary = binary
        self.name = label

    def start(self):
        data_dir = os.path.join(self.work_dir, "data")
        os.makedirs(data_dir)
        [port] = free_ports(1)
        config = os.path.join(self.work_dir, "config.yml")
        with open(config, "w") as f:
            f.write(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {data_dir}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:{port}
""")
        log_path = os.path.join(self.work_dir, "registry.log")
        self.proc = start_process([self.binary, "serve", config], log_path)
        self.url = f"http://127.0.0.1:{port}"
        wait_until(lambda: requests.get(self.url + "/v2/", timeout=2).status_code == 200,
                   self.proc, f"{self.name} registry", log_path)
        log(f"{self.name}: {self.binary} pid {self.pid} at {self.url}/v2/")


class Depot(Server):
    name = "depot"

    def __init__(self, work_dir, depot_py):
        super().__init__(work_dir)
        self.depot_py = depot_py

    def start(self):
        data_dir = os.path.join(self.work_dir, "data")
        api_port, registry_port = free_ports(2)
        log_path = os.path.join(self.work_dir, "depot.log")
        self.proc = start_process(
            [sys.executable, self.depot_py, "--host", "127.0.0.1", "--port", str(api_port),
             "--data-dir", data_dir, "--log-level", "warning"], log_path)
        api = f"https://127.0.0.1:{api_port}/api/v1"
        cert = os.path.join(data_dir, "cert.pem")

        def healthy():
            return os.path.exists(cert) and \
                requests.get(api + "/health", verify=cert, timeout=2).status_code == 200
        wait_until(healthy, self.proc, "depot", log_path)

        r = requests.post(api + "/repositories", verify=cert, timeout=30, json={
            "name": "bench", "type": "docker",
            "config": {"http_port": registry_port, "https_port": 0}})
        expect(r, 201, note="creating the docker repository")
        self.url = f"http://127.0.0.1:{registry_port}"
        wait_until(lambda: requests.get(self.url + "/v2/", timeout=2).status_code == 200,
                   self.proc, "depot docker registry", log_path)
        log(f"depot: {self.depot_py} pid {self.pid}, api {api}, registry {self.url}/v2/")


class ServerProbe:
    """Context manager watching one server process while the block runs:
    VmRSS at the start and its peak (sampled every 10 ms, MiB), and the CPU
    seconds (user + system) the process used."""

    def __init__(self, pid):
        self.pid = pid
        self.start_kib = self.peak_kib = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss_kib(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _cpu_seconds(self):
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return 0.0

    def _sample(self):
        self.peak_kib = max(self.peak_kib, self._rss_kib())

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(RSS_INTERVAL)

    def __enter__(self):
        self.start_kib = self.peak_kib = self._rss_kib()
        self._cpu_start = self._cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu_s = self._cpu_seconds() - self._cpu_start

    def figures(self, phase):
        return {f"rss_{phase}_mib": self.peak_kib / 1024,
                f"rss_start_{phase}_mib": self.start_kib / 1024,
                f"cpu_{phase}_s": self.cpu_s}


def vm_hwm_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------
# the machine's limits

def measure_sha256(buffer, total=512 * MiB):
    """MB/s of hashlib.sha256 on one core."""
    h = hashlib.sha256()
    view = memoryview(buffer)
    start = time.perf_counter()
    done = 0
    while done < total:
        h.update(view)
        done += len(view)
    return done / MB / (time.perf_counter() - start)


def measure_disk_write(directory, buffer, total):
    """MB/s of writing `total` random bytes to a new file and fsync-ing it."""
    path = os.path.join(directory, "disk-test")
    view = memoryview(buffer)
    os.sync()
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            done = 0
            while done < total:
                done += f.write(view[:total - done])
            os.fsync(f.fileno())
        return total / MB / (time.perf_counter() - start)
    finally:
        os.unlink(path)


# --------------------------------------------------------------------------
# the big blob: a file of random bytes whose last 64 KiB change per push

class BigBlob:
    def __init__(self, path, size):
        self.path = path
        self.size = size
        self.prefix_size = size - VARIANT_TAIL
        self._prefix_hash = hashlib.sha256()
        self.digest = None
        self._generate()

    def _generate(self):
        with open(self.path, "wb") as f:
            left = self.prefix_size
            while left:
                block = os.urandom(min(CHUNK, left))
                f.write(block)
                self._prefix_hash.update(block)
                left -= len(block)
            f.write(bytes(VARIANT_TAIL))

    def new_variant(self):
        """Rewrite the tail with fresh random bytes; set and return the new digest."""
        tail = os.urandom(VARIANT_TAIL)
        with open(self.path, "r+b") as f:
            f.seek(self.prefix_size)
            f.write(tail)
        h = self._prefix_hash.copy()
        h.update(tail)
        self.digest = "sha256:" + h.hexdigest()
        return self.digest

    def chunks(self, start=0, length=None):
        length = self.size - start if length is None else length
        with open(self.path, "rb") as f:
            f.seek(start)
            while length:
                block = f.read(min(CHUNK, length))
                if not block:
                    raise OSError(f"{self.path} is shorter than expected")
                length -= len(block)
                yield block

    def sized_body(self):
        """A body requests sends with Content-Length, in 1 MiB writes."""
        blob = self

        class Body:
            def __len__(self):
                return blob.size

            def __iter__(self):
                return blob.chunks()
        return Body()


# --------------------------------------------------------------------------
# registry protocol helpers

def with_digest(location, digest):
    """The upload location, kept as the server gave it, plus ?digest= (or &digest=)."""
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def start_upload(session, server, image):
    r = expect(session.post(f"{server.url}/v2/{image}/blobs/uploads/"), 202,
               note="starting a blob upload")
    check("Location" in r.headers, r, "202 without a Location header")
    return urllib.parse.urljoin(r.url, r.headers["Location"])


def check_blob_created(r, digest):
    expect(r, 201, note="completing a blob upload")
    got = r.headers.get("Docker-Content-Digest")
    check(got in (None, digest), r, f"Docker-Content-Digest {got} is not {digest}")


def push_blob_monolithic(session, server, image, body, digest):
    location = start_upload(session, server, image)
    r = session.put(with_digest(location, digest), data=body,
                    headers={"Content-Type": "application/octet-stream"})
    check_blob_created(r, digest)


def push_blob_chunked(session, server, image, chunks, digest):
    location = start_upload(session, server, image)
    r = session.patch(location, data=chunks, headers={"Content-Type": "application/octet-stream"})
    expect(r, 202, note="streamed (chunked) PATCH of the whole blob")
    check("Location" in r.headers, r, "PATCH 202 without a Location header")
    location = urllib.parse.urljoin(r.url, r.headers["Location"])
    r = session.put(with_digest(location, digest), data=b"")
    check_blob_created(r, digest)


def check_blob_stat(session, server, image, digest, size):
    r = expect(session.head(f"{server.url}/v2/{image}/blobs/{digest}"), 200,
               note="HEAD of a pushed blob")
    check(r.headers.get("Content-Length") == str(size), r, f"blob size is not {size}")


def blob_url(server, image, digest):
    return f"{server.url}/v2/{image}/blobs/{digest}"


# --------------------------------------------------------------------------
# the work, one function per row group; each returns {figure: value}

def check_big_blob_stored(server, blob):
    """Untimed: HEAD gives the size, and a GET returns bytes that hash to the digest."""
    with requests.Session() as session:
        check_blob_stat(session, server, BIG_IMAGE, blob.digest, blob.size)
        r = get_blob_stream(session, server, blob)
        h = hashlib.sha256()
        for c in r.raw.stream(CHUNK, decode_content=False):
            h.update(c)
        check("sha256:" + h.hexdigest() == blob.digest, r,
              f"pulled bytes hash to sha256:{h.hexdigest()}, pushed {blob.digest}")


def check_rejects_wrong_digest(server):
    """Once per server: an upload whose digest does not match must not be stored,
    or a server that skips hashing would look fast."""
    data = os.urandom(4096)
    wrong = "sha256:" + hashlib.sha256(data + b"x").hexdigest()
    with requests.Session() as session:
        location = start_upload(session, server, SMALL_IMAGE)
        r = session.put(with_digest(location, wrong), data=data)
        expect(r, 400, note="PUT with a digest that does not match the body must fail")
        r = session.head(blob_url(server, SMALL_IMAGE, wrong))
        expect(r, 404, note="a blob whose upload failed its digest must not exist")


def push_big_monolithic(server, blob):
    with requests.Session() as session, ServerProbe(server.pid) as probe:
        start = time.perf_counter()
        push_blob_monolithic(session, server, BIG_IMAGE, blob.sized_body(), blob.digest)
        elapsed = time.perf_counter() - start
    check_big_blob_stored(server, blob)
    return {"push_mono_mbps": blob.size / MB / elapsed, **probe.figures("push_mono")}


def push_big_chunked(server, blob):
    with requests.Session() as session, ServerProbe(server.pid) as probe:
        start = time.perf_counter()
        push_blob_chunked(session, server, BIG_IMAGE, blob.chunks(), blob.digest)
        elapsed = time.perf_counter() - start
    check_big_blob_stored(server, blob)
    return {"push_chunked_mbps": blob.size / MB / elapsed, **probe.figures("push_chunked")}


def get_blob_stream(session, server, blob, headers=None, status=200):
    r = session.get(blob_url(server, BIG_IMAGE, blob.digest), stream=True, headers=headers)
    if r.status_code != status:
        r.content  # read the body for the report
    return expect(r, status, note="pulling the big blob")


def pull_big(server, blob):
    """Timed GET that reads and discards, checking the length; then an
    untimed GET that hashes."""
    with requests.Session() as session:
        with ServerProbe(server.pid) as probe:
            start = time.perf_counter()
            r = get_blob_stream(session, server, blob)
            received = sum(len(c) for c in r.raw.stream(CHUNK, decode_content=False))
            elapsed = time.perf_counter() - start
        check(received == blob.size, r, f"received {received} bytes, expected {blob.size}")
        got = r.headers.get("Docker-Content-Digest")
        check(got in (None, blob.digest), r, f"Docker-Content-Digest {got} is not {blob.digest}")
    check_big_blob_stored(server, blob)
    return {"pull_mbps": blob.size / MB / elapsed, **probe.figures("pull")}


def range_read(server, blob):
    length = min(RANGE_LEN, blob.size // 2)
    first = blob.size // 2 - length // 2
    last = first + length - 1
    expected = b"".join(blob.chunks(first, length))
    elapsed = 0.0
    with requests.Session() as session:
        for _ in range(RANGE_READS):
            start = time.perf_counter()
            r = get_blob_stream(session, server, blob, headers={"Range": f"bytes={first}-{last}"},
                                status=206)
            parts = list(r.raw.stream(CHUNK, decode_content=False))
            elapsed += time.perf_counter() - start
            data = b"".join(parts)
            check(r.headers.get("Content-Range", "").startswith(f"bytes {first}-{last}/"), r,
                  f"Content-Range is not bytes {first}-{last}/{blob.size}")
            check(data == expected, r, f"Range bytes {first}-{last} differ from the blob's")
    return {"range_mbps": RANGE_READS * length / MB / elapsed}


def make_small_blobs(count):
    blobs = [os.urandom(SMALL_SIZE) for _ in range(count)]
    return [(b, "sha256:" + hashlib.sha256(b).hexdigest()) for b in blobs]


def run_parallel(clients, items, work):
    """Call work(session, item) for every item from `clients` threads, each
    with its own keep-alive requests.Session; return the elapsed seconds.
    The first failure is re-raised; pending items are then dropped."""
    local = threading.local()
    sessions = []

    def call(item):
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            sessions.append(session)
        work(session, item)

    pool = ThreadPoolExecutor(clients)
    try:
        start = time.perf_counter()
        for future in [pool.submit(call, item) for item in items]:
            future.result()
        return time.perf_counter() - start
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for session in sessions:
            session.close()


def push_pull_small_blobs(server, blobs):
    def push(session, blob):
        data, digest = blob
        push_blob_monolithic(session, server, SMALL_IMAGE, data, digest)

    def pull(session, blob):
        data, digest = blob
        r = expect(session.get(blob_url(server, SMALL_IMAGE, digest)), 200,
                   note="pulling a small blob")
        check(r.content == data, r, "pulled bytes differ from the pushed bytes")

    push_s = run_parallel(SMALL_CLIENTS, blobs, push)
    pull_s = run_parallel(SMALL_CLIENTS, blobs, pull)
    return {"small_push_bps": len(blobs) / push_s, "small_pull_bps": len(blobs) / pull_s}


def image_base(session, server, image):
    """Push one config and one layer blob into `image`; return their descriptors."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = b"depot bench layer\n" * 64
    descriptors = []
    for data, media_type in ((config, OCI_CONFIG), (layer, OCI_LAYER)):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        push_blob_monolithic(session, server, image, data, digest)
        descriptors.append({"mediaType": media_type, "digest": digest, "size": len(data)})
    return descriptors


def image_manifest(descriptors, **annotations):
    config, layer = descriptors
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                       "layers": [layer], "annotations": annotations},
                      separators=(",", ":")).encode()


def put_manifest(session, server, image, tag, body):
    r = session.put(f"{server.url}/v2/{image}/manifests/{tag}", data=body,
                    headers={"Content-Type": OCI_MANIFEST})
    expect(r, 201, note="PUT of an OCI image manifest by tag")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    got = r.headers.get("Docker-Content-Digest")
    check(got in (None, digest), r, f"Docker-Content-Digest {got} is not {digest}")


def tag_name(i):
    return f"t{i:04d}"


def manifests(server, round_no, count):
    with requests.Session() as session:
        descriptors = image_base(session, server, TAGS_IMAGE)
    bodies = {tag_name(i): image_manifest(descriptors, **{"bench.round": str(round_no),
                                                          "bench.index": str(i)})
              for i in range(count)}
    url = f"{server.url}/v2/{TAGS_IMAGE}/manifests/"
    accept = {"Accept": OCI_MANIFEST}

    def put(session, tag):
        put_manifest(session, server, TAGS_IMAGE, tag, bodies[tag])

    def get(session, tag):
        r = expect(session.get(url + tag, headers=accept), 200, note="GET of a manifest by tag")
        check(r.content == bodies[tag], r, "manifest differs from the one pushed")

    def head(session, tag):
        r = expect(session.head(url + tag, headers=accept), 200, note="HEAD of a manifest by tag")
        check(r.headers.get("Content-Length") == str(len(bodies[tag])), r,
              f"Content-Length is not {len(bodies[tag])}")
        digest = "sha256:" + hashlib.sha256(bodies[tag]).hexdigest()
        check(r.headers.get("Docker-Content-Digest") in (None, digest), r,
              f"Docker-Content-Digest is not {digest}")

    tags = list(bodies)
    return {"manifest_put_rps": count / run_parallel(MANIFEST_CLIENTS, tags, put),
            "manifest_get_rps": count / run_parallel(MANIFEST_CLIENTS, tags, get),
            "manifest_head_rps": count / run_parallel(MANIFEST_CLIENTS, tags, head)}


def ensure_catalog_images(server, names):
    """Once per server: give every catalog name one image (tag 'latest')."""
    if server.state.get("catalog"):
        return
    with requests.Session() as session:
        descriptors = image_base(session, server, names[0])
    body = image_manifest(descriptors)

    def put(session, image):
        if image != names[0]:
            image_base(session, server, image)
        put_manifest(session, server, image, "latest", body)
    run_parallel(MANIFEST_CLIENTS, [n for n in names if n != TAGS_IMAGE], put)
    server.state["catalog"] = True


def list_all(session, url, key):
    """GET a listing, following Link pagination; return (items, response)."""
    items = []
    while True:
        r = expect(session.get(url), 200, note="listing")
        items.extend(r.json().get(key) or [])
        link = r.headers.get("Link")
        if not link:
            return items, r
        url = urllib.parse.urljoin(r.url, link.split(";")[0].strip().strip("<>"))


def listings(server, tag_count, names):
    ensure_catalog_images(server, names)
    tags_url = f"{server.url}/v2/{TAGS_IMAGE}/tags/list"
    # n= so that a registry paginating by default (the reference: 100) answers
    # in one page, as it would for a client asking for the whole catalog.
    catalog_url = f"{server.url}/v2/_catalog?n={max(1000, 2 * len(names))}"
    want_tags = {tag_name(i) for i in range(tag_count)}
    want_names = set(names)

    def tags(session, _):
        got, r = list_all(session, tags_url, "tags")
        check(set(got) == want_tags and len(got) == tag_count, r,
              f"tags/list has {len(got)} tags, expected exactly {tag_count}")
        check(r.json().get("name") == TAGS_IMAGE, r, f"tags/list name is not {TAGS_IMAGE}")

    def catalog(session, _):
        got, r = list_all(session, catalog_url, "repositories")
        check(set(got) == want_names and len(got) == len(names), r,
              f"_catalog has {len(got)} names, expected exactly the {len(names)} pushed")

    return {"tags_list_rps": LIST_REQUESTS / run_parallel(LIST_CLIENTS, range(LIST_REQUESTS), tags),
            "catalog_rps": LIST_REQUESTS / run_parallel(LIST_CLIENTS, range(LIST_REQUESTS), catalog)}


# --------------------------------------------------------------------------
# rounds, medians, table

def machine_limits(directory, disk_bytes):
    buffer = os.urandom(64 * MiB)
    return {"loadavg_1min": os.getloadavg()[0],
            "sha256_mbps": measure_sha256(buffer),
            "disk_write_mbps": measure_disk_write(directory, buffer, disk_bytes)}


def run_round(round_no, servers, blob, args, figures):
    """One round: every piece of work against every server, in alternating order."""
    order = servers if round_no % 2 else servers[::-1]
    names = catalog_names(args.catalog)

    def each(what, work, *work_args):
        for server in order:
            os.sync()  # so one server's dirty pages are not the next one's writeback
            log(f"round {round_no}: {what} on {server.name}")
            try:
                figures[server.name][-1].update(work(server, *work_args))
            except (BenchError, requests.RequestException) as e:
                raise BenchError(f"{server.name}, {what}: {e}") from e

    log(f"round {round_no}: machine limits (sha256, disk write + fsync)")
    figures["machine"].append(machine_limits(os.path.dirname(blob.path), DISK_TEST_BYTES))
    for server in servers:
        figures[server.name].append({})
    blob.new_variant()
    each(f"{args.size_mib} MiB push, monolithic PUT", push_big_monolithic, blob)
    blob.new_variant()
    each(f"{args.size_mib} MiB push, chunked PATCH", push_big_chunked, blob)
    each(f"{args.size_mib} MiB pull", pull_big, blob)
    each("Range reads", range_read, blob)
    small = make_small_blobs(args.small_count)
    each(f"{args.small_count} small blobs push + pull", push_pull_small_blobs, small)
    del small
    each(f"{args.manifests} manifests PUT/GET/HEAD", manifests, round_no, args.manifests)
    each("tags/list and _catalog", listings, args.manifests, names)


def rows(args):
    """(key, label, unit, True if higher is better); a key ending in
    "/limit" is that figure as a percentage of min(disk, sha256)."""
    big = f"{args.size_mib} MiB" if args.size_mib != 1024 else "1 GiB"
    rng = min(RANGE_LEN, args.size_mib * MiB // 2) // MiB
    return [
        ("push_mono_mbps", f"{big} blob push, POST + PUT (monolithic)", "MB/s", True),
        ("push_chunked_mbps", f"{big} blob push, chunked PATCH + PUT", "MB/s", True),
        ("pull_mbps", f"{big} blob pull, GET", "MB/s", True),
        ("range_mbps", f"{rng} MiB Range GET from the middle", "MB/s", True),
        ("small_push_bps", f"{args.small_count} x 1 MiB blob push, {SMALL_CLIENTS} clients",
         "blobs/s", True),
        ("small_pull_bps", f"{args.small_count} x 1 MiB blob pull, {SMALL_CLIENTS} clients",
         "blobs/s", True),
        ("manifest_put_rps", f"{args.manifests} manifest PUT by tag, {MANIFEST_CLIENTS} clients",
         "req/s", True),
        ("manifest_get_rps", f"manifest GET by tag, {MANIFEST_CLIENTS} clients", "req/s", True),
        ("manifest_head_rps", f"manifest HEAD by tag, {MANIFEST_CLIENTS} clients", "req/s", True),
        ("tags_list_rps", f"tags/list ({args.manifests} tags), {LIST_CLIENTS} clients",
         "req/s", True),
        ("catalog_rps", f"_catalog ({args.catalog} names), {LIST_CLIENTS} clients", "req/s", True),
        ("rss_start_push_mono_mib", f"RSS before the {big} monolithic push", "MiB", False),
        ("rss_push_mono_mib", f"peak RSS during {big} monolithic push", "MiB", False),
        ("rss_push_chunked_mib", f"peak RSS during {big} chunked push", "MiB", False),
        ("rss_pull_mib", f"peak RSS during {big} pull", "MiB", False),
        ("cpu_push_mono_s", f"server CPU time for {big} monolithic push", "s", False),
        ("cpu_push_chunked_s", f"server CPU time for {big} chunked push", "s", False),
        ("cpu_pull_s", f"server CPU time for {big} pull", "s", False),
        ("push_mono_mbps/limit", f"{big} monolithic push / min(disk, sha256)", "%", True),
        ("push_chunked_mbps/limit", f"{big} chunked push / min(disk, sha256)", "%", True),
        ("pull_mbps/limit", f"{big} pull / min(disk, sha256)", "%", True),
    ]


def median_of(per_round, key):
    values = [r[key] for r in per_round if key in r]
    return statistics.median(values) if values else None


def machine_limit(figures):
    """min(disk, sha256) MB/s, each the median of the rounds."""
    return min(median_of(figures["machine"], "sha256_mbps"),
               median_of(figures["machine"], "disk_write_mbps"))


def table_figure(figures, name, key):
    if key.endswith("/limit"):
        value = median_of(figures[name], key.removesuffix("/limit"))
        return None if value is None else 100 * value / machine_limit(figures)
    return median_of(figures[name], key)


def round_ratios(figures, a, b, key):
    """min-max of the per-round ratios a/b: how much the ratio moved between rounds."""
    key = key.removesuffix("/limit")
    ratios = [ra[key] / rb[key] for ra, rb in zip(figures[a], figures[b])
              if key in ra and rb.get(key)]
    if not ratios:
        return "-"
    return f"{min(ratios):.2f}" if len(ratios) == 1 else f"{min(ratios):.2f}-{max(ratios):.2f}"


def fmt(value):
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"


def print_table(figures, servers, args, out=sys.stdout):
    a, b = (server.name for server in servers)
    header = ["figure", "unit", "better", a, b, "ratio", "per round"]
    lines = []
    for key, label, unit, higher in rows(args):
        va, vb = table_figure(figures, a, key), table_figure(figures, b, key)
        ratio = f"{va / vb:.2f}" if va is not None and vb else "-"
        lines.append([label, unit, "higher" if higher else "lower", fmt(va), fmt(vb), ratio,
                      round_ratios(figures, a, b, key)])
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]

    def show(row):
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip(), file=out)

    rounds = len(figures["machine"])
    print(f"Medians of {rounds} round{'s' if rounds != 1 else ''}, MB = 10^6 bytes. ratio = "
          f"{a}/{b} of the medians; 'per round' = its range\nwithin single rounds (the noise); "
          f"whether a ratio above 1 is good depends on 'better'.", file=out)
    show(header)
    show(["-" * w for w in widths])
    for line in lines:
        show(line)
    sha = median_of(figures["machine"], "sha256_mbps")
    disk = median_of(figures["machine"], "disk_write_mbps")
    loads = [m["loadavg_1min"] for m in figures["machine"]]
    print(f"\nmachine: sha256 on one core {fmt(sha)} MB/s; write + fsync of {DISK_TEST_BYTES // MiB} MiB "
          f"in the temp dir {fmt(disk)} MB/s; limit = min = {fmt(machine_limit(figures))} MB/s.\n"
          f"{os.cpu_count()} CPUs, 1-minute load average at the rounds' starts "
          f"{', '.join(f'{x:.1f}' for x in loads)}.\n"
          f"A pull needs neither a hash nor a disk write, so it can pass 100% of the limit.",
          file=out)
    if max(loads) > (os.cpu_count() or 1):
        print("The machine was busy with other work (load above its CPU count): expect noise, "
              "see 'per round'.", file=out)


# --------------------------------------------------------------------------
# main

def missing_requirements(args):
    problems = []
    if not (os.path.isfile(args.registry_bin) and os.access(args.registry_bin, os.X_OK)):
        problems.append(f"the reference registry {args.registry_bin} is missing: "
                        "apt-get install docker-registry (or pass --registry-bin PATH)")
    if not args.dev_self_compare:
        if not os.path.isfile(args.depot):
            problems.append(f"Depot's {args.depot} is missing (or pass --depot PATH)")
        import importlib.util
        for package in DEPOT_PACKAGES:
            if importlib.util.find_spec(package) is None:
                problems.append(f"Depot needs the Python package {package!r}: pip install {package}")
    return problems


def parse_args():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the docstring at the top of scripts/bench.py.")
    p.add_argument("--rounds", type=int, default=3, help="rounds per server (default 3)")
    p.add_argument("--size-mib", type=int, default=1024, help="big blob size in MiB (default 1024)")
    p.add_argument("--small-count", type=int, default=200, help="number of 1 MiB blobs (default 200)")
    p.add_argument("--manifests", type=int, default=1000, help="manifests/tags (default 1000)")
    p.add_argument("--catalog", type=int, default=200, help="image names in the catalog (default 200)")
    p.add_argument("--json", metavar="FILE", help="also save the raw per-round figures here")
    p.add_argument("--depot", default=os.path.join(here, "depot.py"), help="path of depot.py")
    p.add_argument("--registry-bin", default=shutil.which("docker-registry") or REFERENCE_BIN,
                   help=f"reference registry binary (default {REFERENCE_BIN})")
    p.add_argument("--tmp-dir", help="parent of the temp dir (default: the system's)")
    # Development aid: a second reference registry takes Depot's place.
    p.add_argument("--dev-self-compare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.size_mib < 2 or args.rounds < 1 or args.catalog < 3 or args.manifests < 1 \
            or args.small_count < 1:
        p.error("need --size-mib >= 2, --rounds >= 1, --catalog >= 3, --manifests and "
                "--small-count >= 1")
    return args


def raise_on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    args = parse_args()
    problems = missing_requirements(args)
    if problems:
        sys.exit("bench.py cannot run:\n  " + "\n  ".join(problems))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in background
    signal.signal(signal.SIGTERM, raise_on_signal)
    signal.signal(signal.SIGHUP, raise_on_signal)

    root = tempfile.mkdtemp(prefix="depot-bench-", dir=args.tmp_dir)
    servers = []
    figures = {"machine": []}
    try:
        for sub in ("depot", "reference"):
            os.makedirs(os.path.join(root, sub))
        if args.dev_self_compare:
            first = ReferenceRegistry(os.path.join(root, "depot"), args.registry_bin, "reference2")
        else:
            first = Depot(os.path.join(root, "depot"), args.depot)
        servers = [first, ReferenceRegistry(os.path.join(root, "reference"), args.registry_bin)]
        for server in servers:
            figures[server.name] = []
        log(f"temp dir {root}; generating the {args.size_mib} MiB blob")
        blob = BigBlob(os.path.join(root, "big.blob"), args.size_mib * MiB)
        for server in servers:
            server.start()
            try:
                check_rejects_wrong_digest(server)
            except (BenchError, requests.RequestException) as e:
                raise BenchError(f"{server.name}, digest check: {e}") from e
        for round_no in range(1, args.rounds + 1):
            run_round(round_no, servers, blob, args, figures)
        for server in servers:
            figures.setdefault("vm_hwm_mib", {})[server.name] = vm_hwm_mib(server.pid)
        print_table(figures, servers, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "figures": figures,
                           "medians": {s.name: {k: table_figure(figures, s.name, k)
                                                for k, *_ in rows(args)} for s in servers}},
                          f, indent=2)
            log(f"raw figures saved to {args.json}")
        return 0
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
