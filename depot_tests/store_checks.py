"""Shared helpers of the fault, load and soak tests.

* digests and OCI manifests built from bytes;
* a small registry client (``Registry``) over ``requests`` that pushes blobs
  in the ways real clients do and pulls them back, verifying digests;
* ``RawHTTP``: a bare socket client (optionally TLS, verified with Depot's
  certificate) for what ``requests`` cannot do: send part of a body, stall,
  drop the connection, or read a response after the server broke off the
  upload;
* read-only checks of Depot's SQLite database (integrity and consistency),
  run while Depot is stopped or killed.
"""

import hashlib
import json
import os
import random
import socket
import sqlite3
import ssl
import time

import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MIB = 1024 * 1024


def digest(data, algorithm="sha256"):
    return "%s:%s" % (algorithm, hashlib.new(algorithm, data).hexdigest())


def random_bytes(size, seed=None):
    if seed is None:
        return os.urandom(size)
    return random.Random(seed).randbytes(size)


def manifest_for(config, layers, annotations=None):
    """The bytes of an OCI image manifest over a config and layers (bytes)."""
    document = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": digest(layer),
                    "size": len(layer)} for layer in layers]}
    if annotations:
        document["annotations"] = annotations
    return json.dumps(document, sort_keys=True).encode()


def referenced_blobs(manifest_bytes):
    document = json.loads(manifest_bytes)
    found = [document["config"]["digest"]] if "config" in document else []
    return found + [layer["digest"] for layer in document.get("layers", [])]


# ---------------------------------------------------------------------------
# Registry client
# ---------------------------------------------------------------------------

class Registry:
    """A registry client over requests; every method returns the response."""

    def __init__(self, base, timeout=60):
        self.base = base.rstrip("/")
        self.session = requests.Session()
        self.timeout = timeout

    def url(self, path):
        return path if path.startswith("http") else self.base + path

    def call(self, method, path, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        return self.session.request(method, self.url(path), **kwargs)

    def close(self):
        self.session.close()

    # Blobs
    def push_monolithic(self, name, data):
        return self.call("POST", "/v2/%s/blobs/uploads/?digest=%s"
                         % (name, digest(data)), data=data,
                         headers={"Content-Type": "application/octet-stream"})

    def start_upload(self, name):
        return self.call("POST", "/v2/%s/blobs/uploads/" % name)

    def push_chunked(self, name, data, chunk=None):
        """POST, PATCH numbered chunks with Content-Range, PUT ?digest=."""
        answer = self.start_upload(name)
        if answer.status_code != 202:
            return answer
        location = answer.headers["Location"]
        chunk = chunk or max(len(data) // 3, 1)
        offset = 0
        while offset < len(data):
            piece = data[offset:offset + chunk]
            answer = self.call("PATCH", location, data=piece, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": "%d-%d" % (offset, offset + len(piece) - 1)})
            if answer.status_code != 202:
                return answer
            location = answer.headers["Location"]
            offset += len(piece)
        return self.call("PUT", location, params={"digest": digest(data)})

    def push_streamed(self, name, data):
        """docker's way: one PATCH with chunked transfer encoding, then PUT."""
        answer = self.start_upload(name)
        if answer.status_code != 202:
            return answer
        pieces = (data[i:i + 256 * 1024] for i in range(0, len(data), 256 * 1024))
        answer = self.call("PATCH", answer.headers["Location"], data=pieces,
                           headers={"Content-Type": "application/octet-stream"})
        if answer.status_code != 202:
            return answer
        return self.call("PUT", answer.headers["Location"],
                         params={"digest": digest(data)})

    def push_put(self, name, data):
        """containerd's way: POST, then one PUT with the whole body."""
        answer = self.start_upload(name)
        if answer.status_code != 202:
            return answer
        return self.call("PUT", answer.headers["Location"],
                         params={"digest": digest(data)}, data=data,
                         headers={"Content-Type": "application/octet-stream"})

    def push_blob(self, name, data, how="monolithic"):
        return {"monolithic": self.push_monolithic,
                "chunked": self.push_chunked,
                "streamed": self.push_streamed,
                "put": self.push_put}[how](name, data)

    def get_blob(self, name, blob_digest, **kwargs):
        return self.call("GET", "/v2/%s/blobs/%s" % (name, blob_digest), **kwargs)

    # Manifests
    def put_manifest(self, name, reference, data):
        return self.call("PUT", "/v2/%s/manifests/%s" % (name, reference),
                         data=data, headers={"Content-Type": OCI_MANIFEST})

    def get_manifest(self, name, reference):
        return self.call("GET", "/v2/%s/manifests/%s" % (name, reference),
                         headers={"Accept": OCI_MANIFEST})

    def pull_verified(self, name, reference):
        """Pull a manifest and all its blobs; returns a list of problems."""
        problems = []
        answer = self.get_manifest(name, reference)
        if answer.status_code != 200:
            return ["manifest %s:%s: %d %s" % (name, reference,
                                               answer.status_code, answer.text[:200])]
        body = answer.content
        if answer.headers.get("Docker-Content-Digest") != digest(body):
            problems.append("manifest %s:%s: header digest %s, body %s" % (
                name, reference, answer.headers.get("Docker-Content-Digest"),
                digest(body)))
        if reference.startswith("sha256:") and digest(body) != reference:
            problems.append("manifest %s@%s has digest %s"
                            % (name, reference, digest(body)))
        for blob_digest in referenced_blobs(body):
            problems += self.check_blob(name, blob_digest)
        return problems

    def check_blob(self, name, blob_digest):
        answer = self.get_blob(name, blob_digest)
        if answer.status_code != 200:
            return ["blob %s of %s: %d %s" % (blob_digest, name,
                                              answer.status_code, answer.text[:200])]
        if digest(answer.content, blob_digest.split(":")[0]) != blob_digest:
            return ["blob %s of %s: served %d bytes of digest %s" % (
                blob_digest, name, len(answer.content), digest(answer.content))]
        return []


def error_problem(answer, surface):
    """A description of what is wrong with an error answer, or None.

    ``surface`` is "registry" (``{"errors": [...]}``) or "api"
    (``{"error": "..."}``).
    """
    kind = answer.headers.get("Content-Type", "")
    if not kind.startswith("application/json"):
        return "%d with Content-Type %r: %r" % (answer.status_code, kind,
                                                answer.content[:200])
    try:
        body = answer.json()
    except ValueError:
        return "%d with a body that is not JSON: %r" % (answer.status_code,
                                                        answer.content[:200])
    if surface == "registry":
        errors = body.get("errors") if isinstance(body, dict) else None
        if not (isinstance(errors, list) and errors and
                all(isinstance(e, dict) and e.get("code") and e.get("message")
                    for e in errors)):
            return "%d with a body not in the registry format: %r" % (
                answer.status_code, body)
    else:
        if not (isinstance(body, dict) and isinstance(body.get("error"), str)
                and body["error"]):
            return "%d with a body not in the API format: %r" % (
                answer.status_code, body)
    return None


# ---------------------------------------------------------------------------
# Bare HTTP over a socket
# ---------------------------------------------------------------------------

class Response:
    def __init__(self, status, headers, body):
        self.status_code, self.headers, self.content = status, headers, body

    @property
    def text(self):
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


class RawHTTP:
    """One HTTP/1.1 request on a socket of its own, written by hand.

    ``begin`` sends the request line and headers; ``send`` part of the body;
    ``response`` reads the answer (even after the server stopped reading the
    body); ``abort`` drops the connection (RST when ``reset``).
    """

    def __init__(self, host, port, cert=None, timeout=30):
        raw = socket.create_connection((host, port), timeout=timeout)
        if cert:
            context = ssl.create_default_context(cafile=cert)
            raw = context.wrap_socket(raw, server_hostname=host)
        self.sock = raw
        self.host, self.port = host, port
        self.send_failed = None

    def begin(self, method, path, headers=None, length=None, chunked=False):
        lines = ["%s %s HTTP/1.1" % (method, path),
                 "Host: %s:%d" % (self.host, self.port)]
        headers = dict(headers or {})
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        elif length is not None:
            headers["Content-Length"] = str(length)
        headers.setdefault("Connection", "close")
        lines += ["%s: %s" % item for item in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin1"))
        self.chunked = chunked
        return self

    def send(self, data):
        """Send body bytes; False (and remember why) when the server hung up."""
        if self.send_failed:
            return False
        if self.chunked and data:
            data = b"%x\r\n" % len(data) + data + b"\r\n"
        try:
            self.sock.sendall(data)
            return True
        except OSError as error:
            self.send_failed = error
            return False

    def finish_chunked(self):
        self.send_failed or self.sock.sendall(b"0\r\n\r\n")

    def response(self, timeout=60):
        self.sock.settimeout(timeout)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = self.sock.recv(65536)
            if not piece:
                raise ConnectionError("closed before a response: %r" % data)
            data += piece
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = requests.structures.CaseInsensitiveDict()
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip()] = value.strip()
        if "Content-Length" in headers:
            length = int(headers["Content-Length"])
            while len(body) < length:
                piece = self.sock.recv(65536)
                if not piece:
                    break
                body += piece
        elif headers.get("Transfer-Encoding", "").lower() == "chunked":
            while not body.endswith(b"0\r\n\r\n"):
                piece = self.sock.recv(65536)
                if not piece:
                    break
                body += piece
            body = _unchunk(body)
        return Response(status, headers, body)

    def abort(self, reset=True):
        try:
            if reset:
                import struct
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass

    close = abort


def _unchunk(data):
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


def full_request(host, port, method, path, body=b"", headers=None, cert=None,
                 piece=256 * 1024, timeout=60):
    """Send a whole request and read the answer, even when the server stopped
    reading the body early (as it may when the disk is full)."""
    client = RawHTTP(host, port, cert=cert, timeout=timeout)
    try:
        client.begin(method, path, headers, length=len(body))
        for start in range(0, len(body), piece):
            if not client.send(body[start:start + piece]):
                break
        return client.response(timeout)
    finally:
        client.close()


def wait_for(predicate, timeout, interval=0.1):
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_registries(depot, timeout=20):
    """After a start: wait until every docker repository's port answers /v2/.

    Depot answers its health check on the main port before it has bound the
    registries' ports, so a test that restarts it waits for those too.
    """
    answer = depot.api("GET", "/repositories")
    listing = answer.json()
    repositories = listing if isinstance(listing, list) else \
        listing.get("repositories", [])
    ports = [r["config"]["http_port"] for r in repositories
             if r.get("type") == "docker" and r.get("config", {}).get("http_port")]

    def all_up():
        for port in ports:
            try:
                requests.get("http://127.0.0.1:%d/v2/" % port, timeout=2)
            except requests.RequestException:
                return False
        return True
    return wait_for(all_up, timeout, 0.05)


# ---------------------------------------------------------------------------
# The database, read only
# ---------------------------------------------------------------------------

def open_readonly(db_path):
    return sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=30)


def integrity(db_path):
    """The result of PRAGMA integrity_check, "ok" when the file is sound.

    Depot's files are never touched: the database and whatever journal a
    crash left beside it (rollback journal or WAL) are copied to a scratch
    directory, and SQLite opens the copy the way Depot will on its next
    start (rolling a hot journal back), then checks it.
    """
    import shutil
    import tempfile
    scratch = tempfile.mkdtemp(prefix="depot-integrity-")
    try:
        copy = os.path.join(scratch, "depot.db")
        shutil.copyfile(db_path, copy)
        for suffix in ("-journal", "-wal", "-shm"):
            if os.path.exists(db_path + suffix):
                shutil.copyfile(db_path + suffix, copy + suffix)
        db = sqlite3.connect(copy, timeout=30)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
            foreign = db.execute("PRAGMA foreign_key_check").fetchall()
        finally:
            db.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = "\n".join(row[0] for row in rows)
    if foreign:
        result += "\nforeign key violations: %r" % (foreign[:20],)
    return result


def query(db_path, sql, args=()):
    db = open_readonly(db_path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def garbage_count(db_path):
    """Content rows and chunks that nothing references and nothing may finish."""
    return query(db_path, """
        SELECT count(*), coalesce(sum(size), 0) FROM content
        WHERE NOT EXISTS (SELECT 1 FROM raw_file WHERE content_id = content.id)
          AND NOT EXISTS (SELECT 1 FROM blob WHERE content_id = content.id)
          AND NOT EXISTS (SELECT 1 FROM upload WHERE content_id = content.id)
    """)[0]


def chunk_bytes(db_path):
    return query(db_path, "SELECT coalesce(sum(length(data)), 0), count(*) "
                          "FROM chunk")[0]


def content_bytes(db, content_id):
    rows = db.execute("SELECT start, data FROM chunk WHERE content_id = ? "
                      "ORDER BY start", (content_id,)).fetchall()
    return b"".join(row[1] for row in rows)


def consistency_problems(db_path, rehash_limit=200, manifests_need_blobs=True):
    """Everything that is wrong with the store, as a list of sentences.

    * every tag names a manifest of its repository and image name;
    * (``manifests_need_blobs``) every manifest's config and layers are
      linked blobs of its image name;
    * every linked blob, raw file and upload names an existing content, and
      blobs and raw files only content that has its digest;
    * each content's chunks are contiguous from 0 and add up to its size;
    * a digest is stored once; no chunk belongs to no content;
    * up to ``rehash_limit`` contents hash to their digest again.
    """
    problems = []
    db = open_readonly(db_path)
    try:
        for repo, name, tag, target in db.execute(
                "SELECT repository_id, name, tag, digest FROM tag WHERE NOT "
                "EXISTS (SELECT 1 FROM manifest m WHERE m.repository_id = "
                "tag.repository_id AND m.name = tag.name AND m.digest = "
                "tag.digest)"):
            problems.append("tag %s:%s of repository %d names missing manifest %s"
                            % (name, tag, repo, target))
        for repo, name, manifest_digest, data in db.execute(
                "SELECT repository_id, name, digest, data FROM manifest"):
            if digest(bytes(data), manifest_digest.split(":")[0]) != manifest_digest:
                problems.append("manifest %s of %s: stored bytes hash to %s"
                                % (manifest_digest, name, digest(bytes(data))))
            if not manifests_need_blobs:
                continue
            try:
                blobs = referenced_blobs(bytes(data))
            except (ValueError, KeyError, TypeError):
                continue
            for blob_digest in blobs:
                row = db.execute(
                    "SELECT 1 FROM blob JOIN content ON content.id = "
                    "blob.content_id WHERE blob.repository_id = ? AND "
                    "blob.name = ? AND content.digest = ?",
                    (repo, name, blob_digest)).fetchone()
                if row is None:
                    problems.append("manifest %s of %s (repository %d) "
                                    "references blob %s, which is not linked"
                                    % (manifest_digest, name, repo, blob_digest))
        for table in ("blob", "raw_file", "upload"):
            for content_id, in db.execute(
                    "SELECT content_id FROM %s WHERE content_id NOT IN "
                    "(SELECT id FROM content)" % table):
                problems.append("%s row names missing content %d"
                                % (table, content_id))
        for table in ("blob", "raw_file"):
            for content_id, in db.execute(
                    "SELECT content_id FROM %s JOIN content ON content.id = "
                    "content_id WHERE content.digest IS NULL" % table):
                problems.append("%s row names content %d, which has no digest"
                                % (table, content_id))
        for content_digest, count in db.execute(
                "SELECT digest, count(*) FROM content WHERE digest IS NOT NULL "
                "GROUP BY digest HAVING count(*) > 1"):
            problems.append("digest %s is stored %d times" % (content_digest, count))
        orphans = db.execute("SELECT count(*) FROM chunk WHERE content_id NOT "
                             "IN (SELECT id FROM content)").fetchone()[0]
        if orphans:
            problems.append("%d chunks belong to no content" % orphans)
        for content_id, size, total, count, first, gaps in db.execute("""
                SELECT content.id, content.size,
                       coalesce(sum(length(chunk.data)), 0), count(chunk.id),
                       min(chunk.start),
                       (SELECT count(*) FROM chunk a WHERE a.content_id = content.id
                          AND a.start > 0 AND NOT EXISTS (
                            SELECT 1 FROM chunk b WHERE b.content_id = a.content_id
                            AND b.start + length(b.data) = a.start))
                FROM content LEFT JOIN chunk ON chunk.content_id = content.id
                WHERE content.digest IS NOT NULL
                   OR content.id IN (SELECT content_id FROM upload)
                GROUP BY content.id"""):
            if total != size:
                problems.append("content %d: size %d but its chunks hold %d bytes"
                                % (content_id, size, total))
            if count and (first != 0 or gaps):
                problems.append("content %d: chunks not contiguous from 0 "
                                "(first %s, %d gaps)" % (content_id, first, gaps))
        sample = db.execute(
            "SELECT id, digest FROM content WHERE digest IS NOT NULL "
            "ORDER BY random() LIMIT ?", (rehash_limit,)).fetchall()
        for content_id, content_digest in sample:
            actual = digest(content_bytes(db, content_id),
                            content_digest.split(":")[0])
            if actual != content_digest:
                problems.append("content %d has digest %s but its bytes hash "
                                "to %s" % (content_id, content_digest, actual))
    finally:
        db.close()
    return problems
