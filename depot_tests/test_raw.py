"""Raw repositories: files under /repository/<name>/<path> on the main port."""

import hashlib
import http.client
import ssl
import threading

import apsw
import pytest

from test_api import check_error

MiB = 1024 * 1024


def put(depot, repo, path, data, **headers):
    return depot.request("PUT", "/repository/%s/%s" % (repo, path), data=data,
                         headers=headers)


def get(depot, repo, path, **headers):
    return depot.request("GET", "/repository/%s/%s" % (repo, path),
                         headers=headers)


def raw_path_request(depot, method, path, body=None):
    """Send ``path`` exactly as given (requests would collapse ``..``)."""
    context = ssl.create_default_context(cafile=depot.cert)
    connection = http.client.HTTPSConnection("127.0.0.1", depot.port,
                                             context=context, timeout=30)
    try:
        connection.request(method, path, body=body)
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Type"), answer.read()
    finally:
        connection.close()


def pattern(size, seed=b"depot"):
    """``size`` bytes that do not compress and are the same on every run."""
    block = hashlib.sha512(seed).digest() * 2048   # 128 KiB
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


def stream(size, seed=b"depot", piece=4 * MiB):
    """Yield ``size`` bytes of distinct, incompressible pieces; returns nothing."""
    sent = 0
    number = 0
    while sent < size:
        block = hashlib.sha512(seed + str(number).encode()).digest()
        data = (block * (piece // len(block) + 1))[:min(piece, size - sent)]
        sent += len(data)
        number += 1
        yield data


def stream_digest(size, seed=b"depot"):
    hasher = hashlib.sha256()
    for data in stream(size, seed):
        hasher.update(data)
    return hasher.hexdigest()


def peak_memory(process):
    """The peak resident memory of a process so far, in bytes (VmHWM)."""
    with open("/proc/%d/status" % process.pid) as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/%d/status" % process.pid)


def database(depot):
    """A read-only look into a running Depot's database."""
    connection = apsw.Connection(str(depot.data_dir / "depot.db"),
                                 flags=apsw.SQLITE_OPEN_READONLY)
    # Depot may hold its write lock for a moment; wait as Depot's readers do.
    connection.set_busy_timeout(30_000)
    return connection


# Storing and reading -------------------------------------------------------------

def test_put_get_head_delete(depot, raw_repo):
    answer = put(depot, raw_repo, "docs/readme.txt", b"hello raw world")
    assert answer.status_code == 201, answer.text
    sha = hashlib.sha256(b"hello raw world").hexdigest()
    assert answer.json() == {"path": "docs/readme.txt", "size": 15,
                             "sha256": sha, "content_type": "text/plain"}
    got = get(depot, raw_repo, "docs/readme.txt")
    assert got.status_code == 200 and got.content == b"hello raw world"
    assert got.headers["Content-Length"] == "15"
    assert got.headers["Content-Type"] == "text/plain"
    assert got.headers["ETag"] == '"%s"' % sha
    assert got.headers["X-Checksum-Sha256"] == sha
    assert got.headers["Last-Modified"].endswith("GMT")
    head = depot.request("HEAD", "/repository/%s/docs/readme.txt" % raw_repo)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == "15"
    assert head.headers["ETag"] == got.headers["ETag"]
    assert depot.request("DELETE", "/repository/%s/docs/readme.txt"
                         % raw_repo).status_code == 204
    check_error(get(depot, raw_repo, "docs/readme.txt"), 404)
    check_error(depot.request("DELETE", "/repository/%s/docs/readme.txt"
                              % raw_repo), 404)


def test_replace_is_200_and_serves_the_new_content(depot, raw_repo):
    assert put(depot, raw_repo, "f", b"one").status_code == 201
    assert put(depot, raw_repo, "f", b"two!").status_code == 200
    assert get(depot, raw_repo, "f").content == b"two!"


def test_content_type_as_uploaded_else_from_the_name(depot, raw_repo):
    put(depot, raw_repo, "a.json", b"{}")
    put(depot, raw_repo, "b.bin", b"\0", **{"Content-Type": "image/png"})
    put(depot, raw_repo, "c", b"?")
    put(depot, raw_repo, "d.tar.gz", b"\x1f\x8b")
    assert get(depot, raw_repo, "a.json").headers["Content-Type"] == \
        "application/json"
    assert get(depot, raw_repo, "d.tar.gz").headers["Content-Type"] == \
        "application/gzip"
    assert get(depot, raw_repo, "b.bin").headers["Content-Type"] == "image/png"
    assert get(depot, raw_repo, "c").headers["Content-Type"] == \
        "application/octet-stream"


def test_checksum_header_is_checked_and_a_mismatch_stores_nothing(
        depot, raw_repo):
    data = b"checked content"
    good = hashlib.sha256(data).hexdigest()
    assert put(depot, raw_repo, "ok", data,
               **{"X-Checksum-Sha256": good}).status_code == 201
    check_error(put(depot, raw_repo, "bad", data,
                    **{"X-Checksum-Sha256": "0" * 64}), 400, "SHA-256")
    check_error(get(depot, raw_repo, "bad"), 404)
    check_error(put(depot, raw_repo, "bad", data,
                    **{"X-Checksum-Sha256": "xyz"}), 400, "X-Checksum-Sha256")
    # A mismatch on replace keeps the old file.
    check_error(put(depot, raw_repo, "ok", b"other",
                    **{"X-Checksum-Sha256": good}), 400)
    assert get(depot, raw_repo, "ok").content == data


def test_range_and_if_none_match(depot, raw_repo):
    data = bytes(range(256)) * 4
    put(depot, raw_repo, "r.bin", data)
    part = get(depot, raw_repo, "r.bin", Range="bytes=10-19")
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["Content-Range"] == "bytes 10-19/1024"
    tail = get(depot, raw_repo, "r.bin", Range="bytes=-5")
    assert tail.status_code == 206 and tail.content == data[-5:]
    rest = get(depot, raw_repo, "r.bin", Range="bytes=1000-")
    assert rest.content == data[1000:]
    beyond = get(depot, raw_repo, "r.bin", Range="bytes=1024-")
    check_error(beyond, 416)
    assert beyond.headers["Content-Range"] == "bytes */1024"
    etag = get(depot, raw_repo, "r.bin").headers["ETag"]
    cached = get(depot, raw_repo, "r.bin", **{"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    assert get(depot, raw_repo, "r.bin",
               **{"If-None-Match": '"other"'}).status_code == 200


# Listing ---------------------------------------------------------------------

def test_listing_of_root_and_directories(depot, raw_repo):
    for path in ("top.txt", "dir/a.txt", "dir/b.txt", "dir/sub/c.txt"):
        put(depot, raw_repo, path, path.encode())
    root = depot.request("GET", "/repository/%s/" % raw_repo).json()
    assert [(e["name"], e["type"]) for e in root["entries"]] == [
        ("dir", "directory"), ("top.txt", "file")]
    listing = depot.request("GET", "/repository/%s/dir/" % raw_repo).json()
    assert listing["path"] == "dir/"
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [
        ("a.txt", "file"), ("b.txt", "file"), ("sub", "directory")]
    assert listing["entries"][0]["size"] == 9
    check_error(depot.request("GET", "/repository/%s/nothing/" % raw_repo), 404)
    page = depot.request("GET", "/repository/%s/dir/" % raw_repo,
                         headers={"Accept": "text/html,*/*"})
    assert page.headers["Content-Type"].startswith("text/html")
    assert 'href="sub/"' in page.text and "a.txt" in page.text


def test_empty_repository_lists_nothing(depot, raw_repo):
    assert depot.request("GET", "/repository/%s/" % raw_repo).json()[
        "entries"] == []


def test_file_and_directory_of_one_name_conflict(depot, raw_repo):
    put(depot, raw_repo, "x/y", b"file")
    check_error(put(depot, raw_repo, "x", b"dir"), 409, "directory")
    check_error(put(depot, raw_repo, "x/y/z", b"below a file"), 409, "file")


# Bad paths ---------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "a/../b", "../escape", "a/./b", "a//b", "a\\b", "a%5Cb", "a%00b",
    "ctl%01x", "%2e%2e/x", "tab%09"])
def test_bad_paths_are_400_and_nothing_is_stored(depot, raw_repo, path):
    status, kind, body = raw_path_request(
        depot, "PUT", "/repository/%s/%s" % (raw_repo, path), b"evil")
    assert status == 400, body
    assert kind.startswith("application/json") and b'"error"' in body
    listing = depot.request("GET", "/repository/%s/" % raw_repo).json()
    assert listing["entries"] == []


def test_invalid_utf8_path_is_400(depot, raw_repo):
    status, _kind, body = raw_path_request(
        depot, "PUT", "/repository/%s/bad%%ff" % raw_repo, b"x")
    assert status == 400 and b"UTF-8" in body


def test_directory_cannot_be_written(depot, raw_repo):
    check_error(depot.request("PUT", "/repository/%s/dir/" % raw_repo,
                              data=b"x"), 405)


def test_raw_request_to_a_docker_repository_says_where_its_registry_is(
        depot, docker_repo):
    message = check_error(get(depot, docker_repo.name, "file"), 400,
                          "docker repository")
    assert "http://127.0.0.1:%d/v2/" % docker_repo.port in message


# Large files, atomic replace, dedup -------------------------------------------

def test_large_file_streams_with_bounded_memory(fresh_depot):
    size = 300 * MiB + 12345
    fresh_depot.create_repository("big", "raw")
    before = peak_memory(fresh_depot.process)
    answer = fresh_depot.request("PUT", "/repository/big/large.bin",
                                 data=stream(size), timeout=600)
    assert answer.status_code == 201, answer.text
    digest = stream_digest(size)
    assert answer.json()["sha256"] == digest and answer.json()["size"] == size

    download = fresh_depot.request("GET", "/repository/big/large.bin",
                                   stream=True, timeout=600)
    hasher = hashlib.sha256()
    received = 0
    for data in download.iter_content(MiB):
        hasher.update(data)
        received += len(data)
    assert received == size and hasher.hexdigest() == digest
    assert peak_memory(fresh_depot.process) - before < 60 * MiB

    # A range across chunk boundaries, from the middle.
    start = 150 * MiB - 1000
    expected = b"".join(stream(size))[start:start + 3 * MiB]
    part = fresh_depot.request("GET", "/repository/big/large.bin", headers={
        "Range": "bytes=%d-%d" % (start, start + 3 * MiB - 1)})
    assert part.status_code == 206 and part.content == expected


def test_replace_is_atomic_under_concurrent_reads(depot, raw_repo):
    versions = [pattern(5 * MiB + 7, seed=bytes([n])) for n in range(2)]
    digests = {hashlib.sha256(data).hexdigest() for data in versions}
    put(depot, raw_repo, "moving.bin", versions[0])
    seen, failures = [], []
    stop = threading.Event()

    def reader():
        import requests
        session = requests.Session()
        while not stop.is_set():
            answer = session.get(depot.url + "/repository/%s/moving.bin"
                                 % raw_repo, verify=depot.cert, timeout=60)
            if answer.status_code != 200:
                failures.append(answer.status_code)
                continue
            seen.append(hashlib.sha256(answer.content).hexdigest())
            if answer.headers["X-Checksum-Sha256"] != seen[-1]:
                failures.append("header and body differ")

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for thread in readers:
        thread.start()
    try:
        for round_number in range(12):
            assert put(depot, raw_repo, "moving.bin",
                       versions[round_number % 2]).status_code == 200
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert not failures
    assert seen and set(seen) <= digests


def test_identical_content_is_stored_once(depot):
    data = pattern(3 * MiB, seed=b"dedup-test")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    for name in ("dedup-a", "dedup-b"):
        depot.create_repository(name, "raw")
        for path in ("one.bin", "two/copy.bin"):
            assert put(depot, name, path, data).status_code == 201
    try:
        db = database(depot)
        (count,), = db.execute("SELECT count(*) FROM content WHERE digest = ?",
                               (digest,))
        assert count == 1
        (stored,), = db.execute(
            "SELECT sum(length(data)) FROM chunk WHERE content_id = "
            "(SELECT id FROM content WHERE digest = ?)", (digest,))
        assert stored == len(data)
        # Deleting one repository keeps what the other still holds.
        assert depot.api("DELETE", "/repositories/dedup-a").status_code == 204
        assert get(depot, "dedup-b", "two/copy.bin").content == data
    finally:
        depot.api("DELETE", "/repositories/dedup-a")
        depot.api("DELETE", "/repositories/dedup-b")


def test_space_of_deleted_content_is_freed(fresh_depot):
    import time
    fresh_depot.create_repository("gone", "raw")
    data = pattern(4 * MiB, seed=b"to be freed")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    put(fresh_depot, "gone", "f.bin", data)
    fresh_depot.api("DELETE", "/repositories/gone")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        db = database(fresh_depot)
        chunks, = db.execute("SELECT count(*) FROM chunk").fetchone()
        contents, = db.execute("SELECT count(*) FROM content WHERE digest = ?",
                               (digest,)).fetchone()
        db.close()
        if chunks == 0 and contents == 0:
            break
        time.sleep(0.2)
    assert (chunks, contents) == (0, 0)
