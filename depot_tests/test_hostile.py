"""Hostile requests: traversal, oversized and lying requests, broken encodings.

Every request here is sent as bytes on a bare socket (or with ``http.client``)
so that no client library normalises it. Each case checks three things: the
answer is a 4xx in the surface's error format (``{"error": ...}`` on the
main port, ``{"errors": [...]}`` on registry ports) or the connection is
closed; nothing was stored (checked through listings afterwards); Depot
still serves. Security basics close the file: key file mode, what the log
holds, TLS versions.
"""

import hashlib
import json
import os
import pathlib
import socket
import ssl
import stat
import threading
import time
import uuid

import pytest
import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------
# Bare HTTP
# ---------------------------------------------------------------------------

class Reply:
    """A parsed HTTP answer (or the lack of one: ``status`` None)."""

    def __init__(self, raw):
        self.raw = raw
        self.status = None
        self.headers = {}
        self.body = b""
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1."):
            return
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            key, _, value = line.partition(":")
            self.headers[key.strip().lower()] = value.strip()
        length = self.headers.get("content-length")
        self.body = body[:int(length)] if length is not None else body
        self.rest = body[int(length):] if length is not None else b""

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "Reply(%r)" % self.raw[:600]


class Client:
    """Bare-socket requests to one port of the test Depot."""

    def __init__(self, port, tls=None):
        self.port, self.tls = port, tls

    def connect(self, timeout=30):
        sock = socket.create_connection(("127.0.0.1", self.port),
                                        timeout=timeout)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname="127.0.0.1")
        return sock

    def exchange(self, data, half_close=False, timeout=30):
        """Send ``data``, optionally half-close, read until the server closes.

        Returns a Reply; a reset or TLS alert counts as a closed connection.
        """
        sock = self.connect(timeout)
        out = b""

        def sender():
            # A server may answer (413, 400) before it has read the whole
            # body; sending from a thread lets that answer be read.
            try:
                sock.sendall(data)
                if half_close:
                    # The TCP half-close, below TLS when there is TLS.
                    socket.socket.shutdown(sock, socket.SHUT_WR)
            except (OSError, ssl.SSLError):
                pass

        if self.tls is not None:
            sender()  # an SSL socket is not to be used from two threads
        else:
            thread = threading.Thread(target=sender, daemon=True)
            thread.start()
        try:
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                out += piece
        except (OSError, ssl.SSLError):
            pass
        finally:
            if self.tls is None:
                thread.join(timeout)
            sock.close()
        return Reply(out)

    def request(self, method, target, headers=None, body=b"", length=None,
                half_close=False, extra=b""):
        """One request; ``length`` overrides Content-Length (it may lie)."""
        if isinstance(target, str):
            target = target.encode("ascii")
        head = [method.encode() + b" " + target + b" HTTP/1.1",
                b"Host: 127.0.0.1:%d" % self.port, b"Connection: close"]
        headers = dict(headers or {})
        if body or length is not None or method in ("PUT", "POST", "PATCH"):
            headers.setdefault("Content-Length",
                               str(len(body) if length is None else length))
        for key, value in headers.items():
            head.append(key.encode("latin-1") + b": " + (
                value if isinstance(value, bytes) else value.encode("latin-1")))
        return self.exchange(b"\r\n".join(head) + b"\r\n\r\n" + body + extra,
                             half_close=half_close)


@pytest.fixture
def main(depot):
    return Client(depot.port, ssl.create_default_context(cafile=depot.cert))


@pytest.fixture
def registry(docker_repo):
    return Client(docker_repo.port)


def api_error(reply, *statuses):
    assert reply.status is not None, reply
    if statuses:
        assert reply.status in statuses, reply
    else:
        assert 400 <= reply.status < 500, reply
    assert reply.headers.get("content-type", "").startswith(
        "application/json"), reply
    body = reply.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) \
        and body["error"], reply
    return body["error"]


def registry_error(reply, *codes, status=None):
    assert reply.status is not None, reply
    if status is not None:
        assert reply.status == status, reply
    else:
        assert 400 <= reply.status < 500, reply
    assert reply.headers.get("content-type", "").startswith(
        "application/json"), reply
    assert reply.headers.get("docker-distribution-api-version") == \
        "registry/2.0", reply
    body = reply.json()
    error = body["errors"][0]
    assert error["message"], reply
    if codes:
        assert error["code"] in codes, reply
    return error


def alive(depot, repo=None):
    answer = depot.api("GET", "/health", timeout=10)
    assert answer.status_code == 200, answer.text
    if repo is not None:
        answer = requests.get(repo.url + "/v2/", timeout=10)
        assert answer.status_code == 200, answer.text


def raw_listing(depot, name):
    answer = depot.request("GET", "/repository/%s/" % name)
    assert answer.status_code == 200, answer.text
    return [entry["path"] for entry in answer.json()["entries"]]


def registry_contents(depot, repo):
    answer = depot.api("GET", "/repositories/" + repo.name)
    assert answer.status_code == 200, answer.text
    return answer.json()["content"]


def push_config(repo, name="hostile/app"):
    config = b'{"architecture":"amd64","os":"linux"}'
    answer = requests.post(repo.url + "/v2/%s/blobs/uploads/" % name,
                           params={"digest": sha256(config)}, data=config)
    assert answer.status_code == 201, answer.text
    return sha256(config), len(config)


def manifest_bytes(config, extra=None):
    digest, size = config
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": digest,
                           "size": size}, "layers": []}
    document.update(extra or {})
    return json.dumps(document).encode()


def no_tag(repo, name, tag):
    answer = requests.get(repo.url + "/v2/%s/manifests/%s" % (name, tag),
                          headers={"Accept": OCI_MANIFEST})
    assert answer.status_code == 404, answer.text


class Marker:
    """A unique file name; ``stray()`` lists copies of it outside the data dir."""

    def __init__(self, depot):
        self.name = "depot-hostile-" + uuid.uuid4().hex
        self.depot = depot

    def stray(self):
        roots = {pathlib.Path("/tmp"), pathlib.Path.cwd(),
                 self.depot.data_dir.parent, self.depot.data_dir.parent.parent,
                 pathlib.Path("/etc")}
        found = []
        for root in roots:
            for depth in range(4):
                found += [str(path) for path in root.glob(
                    "/".join(["*"] * depth + [self.name + "*"]))]
        return found


# ---------------------------------------------------------------------------
# Path traversal
# ---------------------------------------------------------------------------

RAW_TRAVERSALS = [
    "../../{m}",
    "../../../../../../tmp/{m}",
    "%2e%2e/%2e%2e/{m}",
    "%2E%2E/%2E%2E/tmp/{m}",
    ".%2e/{m}",
    "a/../../{m}",
    "a/./{m}",
    "./{m}",
    "a//{m}",
    "..%5c..%5c{m}",
    "a%5c..%5c{m}",
    "..\\..\\{m}",
    "%2e%2e%5c{m}",
    "..%2f..%2f{m}",
    "..%2F..%2Ftmp%2F{m}",
    "a%2f..%2f..%2f{m}",
    "%252e%252e/{m}",
    "a/%00/{m}",
    "{m}%00.txt",
    "..%c0%af{m}",
    "%c0%ae%c0%ae/{m}",
]


@pytest.mark.parametrize("template", RAW_TRAVERSALS)
def test_raw_path_traversal(depot, raw_repo, main, template):
    marker = Marker(depot)
    target = ("/repository/%s/" % raw_repo + template.format(m=marker.name)
              ).encode("latin-1")
    put = main.request("PUT", target, body=b"traversal!")
    if b"%252e" in target:
        # A literal "%2e%2e" segment is a legitimate, harmless file name.
        assert put.status in (201, 400), put
    else:
        message = api_error(put, 400)
        assert "path" in message, message
        assert raw_listing(depot, raw_repo) == []
    get = main.request("GET", target)
    assert get.status is not None and get.status < 500, get
    if get.status != 200:
        api_error(get)
    else:
        assert get.body == b"traversal!" and b"%252e" in target, get
    assert marker.stray() == []
    # The repository name slot too.
    escaped = main.request("PUT", "/repository/..%2f..%2f" + marker.name,
                           body=b"x")
    assert escaped.status in (400, 404, 405), escaped
    api_error(escaped)
    assert marker.stray() == []
    alive(depot)


def test_raw_path_with_encoded_slash_is_not_a_different_file(depot, raw_repo,
                                                            main):
    """``a%2Fb`` is either the file ``a/b`` or refused, never a third name
    that also answers at ``a%252Fb``."""
    put = main.request("PUT", "/repository/%s/a%%2Fb" % raw_repo, body=b"one")
    assert put.status is not None and put.status < 500, put
    if put.status in (200, 201):
        assert put.json()["path"] == "a/b", put
        assert raw_listing(depot, raw_repo) == ["a/b"]
    else:
        api_error(put, 400)
        assert raw_listing(depot, raw_repo) == []


REGISTRY_TRAVERSALS = [
    ("GET", "/v2/../../etc/passwd/manifests/latest"),
    ("GET", "/v2/a/../../b/manifests/latest"),
    ("PUT", "/v2/a/../b/manifests/latest"),
    ("PUT", "/v2/a/%2e%2e/b/manifests/latest"),
    ("PUT", "/v2/a%2f..%2fb/manifests/latest"),
    ("PUT", "/v2/a%5c..%5cb/manifests/latest"),
    ("POST", "/v2/a/../b/blobs/uploads/"),
    ("POST", "/v2/..%2f..%2fetc/blobs/uploads/"),
    ("GET", "/v2/a/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd"),
    ("GET", "/v2/a/blobs/sha256:%2e%2e"),
    ("GET", "/v2/a/blobs/sha256:..%5c..%5cetc"),
    ("GET", "/v2/a/blobs/..%2f..%2fdepot.db"),
    ("PUT", "/v2/a/manifests/sha256:..%2f..%2fx"),
    ("GET", "/v2/a/manifests/..%2f..%2flatest"),
    ("GET", "/v2/a/referrers/sha256:..%2f..%2fx"),
    ("POST", "/v2/a/blobs/uploads/?mount=sha256:..%2f..&from=..%2fb"),
    ("PATCH", "/v2/a/blobs/uploads/..%2f..%2fx"),
    ("PUT", "/v2/a/blobs/uploads/..?digest=sha256:..%2f..%2fx"),
]


@pytest.mark.parametrize("method,target", REGISTRY_TRAVERSALS)
def test_registry_traversal(depot, docker_repo, registry, method, target):
    body = b"{}" if method in ("PUT", "POST", "PATCH") else b""
    reply = registry.request(method, target, body=body,
                             headers={"Content-Type": OCI_MANIFEST})
    error = registry_error(reply)
    assert reply.status in (400, 404), reply
    if reply.status == 400:
        assert error["code"] in ("NAME_INVALID", "DIGEST_INVALID",
                                 "MANIFEST_INVALID"), reply
    content = registry_contents(depot, docker_repo)
    assert content["images"] == [] and content["blobs"] == 0, content
    alive(depot, docker_repo)


# ---------------------------------------------------------------------------
# Invalid UTF-8 and raw bytes in request targets
# ---------------------------------------------------------------------------

def test_invalid_utf8_in_raw_paths(depot, raw_repo, main):
    for target in ("/repository/%s/a%%FFb", "/repository/%s/%%C3%%28",
                   "/repository/%s/%%ED%%A0%%80", "/repository/%s/x/%%80"):
        reply = main.request("PUT", (target % raw_repo).encode(), body=b"x")
        assert "UTF-8" in api_error(reply, 400), reply
    assert raw_listing(depot, raw_repo) == []


def test_invalid_utf8_in_repository_names(depot, raw_repo, main):
    """``%FF`` in the name slot must not fall away and leave another name."""
    reply = main.request("DELETE", "/api/v1/repositories/%%FF%s%%FF" % raw_repo)
    assert depot.api("GET", "/repositories/" + raw_repo).status_code == 200, \
        "DELETE /api/v1/repositories/%%FF%s%%FF deleted %s: %r" % (
            raw_repo, raw_repo, reply)
    api_error(reply, 400, 404)
    reply = main.request("PATCH", "/api/v1/repositories/%s%%FF" % raw_repo,
                         {"Content-Type": "application/json"},
                         b'{"description": "changed"}')
    api_error(reply, 400, 404)
    assert depot.api("GET", "/repositories/" + raw_repo).json()[
        "description"] == ""
    reply = main.request("GET", "/api/v1/repositories/%s%%FF" % raw_repo)
    api_error(reply, 400, 404)
    reply = main.request("PUT", "/repository/%s%%FF/file" % raw_repo, body=b"x")
    api_error(reply, 400, 404)
    assert raw_listing(depot, raw_repo) == []


def test_invalid_utf8_in_image_names_and_tags(depot, docker_repo, registry):
    config = push_config(docker_repo)
    manifest = manifest_bytes(config)
    answer = requests.put(docker_repo.url + "/v2/hostile/app/manifests/v1",
                          data=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert answer.status_code == 201, answer.text
    # The stored manifest must not answer under a name or tag with bad bytes.
    for target in ("/v2/hostile/app%FF/manifests/v1",
                   "/v2/hostile%C3/app/manifests/v1",
                   "/v2/hostile/app/manifests/v%FF1"):
        reply = registry.request("GET", target, {"Accept": OCI_MANIFEST})
        registry_error(reply, "NAME_INVALID", "DIGEST_INVALID",
                       "MANIFEST_INVALID", status=400)
    # Nor may a push under such a tag create a tag with the bytes dropped.
    reply = registry.request("PUT", "/v2/hostile/app/manifests/x%FFy",
                             {"Content-Type": OCI_MANIFEST}, manifest)
    registry_error(reply, status=400)
    reply = registry.request("PUT", "/v2/hostile%FF/app/manifests/v2",
                             {"Content-Type": OCI_MANIFEST}, manifest)
    registry_error(reply, status=400)
    tags = requests.get(docker_repo.url + "/v2/hostile/app/tags/list").json()
    assert tags["tags"] == ["v1"], tags


def test_raw_bytes_in_request_target(depot, raw_repo, docker_repo, main,
                                     registry):
    """Unencoded non-ASCII and control bytes: 400 in the surface's format."""
    for target in (b"/repository/%s/\xff\xfe" % raw_repo.encode(),
                   b"/repository/%s/\xc3\xa9" % raw_repo.encode()):
        reply = main.request("GET", target)
        assert reply.status == 400, reply
    assert raw_listing(depot, raw_repo) == []
    reply = registry.request("GET", b"/v2/a\xff/manifests/latest")
    registry_error(reply, status=400)
    alive(depot, docker_repo)


# ---------------------------------------------------------------------------
# Oversized requests
# ---------------------------------------------------------------------------

def test_huge_header_is_refused_and_connection_closed(depot, docker_repo, main,
                                                      registry):
    """Over cheroot's header limit (64 KiB here): a 4xx and a closed
    connection, and Depot serves on."""
    for client in (main, registry):
        reply = client.request("GET", "/v2/" if client is registry
                               else "/api/v1/health",
                               {"X-Big": "a" * 100_000})
        assert reply.status in (400, 413, 431), reply
        assert reply.headers.get("connection", "close").lower() == "close"
    many = {"X-H%d" % number: "v" * 40 for number in range(3000)}
    reply = main.request("GET", "/api/v1/health", many)
    assert reply.status in (400, 413, 431), reply
    alive(depot, docker_repo)


def test_huge_header_answer_has_the_error_format(depot, docker_repo, main,
                                                 registry):
    """Registry clients need JSON even for 413/431 (PROTOCOL.md); the main
    port's errors are {"error": ...}."""
    reply = registry.request("GET", "/v2/", {"X-Big": "a" * 100_000})
    registry_error(reply)
    reply = main.request("GET", "/api/v1/health", {"X-Big": "a" * 100_000})
    api_error(reply)


def test_huge_request_line(depot, docker_repo, main, registry):
    reply = main.request("GET", "/api/v1/health?" + "a" * 100_000)
    assert reply.status in (400, 414), reply
    reply = registry.request("GET", "/v2/" + "a" * 100_000 + "/tags/list")
    assert reply.status in (400, 414), reply
    alive(depot, docker_repo)
    registry_error(reply)


def test_manifest_over_4_mib(depot, docker_repo, registry):
    config = push_config(docker_repo)
    padding = "x" * (4 * 1024 * 1024)
    manifest = manifest_bytes(config, {"annotations": {"pad": padding}})
    assert len(manifest) > 4 * 1024 * 1024
    reply = registry.request("PUT", "/v2/hostile/app/manifests/big",
                             {"Content-Type": OCI_MANIFEST}, manifest)
    registry_error(reply, "SIZE_INVALID", "MANIFEST_INVALID", status=413)
    # Chunked, with no Content-Length to refuse it by.
    answer = requests.put(
        docker_repo.url + "/v2/hostile/app/manifests/big2",
        data=iter([manifest[i:i + 65536]
                   for i in range(0, len(manifest), 65536)]),
        headers={"Content-Type": OCI_MANIFEST})
    assert answer.status_code == 413, answer.text
    assert answer.json()["errors"][0]["code"] in ("SIZE_INVALID",
                                                  "MANIFEST_INVALID")
    # Exactly 4 MiB is accepted.
    base = manifest_bytes(config, {"annotations": {"pad": ""}})
    exact = manifest_bytes(config, {"annotations": {
        "pad": "x" * (4 * 1024 * 1024 - len(base))}})
    assert len(exact) == 4 * 1024 * 1024
    answer = requests.put(docker_repo.url + "/v2/hostile/app/manifests/exact",
                          data=exact, headers={"Content-Type": OCI_MANIFEST})
    assert answer.status_code == 201, answer.text
    no_tag(docker_repo, "hostile/app", "big")
    no_tag(docker_repo, "hostile/app", "big2")
    alive(depot, docker_repo)


def test_api_body_over_limit(depot, main):
    body = json.dumps({"name": "toolarge", "type": "raw",
                       "description": "x" * (2 * 1024 * 1024)}).encode()
    reply = main.request("POST", "/api/v1/repositories",
                         {"Content-Type": "application/json"}, body)
    api_error(reply, 413)
    assert depot.api("GET", "/repositories/toolarge").status_code == 404


# ---------------------------------------------------------------------------
# Deep JSON
# ---------------------------------------------------------------------------

DEEP = 100_000
DEEP_BODIES = [b"[" * DEEP + b"]" * DEEP,
               b'{"a":' * DEEP + b"1" + b"}" * DEEP,
               b'{"name":"deep","type":"raw","description":' + b"[" * DEEP
               + b"]" * DEEP + b"}"]


@pytest.mark.parametrize("body", DEEP_BODIES, ids=["array", "object", "field"])
def test_deep_json_to_the_api(depot, raw_repo, main, body):
    reply = main.request("POST", "/api/v1/repositories",
                         {"Content-Type": "application/json"}, body)
    api_error(reply, 400)
    reply = main.request("PATCH", "/api/v1/repositories/" + raw_repo,
                         {"Content-Type": "application/json"}, body)
    api_error(reply, 400)
    assert depot.api("GET", "/repositories/deep").status_code == 404
    alive(depot)


@pytest.mark.parametrize("body", DEEP_BODIES[:2], ids=["array", "object"])
def test_deep_json_as_manifest(depot, docker_repo, registry, body):
    reply = registry.request("PUT", "/v2/hostile/app/manifests/deep",
                             {"Content-Type": OCI_MANIFEST}, body)
    registry_error(reply, "MANIFEST_INVALID", status=400)
    config = push_config(docker_repo)
    nested = manifest_bytes(config)[:-1] + b', "annotations": ' + body + b"}"
    reply = registry.request("PUT", "/v2/hostile/app/manifests/deep",
                             {"Content-Type": OCI_MANIFEST}, nested)
    registry_error(reply, "MANIFEST_INVALID", status=400)
    no_tag(docker_repo, "hostile/app", "deep")
    alive(depot, docker_repo)


# ---------------------------------------------------------------------------
# Content-Length that lies
# ---------------------------------------------------------------------------

def wait_until(check, timeout=5):
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_raw_put_announcing_more_than_sent(depot, raw_repo, main):
    reply = main.request("PUT", "/repository/%s/short" % raw_repo,
                         body=b"only this", length=1000, half_close=True)
    if reply.status is not None:
        api_error(reply, 400)
    wait_until(lambda: assert_listing(depot, raw_repo, []))
    alive(depot)


def assert_listing(depot, name, expected):
    assert raw_listing(depot, name) == expected


def test_raw_put_announcing_less_than_sent(depot, raw_repo, main):
    data = b"0123456789abcdefghij"
    # With the checksum of what was sent, the short body cannot pass.
    reply = main.request("PUT", "/repository/%s/checked" % raw_repo,
                         {"X-Checksum-Sha256": sha256(data)[7:]}, data[:5],
                         length=5, extra=data[5:] + b"\r\n\r\n")
    api_error(reply, 400)
    # Without it, HTTP framing rules: exactly the announced bytes are the
    # file, and the rest is never taken for (part of) a file or a request
    # that succeeds.
    reply = main.request("PUT", "/repository/%s/framed" % raw_repo, body=b"",
                         length=5, extra=data + b"\r\n\r\n")
    assert reply.status == 201, reply
    assert b" 2" not in reply.rest.split(b"\r\n", 1)[0], reply
    assert raw_listing(depot, raw_repo) == ["framed"]
    assert depot.request("GET", "/repository/%s/framed" % raw_repo).content \
        == data[:5]
    alive(depot)


def open_session(repo, name="hostile/app"):
    answer = requests.post(repo.url + "/v2/%s/blobs/uploads/" % name)
    assert answer.status_code == 202, answer.text
    return answer.headers["Location"]


def test_blob_patch_announcing_more_than_sent(depot, docker_repo, registry):
    data = os.urandom(3000)
    location = open_session(docker_repo)
    reply = registry.request("PATCH", location, body=data[:1000], length=3000,
                             half_close=True,
                             headers={"Content-Type":
                                      "application/octet-stream"})
    registry_error(reply, "BLOB_UPLOAD_INVALID", "SIZE_INVALID", status=400)
    status = requests.get(docker_repo.url + location)
    assert status.status_code == 204, status.text
    held = int(status.headers["Range"].split("-")[1]) + 1 \
        if status.headers["Range"] != "0-0" else 0
    assert held in (0, 1000), status.headers
    for digest in (sha256(data), sha256(data[:1000])):
        answer = requests.head(docker_repo.url + "/v2/hostile/app/blobs/" +
                               digest)
        assert answer.status_code == 404
    # The session resumes from what it holds.
    answer = requests.patch(docker_repo.url + location, data=data[held:],
                            headers={"Content-Range": "%d-%d" % (held, 2999)})
    assert answer.status_code == 202, answer.text
    answer = requests.put(docker_repo.url + location,
                          params={"digest": sha256(data)})
    assert answer.status_code == 201, answer.text
    blob = requests.get(docker_repo.url + "/v2/hostile/app/blobs/" +
                        sha256(data))
    assert blob.content == data
    alive(depot, docker_repo)


def test_blob_patch_announcing_less_than_sent(depot, docker_repo, registry):
    data = os.urandom(3000)
    location = open_session(docker_repo)
    reply = registry.request("PATCH", location, body=data[:1000], length=1000,
                             extra=data[1000:],
                             headers={"Content-Type":
                                      "application/octet-stream"})
    assert reply.status == 202, reply
    assert reply.headers["range"] == "0-999", reply
    answer = requests.put(docker_repo.url + location,
                          params={"digest": sha256(data)})
    assert answer.status_code == 400, answer.text
    assert answer.json()["errors"][0]["code"] == "DIGEST_INVALID"
    answer = requests.head(docker_repo.url + "/v2/hostile/app/blobs/" +
                           sha256(data))
    assert answer.status_code == 404
    alive(depot, docker_repo)


def test_blob_put_and_monolithic_post_announcing_more(depot, docker_repo,
                                                       registry):
    data = os.urandom(2000)
    location = open_session(docker_repo)
    reply = registry.request("PUT", location + "?digest=" + sha256(data),
                             body=data[:500], length=2000, half_close=True)
    registry_error(reply, status=400)
    reply = registry.request(
        "POST", "/v2/hostile/app/blobs/uploads/?digest=" + sha256(data),
        body=data[:500], length=2000, half_close=True)
    registry_error(reply, status=400)
    answer = requests.head(docker_repo.url + "/v2/hostile/app/blobs/" +
                           sha256(data))
    assert answer.status_code == 404
    assert registry_contents(depot, docker_repo)["blobs"] == 0
    alive(depot, docker_repo)


def test_manifest_put_with_lying_length(depot, docker_repo, registry):
    config = push_config(docker_repo)
    manifest = manifest_bytes(config)
    reply = registry.request("PUT", "/v2/hostile/app/manifests/more",
                             {"Content-Type": OCI_MANIFEST}, manifest,
                             length=len(manifest) + 100, half_close=True)
    registry_error(reply, status=400)
    reply = registry.request("PUT", "/v2/hostile/app/manifests/less",
                             {"Content-Type": OCI_MANIFEST},
                             manifest[:len(manifest) - 10],
                             length=len(manifest) - 10,
                             extra=manifest[len(manifest) - 10:])
    registry_error(reply, "MANIFEST_INVALID", status=400)
    no_tag(docker_repo, "hostile/app", "more")
    no_tag(docker_repo, "hostile/app", "less")
    assert registry_contents(depot, docker_repo)["manifests"] == 0
    alive(depot, docker_repo)


def test_api_post_with_lying_length(depot, main):
    body = json.dumps({"name": "liar", "type": "raw"}).encode()
    reply = main.request("POST", "/api/v1/repositories",
                         {"Content-Type": "application/json"}, body,
                         length=len(body) + 50, half_close=True)
    if reply.status is not None:
        api_error(reply, 400)
    reply = main.request("POST", "/api/v1/repositories",
                         {"Content-Type": "application/json"}, body[:-3],
                         length=len(body) - 3, extra=body[-3:])
    api_error(reply, 400)
    assert depot.api("GET", "/repositories/liar").status_code == 404
    alive(depot)


def test_non_numeric_and_negative_content_length(depot, raw_repo, main,
                                                 registry, docker_repo):
    for value in ("-1", "abc", "1e3", "0x10", "5, 5"):
        reply = main.request("PUT", "/repository/%s/len" % raw_repo,
                             {"Content-Length": value}, b"hello")
        assert reply.status is not None and 400 <= reply.status < 500, reply
        reply = registry.request("PUT", "/v2/hostile/app/manifests/len",
                                 {"Content-Length": value}, b"{}")
        assert reply.status is not None and 400 <= reply.status < 500, reply
    assert raw_listing(depot, raw_repo) == []
    alive(depot, docker_repo)


# ---------------------------------------------------------------------------
# Bodies that are not what they claim
# ---------------------------------------------------------------------------

NOT_OBJECTS = [b"[]", b"[1]", b'"raw"', b"null", b"1", b"true", b""]


@pytest.mark.parametrize("body", NOT_OBJECTS)
def test_api_body_not_an_object(depot, raw_repo, main, body):
    for method, target in (("POST", "/api/v1/repositories"),
                           ("PATCH", "/api/v1/repositories/" + raw_repo)):
        reply = main.request(method, target,
                             {"Content-Type": "application/json"}, body)
        api_error(reply, 400)
    alive(depot)


@pytest.mark.parametrize("body", NOT_OBJECTS[:-1])
def test_manifest_not_an_object(docker_repo, registry, body):
    reply = registry.request("PUT", "/v2/hostile/app/manifests/odd",
                             {"Content-Type": OCI_MANIFEST}, body)
    registry_error(reply, "MANIFEST_INVALID", status=400)
    no_tag(docker_repo, "hostile/app", "odd")


def test_invalid_utf8_in_json_bodies(depot, docker_repo, raw_repo, main,
                                     registry):
    body = b'{"name":"bad\xff","type":"raw"}'
    assert "UTF-8" in api_error(main.request(
        "POST", "/api/v1/repositories", {"Content-Type": "application/json"},
        body), 400)
    body = b'{"description":"caf\xe9"}'
    assert "UTF-8" in api_error(main.request(
        "PATCH", "/api/v1/repositories/" + raw_repo,
        {"Content-Type": "application/json"}, body), 400)
    assert depot.api("GET", "/repositories/" + raw_repo).json()[
        "description"] == ""
    config = push_config(docker_repo)
    manifest = manifest_bytes(config, {"annotations": {"x": "\udcff"}})
    manifest = manifest.replace(b"\\udcff", b"\xff")
    reply = registry.request("PUT", "/v2/hostile/app/manifests/utf",
                             {"Content-Type": OCI_MANIFEST}, manifest)
    registry_error(reply, "MANIFEST_INVALID", status=400)
    no_tag(docker_repo, "hostile/app", "utf")


def test_duplicate_keys_in_api_body(depot, main):
    body = b'{"name":"dupfirst","name":"dupsecond","type":"raw"}'
    reply = main.request("POST", "/api/v1/repositories",
                         {"Content-Type": "application/json"}, body)
    try:
        message = api_error(reply, 400)
        assert "name" in message, message
        for name in ("dupfirst", "dupsecond"):
            assert depot.api("GET", "/repositories/" + name).status_code == 404
    finally:
        for name in ("dupfirst", "dupsecond"):
            depot.api("DELETE", "/repositories/" + name)


def test_duplicate_keys_in_manifest(depot, docker_repo, registry):
    """Two ``layers`` keys: parsers disagree on which counts, so Depot's
    reference check could pass a manifest whose other reading names blobs
    that are not there. Refuse it."""
    config = push_config(docker_repo)
    missing = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
               "digest": "sha256:" + "0" * 64, "size": 1}
    manifest = manifest_bytes(config)[:-1] + (
        ', "layers": []}').encode()
    manifest = manifest.replace(b'"layers": []', b'"layers": %s'
                                % json.dumps([missing]).encode(), 1)
    assert manifest.count(b'"layers"') == 2
    reply = registry.request("PUT", "/v2/hostile/app/manifests/dup",
                             {"Content-Type": OCI_MANIFEST}, manifest)
    registry_error(reply, "MANIFEST_INVALID", status=400)
    no_tag(docker_repo, "hostile/app", "dup")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_constants_in_manifest(docker_repo, registry, constant):
    config = push_config(docker_repo)
    manifest = manifest_bytes(config)[:-1] + b', "annotations": {"x": ' + \
        constant + b"}}"
    reply = registry.request("PUT", "/v2/hostile/app/manifests/nan",
                             {"Content-Type": OCI_MANIFEST}, manifest)
    registry_error(reply, "MANIFEST_INVALID", status=400)
    no_tag(docker_repo, "hostile/app", "nan")


def test_nothing_outside_the_data_directory(depot):
    """After all of the above: the data dir's parent holds only the data dir
    and its log."""
    names = {path.name for path in depot.data_dir.parent.iterdir()}
    assert names <= {depot.data_dir.name, depot.log_path.name}, names


# ---------------------------------------------------------------------------
# Security basics
# ---------------------------------------------------------------------------

def test_key_file_mode(depot):
    mode = stat.S_IMODE(os.stat(depot.data_dir / "key.pem").st_mode)
    assert mode == 0o600, oct(mode)
    data_mode = stat.S_IMODE(os.stat(depot.data_dir).st_mode)
    assert data_mode & 0o077 == 0, oct(data_mode)


def test_log_holds_no_bodies_nor_key(depot, raw_repo, docker_repo):
    secret = "body-secret-" + uuid.uuid4().hex
    depot.request("PUT", "/repository/%s/secret.txt" % raw_repo,
                  data=secret.encode())
    depot.api("PATCH", "/repositories/" + raw_repo,
              json={"description": secret})
    depot.api("POST", "/repositories", data=b'{"name": "' + secret.encode()
              + b'", "broken')
    depot.api("POST", "/repositories", json={"name": "x", "type": secret})
    requests.post(docker_repo.url + "/v2/hostile/app/blobs/uploads/",
                  params={"digest": sha256(b"other")}, data=secret.encode())
    requests.put(docker_repo.url + "/v2/hostile/app/manifests/t",
                 data=('{"schemaVersion": 2, "x": "%s"' % secret).encode(),
                 headers={"Content-Type": OCI_MANIFEST})
    time.sleep(0.5)
    log = depot.log()
    assert secret not in log
    key = (depot.data_dir / "key.pem").read_text()
    assert "PRIVATE KEY" not in log
    for line in key.splitlines():
        if not line.startswith("-----") and len(line) > 16:
            assert line not in log


def tls_client(depot, version):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(depot.cert)
    context.minimum_version = version
    context.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        # Let the client offer old versions so that any refusal is the
        # server's.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def handshake(port, context):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            return tls.version()


@pytest.fixture
def https_registry(depot):
    name = "hostile-https-%s" % uuid.uuid4().hex[:8]
    port = free_port()
    depot.create_repository(name, "docker", config={"http_port": 0,
                                                    "https_port": port})
    yield port
    depot.api("DELETE", "/repositories/" + name)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1,
                                     ssl.TLSVersion.TLSv1_1])
def test_old_tls_is_refused(depot, https_registry, version):
    for port in (depot.port, https_registry):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            handshake(port, tls_client(depot, version))
    # And with a client that offers every version up to the old one.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(depot.cert)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(depot.port, context)
    alive(depot)


@pytest.mark.parametrize("version,name", [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
                                          (ssl.TLSVersion.TLSv1_3, "TLSv1.3")])
def test_modern_tls_works(depot, https_registry, version, name):
    for port in (depot.port, https_registry):
        assert handshake(port, tls_client(depot, version)) == name
    context = tls_client(depot, version)
    with socket.create_connection(("127.0.0.1", depot.port), timeout=10) as s:
        with context.wrap_socket(s, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n"
                        b"Connection: close\r\n\r\n")
            data = b""
            while True:
                piece = tls.recv(65536)
                if not piece:
                    break
                data += piece
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
