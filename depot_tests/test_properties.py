"""Property-based tests of Depot's parsers and of the blob upload state machine.

Everything runs against the real session-wide Depot over HTTP(S):

* ``BlobUploads``: a ``RuleBasedStateMachine`` that drives upload sessions of
  a docker repository (POST, monolithic POST, PATCH with good, bad and random
  Content-Range, streamed PATCH, PUT with right or wrong digest and an
  optional last chunk, GET status, DELETE) against a model of what each
  session holds;
* parsing properties: image names, tags, digests, raw paths and Range
  headers, valid by the spec's grammar or not. Raw request targets are sent
  with ``http.client`` or bare sockets, so nothing normalises them.
"""

import hashlib
import http.client
import json
import re
import socket
import ssl
import urllib.parse

import pytest
import requests
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes,
                                 invariant, rule, run_state_machine_as_test)

# The grammar of the OCI distribution-spec (and PROTOCOL.md).
NAME_RE = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
                     r"(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+([+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
REGISTERED = {"sha256": 64, "sha512": 128}

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

COMMON = dict(deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
    HealthCheck.filter_too_much, HealthCheck.data_too_large])


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def valid_digest(digest):
    """True when ``digest`` is well formed and of a supported algorithm."""
    if not DIGEST_RE.fullmatch(digest):
        return False
    algorithm, encoded = digest.split(":", 1)
    return (algorithm in REGISTERED
            and re.fullmatch("[a-f0-9]{%d}" % REGISTERED[algorithm], encoded)
            is not None)


def registry_error(answer, *codes):
    """Assert ``answer`` is a registry error body with one of ``codes``."""
    assert answer.headers.get("Content-Type", "").startswith(
        "application/json"), (answer.status_code, answer.headers)
    body = json.loads(answer.text if hasattr(answer, "text") else answer.body)
    assert isinstance(body.get("errors"), list) and body["errors"], body
    error = body["errors"][0]
    assert isinstance(error.get("message"), str) and error["message"], body
    if codes:
        assert error["code"] in codes, (answer.status_code, body)
    return error


def api_error(answer):
    """Assert ``answer`` has the main port's error format ``{"error": ...}``."""
    assert answer.headers.get("Content-Type", "").startswith(
        "application/json"), (answer.status_code, answer.headers)
    body = json.loads(answer.body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str) \
        and body["error"], body
    return body["error"]


class Answer:
    """A response read with http.client: status, headers, body."""

    def __init__(self, response):
        self.status_code = response.status
        self.headers = requests.structures.CaseInsensitiveDict(
            response.getheaders())
        self.body = response.read()
        self.text = self.body.decode("utf-8", "replace")


def send(host, port, method, target, headers=(), body=None, tls=None):
    """One request with the request-target exactly as given (str or bytes).

    Uses a bare socket, so targets with bytes that http.client refuses
    (control characters, raw non-ASCII) go out as they are.
    """
    if isinstance(target, str):
        target = target.encode("utf-8")
    lines = [method.encode() + b" " + target + b" HTTP/1.1",
             b"Host: %s:%d" % (host.encode(), port), b"Connection: close"]
    headers = dict(headers)
    if body is not None:
        headers.setdefault("Content-Length", str(len(body)))
    for key, value in headers.items():
        lines.append(key.encode("latin-1") + b": " + (
            value if isinstance(value, bytes) else value.encode("latin-1")))
    data = b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")
    sock = socket.create_connection((host, port), timeout=30)
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return Answer(response)
    finally:
        sock.close()


def tls_context(depot):
    return ssl.create_default_context(cafile=depot.cert)


def main_request(depot, method, target, headers=(), body=None):
    return send("127.0.0.1", depot.port, method, target, headers, body,
                tls=tls_context(depot))


def registry_request(repo, method, target, headers=(), body=None):
    return send("127.0.0.1", repo.port, method, target, headers, body)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def quote(text, safe="/"):
    return urllib.parse.quote(text, safe=safe)


# ---------------------------------------------------------------------------
# The blob upload state machine
# ---------------------------------------------------------------------------

IMAGE = "props/uploads"
bodies = st.binary(min_size=0, max_size=3000)


class BlobUploads(RuleBasedStateMachine):
    """Upload sessions of one image name against a model of their bytes."""

    repo = None  # set by the test before the machine runs

    sessions = Bundle("sessions")

    def __init__(self):
        super().__init__()
        self.http = requests.Session()
        self.base = self.repo.url + "/v2/" + IMAGE
        self.model = {}            # open session id -> bytes it holds
        self.closed = set()        # ids of finished, cancelled or failed sessions
        self.blobs = {}            # digest -> bytes of blobs that were created
        self.wrong = set()         # digests refused as wrong; must not exist

    def teardown(self):
        for session in list(self.model):
            self.http.delete(self.base + "/blobs/uploads/" + session)
        self.http.close()

    # Helpers ---------------------------------------------------------------

    def check(self, answer):
        note("%s %s -> %d %s" % (answer.request.method, answer.request.url,
                                 answer.status_code, answer.text[:300]))
        assert answer.status_code < 500, answer.text
        assert answer.headers.get("Docker-Distribution-API-Version") == \
            "registry/2.0"
        return answer

    def expect_range(self, answer, size):
        assert answer.headers.get("Range") == "0-%d" % max(size - 1, 0), (
            answer.headers, size)

    def expect_open(self, answer, session):
        """The answer of a step on an open session (202/204): headers match."""
        self.expect_range(answer, len(self.model[session]))
        assert answer.headers.get("Docker-Upload-UUID") == session
        location = answer.headers["Location"]
        assert location.rstrip("/").endswith("/blobs/uploads/" + session)

    def expect_unknown(self, answer):
        assert answer.status_code == 404, answer.text
        registry_error(answer, "BLOB_UPLOAD_UNKNOWN")

    def upload_url(self, session):
        return self.base + "/blobs/uploads/" + session

    def created(self, answer, digest, data):
        assert answer.status_code == 201, answer.text
        assert answer.headers.get("Docker-Content-Digest") == digest
        assert answer.headers.get("Location")
        assert sha256(data) == digest
        self.blobs[digest] = data
        self.wrong.discard(digest)

    def refused_wrong_digest(self, answer, digest):
        assert answer.status_code == 400, answer.text
        registry_error(answer, "DIGEST_INVALID")
        if digest not in self.blobs:
            self.wrong.add(digest)

    # Rules -------------------------------------------------------------------

    @rule(target=sessions)
    def open_session(self):
        answer = self.check(self.http.post(self.base + "/blobs/uploads/"))
        assert answer.status_code == 202, answer.text
        session = answer.headers["Docker-Upload-UUID"]
        assert session not in self.model and session not in self.closed
        self.model[session] = b""
        self.expect_open(answer, session)
        return session

    @rule(data=bodies, right=st.booleans())
    def monolithic(self, data, right):
        digest = sha256(data if right else data + b"\x00wrong")
        answer = self.check(self.http.post(
            self.base + "/blobs/uploads/", params={"digest": digest},
            data=data, headers={"Content-Type": "application/octet-stream"}))
        if right:
            self.created(answer, digest, data)
        else:
            self.refused_wrong_digest(answer, digest)

    @rule(session=sessions, data=bodies,
          offset=st.one_of(st.just("correct"), st.just("none"),
                           st.just("wrong"), st.integers(0, 7000)))
    def patch(self, session, data, offset):
        headers = {"Content-Type": "application/octet-stream"}
        held = self.model.get(session)
        start = None
        if offset == "correct" and held is not None:
            start = len(held)
        elif offset == "wrong" and held is not None:
            start = len(held) + 1 + len(data)
        elif isinstance(offset, int):
            start = offset
        if start is not None and data:
            headers["Content-Range"] = "%d-%d" % (start, start + len(data) - 1)
        else:
            start = None
        answer = self.check(self.http.patch(self.upload_url(session),
                                            data=data, headers=headers))
        if held is None:
            self.expect_unknown(answer)
            return
        if start is not None and start != len(held):
            assert answer.status_code == 416, answer.text
            registry_error(answer)
            self.expect_range(answer, len(held))
            return
        assert answer.status_code == 202, answer.text
        self.model[session] = held + data
        self.expect_open(answer, session)

    @rule(session=sessions, pieces=st.lists(bodies, max_size=4))
    def streamed_patch(self, session, pieces):
        """PATCH with Transfer-Encoding: chunked, as docker and podman do."""
        answer = self.check(self.http.patch(
            self.upload_url(session), data=iter(pieces),
            headers={"Content-Type": "application/octet-stream"}))
        assert "Content-Length" not in answer.request.headers
        if session not in self.model:
            self.expect_unknown(answer)
            return
        assert answer.status_code == 202, answer.text
        self.model[session] += b"".join(pieces)
        self.expect_open(answer, session)

    @rule(session=consumes(sessions), last=st.one_of(st.none(), bodies),
          right=st.booleans(), streamed=st.booleans())
    def finish(self, session, last, right, streamed):
        held = self.model.get(session)
        whole = (held or b"") + (last or b"")
        digest = sha256(whole if right else whole + b"\x00wrong")
        if last is None:
            body = None
        elif streamed:
            body = iter([last[:len(last) // 2], last[len(last) // 2:]])
        else:
            body = last
        answer = self.check(self.http.put(
            self.upload_url(session), params={"digest": digest}, data=body,
            headers={"Content-Type": "application/octet-stream"}))
        if held is None:
            self.expect_unknown(answer)
            return
        del self.model[session]
        self.closed.add(session)
        if right:
            self.created(answer, digest, whole)
        else:
            self.refused_wrong_digest(answer, digest)

    @rule(session=sessions)
    def status(self, session):
        answer = self.check(self.http.get(self.upload_url(session)))
        if session not in self.model:
            self.expect_unknown(answer)
            return
        assert answer.status_code == 204, answer.text
        self.expect_open(answer, session)

    @rule(session=consumes(sessions))
    def cancel(self, session):
        answer = self.check(self.http.delete(self.upload_url(session)))
        if session not in self.model:
            self.expect_unknown(answer)
            return
        assert answer.status_code == 204, answer.text
        del self.model[session]
        self.closed.add(session)

    @rule(session=sessions)
    def finished_session_is_gone(self, session):
        """A closed session stays closed for every method."""
        if session in self.model:
            return
        for method in ("GET", "PATCH", "DELETE"):
            self.expect_unknown(self.check(
                self.http.request(method, self.upload_url(session), data=b"x")))

    # Invariants --------------------------------------------------------------

    @invariant()
    def blobs_download_with_their_digest(self):
        for digest, data in self.blobs.items():
            answer = self.check(self.http.get(self.base + "/blobs/" + digest))
            assert answer.status_code == 200, answer.text
            assert sha256(answer.content) == digest
            assert answer.content == data
            assert answer.headers["Docker-Content-Digest"] == digest
            assert answer.headers["Content-Length"] == str(len(data))

    @invariant()
    def wrong_digests_never_exist(self):
        for digest in self.wrong:
            answer = self.check(self.http.head(self.base + "/blobs/" + digest))
            assert answer.status_code == 404, (digest, answer.status_code)


def test_blob_upload_state_machine(docker_repo):
    BlobUploads.repo = docker_repo
    run_state_machine_as_test(BlobUploads, settings=settings(
        max_examples=40, stateful_step_count=25, **COMMON))


# ---------------------------------------------------------------------------
# Parsing: image names, tags, digests
# ---------------------------------------------------------------------------

component = st.from_regex(r"\A[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*\Z")
valid_names = st.lists(component, min_size=1, max_size=4).map("/".join) \
    .filter(lambda name: len(name) <= 255
            and NAME_RE.fullmatch(name) is not None)

KEYWORDS = ("/blobs/", "/manifests/", "/tags/", "/referrers/", "_catalog")
invalid_names = st.one_of(
    st.text(min_size=1, max_size=60),
    st.text(alphabet="abcXYZ019._-/ \\%:@", min_size=1, max_size=30),
    valid_names.map(lambda name: name + "-"),
    valid_names.map(lambda name: name.upper()),
    valid_names.map(lambda name: "/" + name),
    valid_names.map(lambda name: name + "//x"),
    st.just("a" * 256),
).filter(lambda name: NAME_RE.fullmatch(name) is None
         or len(name) > 255)


def name_target(name, tail):
    return "/v2/" + quote(name) + tail


@settings(max_examples=100, **COMMON)
@given(name=valid_names)
def test_valid_image_names_are_accepted(docker_repo, name):
    answer = registry_request(docker_repo, "GET",
                              name_target(name, "/tags/list"))
    assert answer.status_code == 404, answer.text
    registry_error(answer, "NAME_UNKNOWN")
    answer = registry_request(docker_repo, "POST",
                              name_target(name, "/blobs/uploads/"), body=b"")
    assert answer.status_code == 202, answer.text
    location = answer.headers["Location"]
    answer = registry_request(docker_repo, "DELETE",
                              urllib.parse.urlsplit(location).path)
    assert answer.status_code == 204, answer.text


@settings(max_examples=150, **COMMON)
@given(name=invalid_names,
       tail=st.sampled_from(["/tags/list", "/manifests/latest",
                             "/blobs/uploads/", "/blobs/sha256:" + "0" * 64]))
def test_invalid_image_names_are_rejected(docker_repo, name, tail):
    method = "POST" if tail == "/blobs/uploads/" else "GET"
    answer = registry_request(docker_repo, method, name_target(name, tail),
                              body=b"" if method == "POST" else None)
    note(answer.text)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    error = registry_error(answer)
    plain = name and not any(keyword in "/" + name + "/"
                             for keyword in KEYWORDS) \
        and "\n" not in name and "\r" not in name
    if plain:
        assert answer.status_code == 400, answer.text
        assert error["code"] == "NAME_INVALID", error


valid_tags = st.from_regex(r"\A[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")
invalid_references = st.text(min_size=1, max_size=140).filter(
    lambda ref: TAG_RE.fullmatch(ref) is None and not valid_digest(ref)
    and "/" not in ref)


def push_config(repo, name):
    config = b"{}"
    digest = sha256(config)
    answer = requests.post(repo.url + "/v2/%s/blobs/uploads/" % name,
                           params={"digest": digest}, data=config)
    assert answer.status_code == 201, answer.text
    return digest


def small_manifest(config_digest, note_text=""):
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": 2},
        "layers": [], "annotations": {"note": note_text}}).encode()


@settings(max_examples=60, **COMMON)
@given(tag=valid_tags)
def test_valid_tags_round_trip(docker_repo, tag):
    name = "props/tags"
    config = push_config(docker_repo, name)
    manifest = small_manifest(config, tag)
    answer = registry_request(
        docker_repo, "PUT", "/v2/%s/manifests/%s" % (name, quote(tag)),
        {"Content-Type": OCI_MANIFEST}, manifest)
    assert answer.status_code == 201, answer.text
    assert answer.headers["Docker-Content-Digest"] == sha256(manifest)
    answer = registry_request(docker_repo, "GET",
                              "/v2/%s/manifests/%s" % (name, quote(tag)),
                              {"Accept": OCI_MANIFEST})
    assert answer.status_code == 200, answer.text
    assert answer.body == manifest
    tags = requests.get(docker_repo.url + "/v2/%s/tags/list" % name).json()
    assert tag in tags["tags"]
    answer = registry_request(docker_repo, "DELETE",
                              "/v2/%s/manifests/%s" % (name, quote(tag)))
    assert answer.status_code == 202, answer.text


@settings(max_examples=150, **COMMON)
@given(reference=invalid_references, method=st.sampled_from(["GET", "PUT",
                                                              "DELETE"]))
def test_invalid_references_are_rejected(docker_repo, reference, method):
    """Anything in the reference slot that is not a tag must be a digest."""
    body = b"{}" if method == "PUT" else None
    answer = registry_request(
        docker_repo, method, "/v2/props/refs/manifests/" + quote(reference, ""),
        {"Content-Type": OCI_MANIFEST}, body)
    note(answer.text)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    error = registry_error(answer)
    if "\n" not in reference and "\r" not in reference:
        assert answer.status_code == 400, answer.text
        assert error["code"] == "DIGEST_INVALID", error


hexes = st.text(alphabet="0123456789abcdef", min_size=1, max_size=140)
valid_digests = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
    .map(lambda h: "sha256:" + h),
    st.text(alphabet="0123456789abcdef", min_size=128, max_size=128)
    .map(lambda h: "sha512:" + h))
invalid_digests = st.one_of(
    hexes.map(lambda h: "sha256:" + h),
    hexes.map(lambda h: "sha512:" + h),
    st.text(alphabet="0123456789ABCDEF", min_size=64, max_size=64)
    .map(lambda h: "sha256:" + h),
    st.from_regex(r"\A[a-z0-9]+([+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+\Z"),
    st.text(min_size=1, max_size=80),
    valid_digests.map(lambda d: d + "\x00"),
    valid_digests.map(lambda d: d.replace(":", "")),
    valid_digests.map(lambda d: " " + d),
).filter(lambda d: not valid_digest(d) and "/" not in d)


@settings(max_examples=60, **COMMON)
@given(digest=valid_digests)
def test_valid_digests_are_accepted(docker_repo, digest):
    for target in ("/v2/props/digests/blobs/" + digest,
                   "/v2/props/digests/manifests/" + digest):
        answer = registry_request(docker_repo, "GET", target)
        assert answer.status_code == 404, answer.text
        registry_error(answer, "BLOB_UNKNOWN", "MANIFEST_UNKNOWN")
    answer = registry_request(docker_repo, "GET",
                              "/v2/props/digests/referrers/" + digest)
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.body)["manifests"] == []


@settings(max_examples=150, **COMMON)
@given(digest=invalid_digests,
       slot=st.sampled_from(["blobs/", "referrers/", "blobs/uploads/?digest=",
                             "blobs/uploads/?mount=", "manifests/"]))
def test_invalid_digests_are_rejected(docker_repo, digest, slot):
    if slot == "manifests/":
        assume(TAG_RE.fullmatch(digest) is None)
    method = "POST" if "uploads" in slot else "GET"
    target = "/v2/props/digests/" + slot + quote(digest, "")
    answer = registry_request(docker_repo, method, target,
                              body=b"abc" if method == "POST" else None)
    note(answer.text)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    error = registry_error(answer)
    if "\n" not in digest and "\r" not in digest:
        assert answer.status_code == 400, answer.text
        assert error["code"] == "DIGEST_INVALID", error


# ---------------------------------------------------------------------------
# Parsing: raw paths
# ---------------------------------------------------------------------------

segment_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",),
                           blacklist_characters="/\\"),
    min_size=1, max_size=12)
hostile_segments = st.one_of(
    segment_text, st.sampled_from(["", ".", "..", "a\\b", "\\", "x\x00y",
                                   "\x7f", "\t", "%", "é", "\u202e",
                                   "\ufeff", "...", ".a", "a."]))


def raw_path_valid(path):
    """Depot's documented rule: a clean relative path, no \\ nor controls."""
    if not path or path.endswith("/") or len(path) > 1024:
        return False
    if re.search(r"[\x00-\x1f\x7f\\]", path):
        return False
    # The server cannot tell a literal "%2F" from an encoded slash: both
    # are refused.
    if re.search(r"%2[fF]|%5[cC]", path):
        return False
    return all(segment not in ("", ".", "..") for segment in path.split("/"))


def encode_byte(byte, lower):
    return ("%%%02x" if lower else "%%%02X") % byte


def percent_encode(path, pattern):
    """Percent-encode ``path``; ``pattern`` picks bytes to encode needlessly."""
    out = []
    for index, byte in enumerate(path.encode("utf-8")):
        char = chr(byte)
        choice = pattern[index % len(pattern)] if pattern else 0
        if char == "/":
            out.append("/")
        elif byte > 126 or byte <= 32 or char in "%?#\"<>\\^`{|}[]" or choice:
            out.append(encode_byte(byte, choice == 2))
        else:
            out.append(char)
    return "".join(out)


@settings(max_examples=200, **COMMON)
@given(segments=st.lists(hostile_segments, min_size=1, max_size=5),
       trailing=st.booleans(),
       pattern=st.lists(st.integers(0, 2), max_size=8),
       body=st.binary(max_size=64))
def test_raw_paths(depot, raw_repo, segments, trailing, pattern, body):
    path = "/".join(segments) + ("/" if trailing else "")
    target = "/repository/%s/%s" % (raw_repo, percent_encode(path, pattern))
    note(target)
    answer = main_request(depot, "PUT", target,
                          {"Content-Type": "application/octet-stream"}, body)
    note("%d %s" % (answer.status_code, answer.text))
    assert answer.status_code < 500, answer.text
    if raw_path_valid(path):
        assert answer.status_code == 201, (path, answer.text)
        assert json.loads(answer.body)["path"] == path
        got = main_request(depot, "GET", target)
        assert got.status_code == 200, got.text
        assert got.body == body
        listing = depot.request("GET", "/repository/%s/" % raw_repo).json()
        assert listing["entries"], listing
        gone = main_request(depot, "DELETE", target)
        assert gone.status_code == 204, gone.text
    else:
        assert 400 <= answer.status_code < 500, (path, answer.text)
        api_error(answer)
        listing = depot.request("GET", "/repository/%s/" % raw_repo).json()
        assert listing["entries"] == [], listing


@settings(max_examples=60, **COMMON)
@given(path=st.binary(min_size=1, max_size=20))
def test_raw_paths_of_arbitrary_bytes(depot, raw_repo, path):
    """Any byte string as a (percent-encoded) path: never 5xx, UTF-8 only."""
    target = "/repository/%s/%s" % (raw_repo, "".join(
        "/" if byte == 0x2F else "%%%02X" % byte for byte in path))
    answer = main_request(depot, "PUT", target, body=b"x")
    assert answer.status_code < 500, answer.text
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        message = api_error(answer)
        if b"\n" in path:
            # Bottle's router does not match a newline: 404 "not found".
            assert 400 <= answer.status_code < 500, answer.text
        else:
            assert answer.status_code == 400, answer.text
            assert "UTF-8" in message, message
        return
    if raw_path_valid(text):
        assert answer.status_code == 201, answer.text
        assert main_request(depot, "DELETE", target).status_code == 204
    else:
        assert 400 <= answer.status_code < 500, answer.text
        api_error(answer)


# ---------------------------------------------------------------------------
# Parsing: Range headers
# ---------------------------------------------------------------------------

def expected_range(header, size):
    """What RFC 9110 asks for one Range header on ``size`` bytes.

    Returns None (send everything, 200), "416", or a (start, end) slice.
    Several ranges, other units and malformed headers may be ignored.
    """
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header)
    if not match or match.groups() == ("", ""):
        return "ignore"
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            return "416"
        return max(size - length, 0), size
    start = int(first)
    if last != "" and int(last) < start:
        return "ignore"
    if start >= size:
        return "416"
    end = size if last == "" else min(int(last) + 1, size)
    return start, end


numbers = st.one_of(st.integers(0, 40), st.integers(0, 3 * 1024 * 1024),
                    st.integers(0, 10 ** 30))
range_headers = st.one_of(
    st.builds(lambda a, b: "bytes=%d-%d" % (a, b), numbers, numbers),
    st.builds(lambda a: "bytes=%d-" % a, numbers),
    st.builds(lambda n: "bytes=-%d" % n, numbers),
    st.builds(lambda a, b, c, d: "bytes=%d-%d,%d-%d" % (a, b, c, d),
              numbers, numbers, numbers, numbers),
    st.sampled_from(["bytes=", "bytes=-", "bytes=a-b", "items=0-1", "bytes 0-1",
                     "bytes=--1", "bytes=1--2", "bytes=0x10-", "=0-1",
                     "bytes=\u00b9-2", "bytes=1-2-3", ""]),
    st.text(alphabet="bytes=-0123456789, ", max_size=20),
)

SIZES = (0, 1, 17, 1000, 1024 * 1024 + 3)


class Ranged(tuple):
    """(raw repository, registry port, {size: bytes}) with a short repr."""

    def __new__(cls, *values):
        return super().__new__(cls, values)

    def __repr__(self):
        return "Ranged(%r, %r, sizes=%r)" % (self[0], self[1], list(self[2]))


@pytest.fixture(scope="module")
def ranged_content(depot):
    """Files and blobs of several sizes, one crossing a storage chunk."""
    name = "raw-ranges"
    repo_name = "docker-ranges"
    depot.create_repository(name, "raw")
    port = free_port()
    depot.create_repository(repo_name, "docker", config={"http_port": port})
    contents = {}
    for size in SIZES:
        data = hashlib.shake_256(b"%d" % size).digest(size) if size else b""
        answer = depot.request("PUT", "/repository/%s/f%d" % (name, size),
                               data=data)
        assert answer.status_code == 201, answer.text
        digest = sha256(data)
        answer = requests.post(
            "http://127.0.0.1:%d/v2/ranges/blobs/uploads/" % port,
            params={"digest": digest}, data=data)
        assert answer.status_code == 201, answer.text
        contents[size] = data
    yield Ranged(name, port, contents)
    depot.api("DELETE", "/repositories/" + name)
    depot.api("DELETE", "/repositories/" + repo_name)


def check_range(answer, header, data, registry):
    size = len(data)
    expected = expected_range(header, size)
    note("Range %r on %d bytes: %d %s %s" % (
        header, size, answer.status_code, answer.headers.get("Content-Range"),
        answer.body[:100]))
    assert answer.status_code < 500
    assert answer.headers.get("Accept-Ranges") == "bytes"
    if expected == "ignore":
        # May be ignored (200) or, for a several-range request, honoured;
        # when honoured it must be consistent with the bytes.
        if answer.status_code == 200:
            assert answer.body == data
            return
    if expected == "416":
        if answer.status_code == 200:  # RFC 9110 lets a server ignore Range
            assert answer.body == data
            return
        assert answer.status_code == 416, answer.status_code
        assert answer.headers.get("Content-Range") == "bytes */%d" % size
        if registry:
            registry_error(answer)
        else:
            api_error(answer)
        return
    if expected == "ignore":
        assert answer.status_code in (200, 206), answer.status_code
        return
    start, end = expected
    assert answer.status_code == 206, (answer.status_code, answer.headers)
    assert answer.headers.get("Content-Range") == "bytes %d-%d/%d" % (
        start, end - 1, size)
    assert answer.headers.get("Content-Length") == str(end - start)
    assert answer.body == data[start:end]


@settings(max_examples=150, **COMMON)
@given(header=range_headers, size=st.sampled_from(SIZES))
@example(header="bytes=-1", size=0)
@example(header="bytes=0-", size=0)
@example(header="bytes=1048575-1048577", size=1024 * 1024 + 3)
def test_range_headers_on_raw_files(depot, ranged_content, header, size):
    name, _port, contents = ranged_content
    answer = main_request(depot, "GET", "/repository/%s/f%d" % (name, size),
                          {"Range": header.encode("utf-8")})
    check_range(answer, header, contents[size], registry=False)


@settings(max_examples=150, **COMMON)
@given(header=range_headers, size=st.sampled_from(SIZES))
@example(header="bytes=-1", size=0)
@example(header="bytes=0-", size=0)
@example(header="bytes=1048575-1048577", size=1024 * 1024 + 3)
def test_range_headers_on_blobs(ranged_content, header, size):
    _name, port, contents = ranged_content
    data = contents[size]
    answer = send("127.0.0.1", port, "GET",
                  "/v2/ranges/blobs/" + sha256(data),
                  {"Range": header.encode("utf-8")})
    check_range(answer, header, data, registry=True)
    if answer.status_code in (200, 206):
        assert answer.headers.get("Docker-Content-Digest") == sha256(data)
