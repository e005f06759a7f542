"""Protocol steps of the Docker Registry HTTP API V2 / OCI distribution-spec,
as plain functions over ``requests``, named the way distribution's own tests
name them: ``start_upload``, ``push_chunk``, ``finish_upload``,
``put_manifest``, ``check_error`` ...

Every helper takes a ``Client`` (one registry base URL plus a session) and
returns the ``requests.Response`` so that tests assert on what came back.
"""

import hashlib
import json
import urllib.parse

import requests

API_VERSION = "registry/2.0"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

#: The error codes of the distribution-spec's "Error Codes" table.
SPEC_ERROR_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID", "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN", "NAME_INVALID", "NAME_UNKNOWN", "SIZE_INVALID",
    "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
}


def digest_of(data, algorithm="sha256"):
    return "%s:%s" % (algorithm, hashlib.new(algorithm, data).hexdigest())


class Client:
    """One registry (``base`` like ``http://127.0.0.1:5000``) and a session."""

    def __init__(self, base, verify=True):
        self.base = base.rstrip("/")
        self.session = requests.Session()
        self.verify = verify

    def url(self, path_or_url):
        """An absolute URL for a path (``/v2/...``) or a Location header."""
        return urllib.parse.urljoin(self.base + "/", path_or_url)

    def request(self, method, path, **kwargs):
        kwargs.setdefault("timeout", 60)
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("allow_redirects", False)
        return self.session.request(method, self.url(path), **kwargs)

    def close(self):
        self.session.close()


# Errors -----------------------------------------------------------------------

def check_api_version(response):
    assert response.headers.get("Docker-Distribution-API-Version") == API_VERSION, (
        response.status_code, dict(response.headers))


def check_error(response, status, code=None):
    """``response`` is the spec's JSON error: status, version header, errors[].

    ``code`` is the expected error code, or None for "any code of the table".
    HEAD answers carry no body, so only status and headers are checked there.
    Returns the list of errors.
    """
    assert response.status_code == status, (
        "expected %d %s, got %d: %s" % (status, code, response.status_code,
                                        response.text[:2000]))
    check_api_version(response)
    if response.request.method == "HEAD":
        assert response.content == b""
        return []
    content_type = response.headers.get("Content-Type", "")
    assert content_type.split(";")[0].strip() == "application/json", content_type
    document = response.json()
    assert isinstance(document, dict) and isinstance(document.get("errors"), list), \
        document
    assert document["errors"], document
    for error in document["errors"]:
        assert isinstance(error.get("code"), str), error
        assert error["code"] in SPEC_ERROR_CODES, error
        assert isinstance(error.get("message", ""), str), error
    if code is not None:
        codes = [error["code"] for error in document["errors"]]
        assert code in codes, "expected %s, got %s" % (code, document)
    return document["errors"]


# Blob uploads -----------------------------------------------------------------

def start_upload(client, name, **params):
    """POST /v2/<name>/blobs/uploads/ (with optional ``digest``/``mount``/``from``)."""
    data = params.pop("data", None)
    headers = params.pop("headers", {})
    if data is None:
        headers.setdefault("Content-Length", "0")
    return client.request("POST", "/v2/%s/blobs/uploads/" % name,
                          params=params or None, data=data, headers=headers)


def open_session(client, name):
    """Start an upload and check the 202; returns its Location (absolute)."""
    response = start_upload(client, name)
    check_upload_accepted(response, 0)
    return client.url(response.headers["Location"])


def check_upload_accepted(response, size, status=202):
    """202 (or GET's 204) for a session holding ``size`` bytes."""
    assert response.status_code == status, (response.status_code, response.text)
    check_api_version(response)
    assert response.headers.get("Location"), dict(response.headers)
    assert response.headers.get("Range") == "0-%d" % max(size - 1, 0), \
        dict(response.headers)
    assert response.headers.get("Docker-Upload-UUID"), dict(response.headers)


def push_chunk(client, location, data, start=None, headers=None):
    """PATCH <location> with one chunk; ``start`` adds Content-Range."""
    headers = dict(headers or {})
    headers.setdefault("Content-Type", "application/octet-stream")
    if start is not None:
        headers["Content-Range"] = "%d-%d" % (start, start + len(data) - 1)
    return client.request("PATCH", location, data=data, headers=headers)


def stream_chunk(client, location, pieces):
    """PATCH <location> with ``Transfer-Encoding: chunked`` and no length."""
    return client.request("PATCH", location, data=iter(list(pieces)),
                          headers={"Content-Type": "application/octet-stream"})


def finish_upload(client, location, digest, data=b"", start=None, headers=None):
    """PUT <location>?digest= with an optional last chunk."""
    headers = dict(headers or {})
    if data:
        headers.setdefault("Content-Type", "application/octet-stream")
        if start is not None:
            headers["Content-Range"] = "%d-%d" % (start, start + len(data) - 1)
    return client.request("PUT", location, params={"digest": digest}, data=data,
                          headers=headers)


def check_blob_created(response, name, digest):
    assert response.status_code == 201, (response.status_code, response.text)
    check_api_version(response)
    assert response.headers.get("Docker-Content-Digest") == digest
    location = response.headers.get("Location")
    assert location, dict(response.headers)
    assert urllib.parse.urlsplit(location).path == "/v2/%s/blobs/%s" % (name, digest)


def push_blob(client, name, data, algorithm="sha256"):
    """POST then PUT a whole blob; returns its digest."""
    digest = digest_of(data, algorithm)
    location = open_session(client, name)
    check_blob_created(finish_upload(client, location, digest, data), name, digest)
    return digest


def get_blob(client, name, digest, method="GET", headers=None):
    return client.request(method, "/v2/%s/blobs/%s" % (name, digest),
                          headers=headers)


def check_blob(client, name, data, digest=None):
    """HEAD and GET of a stored blob answer its exact bytes and headers."""
    digest = digest or digest_of(data)
    head = get_blob(client, name, digest, "HEAD")
    assert head.status_code == 200, (head.status_code, head.headers)
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest
    assert head.content == b""
    check_api_version(head)
    got = get_blob(client, name, digest)
    assert got.status_code == 200
    assert got.content == data
    assert got.headers["Content-Length"] == str(len(data))
    assert got.headers["Docker-Content-Digest"] == digest
    assert got.headers.get("Accept-Ranges") == "bytes"
    assert digest_of(got.content, digest.split(":")[0]) == digest


# Manifests --------------------------------------------------------------------

def canonical(document):
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def descriptor(media_type, data, **extra):
    return {"mediaType": media_type, "digest": digest_of(data),
            "size": len(data), **extra}


def put_manifest(client, name, reference, body, media_type=None, headers=None):
    """PUT /v2/<name>/manifests/<reference>; ``body`` is bytes or a dict."""
    if isinstance(body, dict):
        body = canonical(body)
    headers = dict(headers or {})
    if media_type:
        headers["Content-Type"] = media_type
    return client.request("PUT", "/v2/%s/manifests/%s" % (name, reference),
                          data=body, headers=headers)


def check_manifest_created(response, name, digest):
    assert response.status_code == 201, (response.status_code, response.text)
    check_api_version(response)
    assert response.headers.get("Docker-Content-Digest") == digest
    location = response.headers.get("Location")
    assert location and urllib.parse.urlsplit(location).path == \
        "/v2/%s/manifests/%s" % (name, digest), location


def get_manifest(client, name, reference, method="GET", headers=None):
    return client.request(method, "/v2/%s/manifests/%s" % (name, reference),
                          headers=headers)


def check_manifest(client, name, reference, body, media_type, headers=None):
    """GET and HEAD of a stored manifest: exact bytes, type, digest, length."""
    digest = digest_of(body)
    got = get_manifest(client, name, reference, headers=headers)
    assert got.status_code == 200, (got.status_code, got.text)
    check_api_version(got)
    assert got.content == body
    assert got.headers["Content-Type"] == media_type
    assert got.headers["Docker-Content-Digest"] == digest
    assert got.headers["Content-Length"] == str(len(body))
    head = get_manifest(client, name, reference, "HEAD", headers=headers)
    assert head.status_code == 200
    assert head.content == b""
    for header in ("Content-Type", "Docker-Content-Digest", "Content-Length"):
        assert head.headers[header] == got.headers[header], header
    return got


class Image:
    """A small image's blobs and manifest, ready to push."""

    def __init__(self, label="x", media_type=OCI_MANIFEST, layers=1,
                 config_type=None, **fields):
        docker = media_type == DOCKER_MANIFEST
        self.config = canonical({"architecture": "amd64", "os": "linux",
                                 "label": label})
        self.layers = [("layer %d of %s" % (number, label)).encode()
                       for number in range(layers)]
        config_type = config_type or (DOCKER_CONFIG if docker else OCI_CONFIG)
        layer_type = DOCKER_LAYER if docker else OCI_LAYER
        self.media_type = media_type
        self.document = {
            "schemaVersion": 2, "mediaType": media_type,
            "config": descriptor(config_type, self.config),
            "layers": [descriptor(layer_type, layer) for layer in self.layers],
            **fields}
        self.body = canonical(self.document)
        self.digest = digest_of(self.body)

    @property
    def blobs(self):
        return [self.config, *self.layers]

    def push_blobs(self, client, name):
        for blob in self.blobs:
            push_blob(client, name, blob)

    def push(self, client, name, reference=None):
        """Push blobs and manifest (by ``reference``, default its digest)."""
        self.push_blobs(client, name)
        response = put_manifest(client, name, reference or self.digest,
                                self.body, self.media_type)
        check_manifest_created(response, name, self.digest)
        return response


def index_of(manifests, media_type=OCI_INDEX, **fields):
    """An index (or Docker manifest list) body over pushed ``Image``s."""
    entries = []
    for number, image in enumerate(manifests):
        entries.append({"mediaType": image.media_type, "digest": image.digest,
                        "size": len(image.body),
                        "platform": {"architecture": "arch%d" % number,
                                     "os": "linux"}})
    return canonical({"schemaVersion": 2, "mediaType": media_type,
                      "manifests": entries, **fields})


# Listing ----------------------------------------------------------------------

def follow_pages(client, path, params):
    """GET a listing and every ``Link: <...>; rel="next"``; returns the pages."""
    pages = []
    url, query = path, params
    while url is not None:
        response = client.request("GET", url, params=query)
        assert response.status_code == 200, (response.status_code, response.text)
        pages.append(response)
        query = None
        url = response.links.get("next", {}).get("url")
        assert len(pages) < 100, "pagination does not end"
    return pages


# Raw HTTP/1.1 -----------------------------------------------------------------

def chunked_request(method, path, body, headers=()):
    """The bytes of one request whose body goes with Transfer-Encoding: chunked."""
    head = "%s %s HTTP/1.1\r\nHost: registry\r\nTransfer-Encoding: chunked\r\n" % (
        method, path)
    head += "".join("%s: %s\r\n" % pair for pair in headers) + "\r\n"
    framed = (b"%x\r\n" % len(body) + body + b"\r\n") if body else b""
    return head.encode() + framed + b"0\r\n\r\n"


def plain_request(method, path, body=b"", headers=(), length=None):
    head = "%s %s HTTP/1.1\r\nHost: registry\r\nContent-Length: %d\r\n" % (
        method, path, len(body) if length is None else length)
    head += "".join("%s: %s\r\n" % pair for pair in headers) + "\r\n"
    return head.encode() + body


def exchange(port, payload, host="127.0.0.1", timeout=30):
    """Send ``payload`` (one or more pipelined requests) on one connection,
    close the sending side, and parse every response until the server closes.

    Returns a list of (status, headers dict with lower-case keys, body).
    """
    import socket
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            data = connection.recv(65536)
            if not data:
                break
            received += data
    responses = []
    while received:
        head, separator, rest = received.partition(b"\r\n\r\n")
        assert separator, "a truncated response: %r" % received[:500]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        responses.append((status, headers, rest[:length]))
        received = rest[length:]
    return responses
