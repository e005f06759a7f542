"""Faults: Depot killed (SIGKILL) in the middle of writes, clients that drop
their connection or crawl, and a disk that fills up.

After every kill the database must pass ``PRAGMA integrity_check`` (opened
read-only before the restart), everything acknowledged before the kill must
still be there and verify by digest on download, nothing half-written may be
visible, and the garbage an interrupted write leaves must be freed after the
restart.
"""

import os
import subprocess
import threading
import time

import pytest
import requests

try:
    from depot_tests import store_checks as sc
    from depot_tests.conftest import DepotProcess, free_port
except ImportError:  # depot_tests is not a package: pytest put its folder on sys.path
    import store_checks as sc
    from conftest import DepotProcess, free_port

MIB = sc.MIB


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def db_path(depot):
    return str(depot.data_dir / "depot.db")


def new_registry(depot, name):
    port = free_port()
    depot.create_repository(name, "docker", config={"http_port": port})
    return port, sc.Registry("http://127.0.0.1:%d" % port)


def registry_port(depot, name):
    answer = depot.api("GET", "/repositories/" + name)
    assert answer.status_code == 200, answer.text
    return answer.json()["config"]["http_port"]


def kill_and_check(depot):
    """SIGKILL Depot, check the database file before anything touches it, restart."""
    depot.kill()
    assert sc.integrity(db_path(depot)) == "ok"
    depot.start()
    assert sc.wait_registries(depot)


def unfinished_size(depot, in_upload=False):
    """Bytes written so far into the biggest content still without digest."""
    condition = "IN" if in_upload else "NOT IN"
    rows = sc.query(db_path(depot),
                    "SELECT coalesce(max(size), 0) FROM content WHERE digest IS "
                    "NULL AND id %s (SELECT content_id FROM upload)" % condition)
    return rows[0][0]


def wait_garbage_freed(depot, timeout=40):
    """Wait until no unreferenced content is left; returns what is left."""
    sc.wait_for(lambda: sc.garbage_count(db_path(depot)) == (0, 0), timeout, 0.25)
    return sc.garbage_count(db_path(depot))


def push_image(client, name, tag, layers, how="monolithic"):
    """Push the layers, a config and a manifest; returns the manifest bytes."""
    config = ('{"name": "%s", "tag": "%s", "n": %d}'
              % (name, tag, len(layers))).encode()
    for blob in [config] + list(layers):
        answer = client.push_blob(name, blob, how)
        assert answer.status_code == 201, answer.text
        assert answer.headers["Docker-Content-Digest"] == sc.digest(blob)
    manifest = sc.manifest_for(config, layers)
    answer = client.put_manifest(name, tag, manifest)
    assert answer.status_code == 201, answer.text
    return manifest


def assert_image(client, name, tag, manifest):
    answer = client.get_manifest(name, tag)
    assert answer.status_code == 200, answer.text
    assert answer.content == manifest
    assert client.pull_verified(name, tag) == []


def assert_raw(depot, repo, path, data):
    answer = depot.request("GET", "/repository/%s/%s" % (repo, path))
    assert answer.status_code == 200, answer.text
    assert len(answer.content) == len(data)
    assert sc.digest(answer.content) == sc.digest(data)


def stop_and_check_store(depot, **options):
    """Stop Depot cleanly, then check integrity and consistency of its file."""
    depot.stop()
    assert sc.integrity(db_path(depot)) == "ok"
    assert sc.consistency_problems(db_path(depot), **options) == []


@pytest.fixture
def kdepot(tmp_path):
    """A Depot of the test's own that the test kills and restarts."""
    process = DepotProcess(tmp_path / "data").start()
    yield process
    process.stop()


# ---------------------------------------------------------------------------
# kill -9 in the middle of writes
# ---------------------------------------------------------------------------

def test_kill_during_monolithic_blob_push(kdepot):
    port, client = new_registry(kdepot, "mono")
    kept = sc.random_bytes(3 * MIB + 17)
    manifest = push_image(client, "team/app", "v1", [kept, b"small layer"])

    doomed = sc.random_bytes(24 * MIB)
    stream = sc.RawHTTP("127.0.0.1", port).begin(
        "POST", "/v2/team/app/blobs/uploads/?digest=" + sc.digest(doomed),
        {"Content-Type": "application/octet-stream"}, length=len(doomed))
    assert stream.send(doomed[:8 * MIB])
    assert sc.wait_for(lambda: unfinished_size(kdepot) >= 4 * MIB, 30), \
        "Depot never started storing the streamed body"
    kill_and_check(kdepot)
    stream.abort()

    client = sc.Registry("http://127.0.0.1:%d" % port)
    assert_image(client, "team/app", "v1", manifest)
    answer = client.call("HEAD", "/v2/team/app/blobs/" + sc.digest(doomed))
    assert answer.status_code == 404
    assert client.get_blob("team/app", sc.digest(doomed)).status_code == 404
    assert wait_garbage_freed(kdepot) == (0, 0)

    # The same blob pushed again after the crash is stored whole.
    answer = client.push_monolithic("team/app", doomed)
    assert answer.status_code == 201, answer.text
    assert client.check_blob("team/app", sc.digest(doomed)) == []
    stop_and_check_store(kdepot)


def push_first_chunk(client, data, first):
    """Open an upload of ``data`` and PATCH its first ``first`` bytes."""
    answer = client.start_upload("img")
    assert answer.status_code == 202, answer.text
    answer = client.call("PATCH", answer.headers["Location"],
                         data=data[:first], headers={
                             "Content-Range": "0-%d" % (first - 1),
                             "Content-Type": "application/octet-stream"})
    assert answer.status_code == 202, answer.text
    assert answer.headers["Range"] == "0-%d" % (first - 1)
    return answer.headers["Location"]


def resume_after_restart(port, location, data, least, most):
    """After a crash: the session is cleanly gone, or it holds between
    ``least`` and ``most`` bytes and the rest can be pushed."""
    client = sc.Registry("http://127.0.0.1:%d" % port)
    # Nothing of the unfinished upload is a blob.
    assert client.call("HEAD", "/v2/img/blobs/" + sc.digest(data)).status_code == 404
    status = client.call("GET", location)
    if status.status_code == 404:
        assert status.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        return
    assert status.status_code == 204, status.text
    held = int(status.headers["Range"].split("-")[1]) + 1
    assert least <= held <= most
    # Resume where the server says it is; if the stored prefix were wrong the
    # final digest check would refuse the blob.
    answer = client.call("PATCH", status.headers["Location"], data=data[held:],
                         headers={"Content-Range": "%d-%d" % (held, len(data) - 1),
                                  "Content-Type": "application/octet-stream"})
    assert answer.status_code == 202, answer.text
    answer = client.call("PUT", answer.headers["Location"],
                         params={"digest": sc.digest(data)})
    assert answer.status_code == 201, answer.text
    assert client.check_blob("img", sc.digest(data)) == []


def test_kill_between_chunks_of_an_upload(kdepot):
    port, client = new_registry(kdepot, "chunks")
    data = sc.random_bytes(5 * MIB + 123)
    first = 3 * MIB
    location = push_first_chunk(client, data, first)

    kill_and_check(kdepot)

    resume_after_restart(port, location, data, first, first)
    stop_and_check_store(kdepot)


def test_kill_during_a_patch(kdepot):
    port, client = new_registry(kdepot, "patch")
    data = sc.random_bytes(12 * MIB + 5)
    first = 2 * MIB
    location = push_first_chunk(client, data, first)

    # The second PATCH streams 10 MiB and is cut off by the kill after ~6.
    stream = sc.RawHTTP("127.0.0.1", port).begin(
        "PATCH", location, {"Content-Range": "%d-%d" % (first, len(data) - 1),
                            "Content-Type": "application/octet-stream"},
        length=len(data) - first)
    assert stream.send(data[first:first + 6 * MIB])
    assert sc.wait_for(
        lambda: unfinished_size(kdepot, in_upload=True) >= first + 3 * MIB, 30)
    kill_and_check(kdepot)
    stream.abort()

    resume_after_restart(port, location, data, first, first + 6 * MIB)
    stop_and_check_store(kdepot)


@pytest.mark.parametrize("send", ["half", "whole"])
def test_kill_during_manifest_put(kdepot, send):
    port, client = new_registry(kdepot, "mani")
    layers = [sc.random_bytes(200_000), sc.random_bytes(1000)]
    first = push_image(client, "app", "latest", layers)
    config = b'{"second": true}'
    assert client.push_monolithic("app", config).status_code == 201
    # A big manifest (many annotations) so that half of it is a real cut.
    second = sc.manifest_for(config, layers, annotations={
        "k%04d" % i: "v" * 200 for i in range(2000)})
    assert len(second) > 400_000
    outcomes = []
    for attempt in range(3):
        stream = sc.RawHTTP("127.0.0.1", port).begin(
            "PUT", "/v2/app/manifests/latest",
            {"Content-Type": sc.OCI_MANIFEST}, length=len(second))
        if send == "half":
            assert stream.send(second[:len(second) // 2])
            time.sleep(0.3)   # let the server read what was sent
        else:
            assert stream.send(second)
            time.sleep(0.01 * attempt)
        kill_and_check(kdepot)
        stream.abort()
        client = sc.Registry("http://127.0.0.1:%d" % port)
        answer = client.get_manifest("app", "latest")
        assert answer.status_code == 200, answer.text
        assert answer.content in (first, second)
        if send == "half":
            assert answer.content == first
            assert client.get_manifest("app", sc.digest(second)).status_code == 404
        by_digest = client.get_manifest("app", sc.digest(second))
        assert by_digest.status_code in (200, 404)
        if by_digest.status_code == 200:
            assert by_digest.content == second
        outcomes.append(answer.content == second)
        assert client.pull_verified("app", "latest") == []
    assert client.pull_verified("app", sc.digest(first)) == []
    stop_and_check_store(kdepot)


def test_kill_during_raw_put(kdepot):
    kdepot.create_repository("files", "raw")
    old = sc.random_bytes(6 * MIB + 1)
    answer = kdepot.request("PUT", "/repository/files/big.bin", data=old)
    assert answer.status_code == 201, answer.text
    small = b"a small file\n"
    assert kdepot.request("PUT", "/repository/files/dir/small.txt",
                          data=small).status_code == 201

    # Replace big.bin with 30 MiB and create new.bin, both cut off by the kill.
    replacement = sc.random_bytes(30 * MIB)
    streams = []
    for path in ("big.bin", "new.bin"):
        stream = sc.RawHTTP("127.0.0.1", kdepot.port, cert=kdepot.cert).begin(
            "PUT", "/repository/files/" + path,
            {"Content-Type": "application/octet-stream"}, length=len(replacement))
        assert stream.send(replacement[:9 * MIB])
        streams.append(stream)
    assert sc.wait_for(lambda: sc.query(
        db_path(kdepot), "SELECT count(*) FROM content WHERE digest IS NULL "
        "AND size >= ?", (4 * MIB,))[0][0] >= 2, 30)
    kill_and_check(kdepot)
    for stream in streams:
        stream.abort()

    assert_raw(kdepot, "files", "big.bin", old)
    assert_raw(kdepot, "files", "dir/small.txt", small)
    answer = kdepot.request("GET", "/repository/files/new.bin")
    assert answer.status_code == 404, answer.text
    listing = kdepot.request("GET", "/repository/files/")
    assert listing.status_code == 200
    assert "new.bin" not in listing.text
    assert wait_garbage_freed(kdepot) == (0, 0)
    stop_and_check_store(kdepot)


@pytest.mark.parametrize("when", ["before_answer", "after_answer"])
def test_kill_during_repository_delete(kdepot, when):
    # A docker repository holding a lot, a raw one holding a lot, and a
    # repository of each kind that is kept.
    port, big = new_registry(kdepot, "big")
    layers = [sc.random_bytes(MIB + i) for i in range(24)]
    big_manifest = push_image(big, "heavy", "v1", layers)
    tiny = [sc.random_bytes(2000) for _ in range(150)]
    for i, blob in enumerate(tiny):
        assert big.push_blob("many/n%d" % (i % 10), blob).status_code == 201
    kdepot.create_repository("bigraw", "raw")
    raw_files = {"d%d/f%d.bin" % (i % 7, i): sc.random_bytes(300_000)
                 for i in range(60)}
    for path, data in raw_files.items():
        answer = kdepot.request("PUT", "/repository/bigraw/" + path, data=data)
        assert answer.status_code == 201, answer.text
    keep_port, keep = new_registry(kdepot, "keep")
    keep_manifest = push_image(keep, "kept", "v1", [layers[0], b"kept layer"])
    kdepot.create_repository("keepraw", "raw")
    kept_file = layers[1]
    assert kdepot.request("PUT", "/repository/keepraw/kept.bin",
                          data=kept_file).status_code == 201
    chunks_before = sc.chunk_bytes(db_path(kdepot))[1]

    answers = {}

    def delete(name):
        try:
            answers[name] = kdepot.api("DELETE", "/repositories/" + name,
                                       timeout=60).status_code
        except requests.RequestException as error:
            answers[name] = error

    threads = [threading.Thread(target=delete, args=(name,))
               for name in ("big", "bigraw")]
    for thread in threads:
        thread.start()
    if when == "after_answer":
        for thread in threads:
            thread.join(60)
        assert answers == {"big": 204, "bigraw": 204}
        # Kill while the collector frees the chunks (or right after).
        sc.wait_for(lambda: sc.chunk_bytes(db_path(kdepot))[1] < chunks_before, 30,
                    0.02)
    else:
        time.sleep(0.05)
    kill_and_check(kdepot)
    for thread in threads:
        thread.join(60)

    # The kept repositories are whole.
    keep = sc.Registry("http://127.0.0.1:%d" % keep_port)
    assert_image(keep, "kept", "v1", keep_manifest)
    assert_raw(kdepot, "keepraw", "kept.bin", kept_file)

    # Each deleted repository is either gone entirely or there entirely; gone
    # for certain when its delete was acknowledged.
    shown = kdepot.api("GET", "/repositories/big")
    if shown.status_code == 404 or answers.get("big") == 204:
        assert shown.status_code == 404
        with pytest.raises(requests.ConnectionError):
            requests.get("http://127.0.0.1:%d/v2/" % port, timeout=5)
    else:
        assert shown.status_code == 200
        big = sc.Registry("http://127.0.0.1:%d" % port)
        assert_image(big, "heavy", "v1", big_manifest)
        for i, blob in enumerate(tiny):
            assert big.check_blob("many/n%d" % (i % 10), sc.digest(blob)) == []
    shown = kdepot.api("GET", "/repositories/bigraw")
    if answers.get("bigraw") == 204:
        assert shown.status_code == 404
    if shown.status_code == 200:
        for path, data in raw_files.items():
            assert_raw(kdepot, "bigraw", path, data)
    else:
        assert shown.status_code == 404
        assert kdepot.request("GET", "/repository/bigraw/d0/f0.bin").status_code == 404

    assert wait_garbage_freed(kdepot) == (0, 0)
    # A deleted repository's name and port can be had again, empty.
    if kdepot.api("GET", "/repositories/big").status_code == 404:
        kdepot.create_repository("big", "docker", config={"http_port": port})
        again = sc.Registry("http://127.0.0.1:%d" % port)
        assert again.get_manifest("heavy", "v1").status_code == 404
        assert again.get_blob("heavy", sc.digest(layers[2])).status_code == 404
    stop_and_check_store(kdepot)


# ---------------------------------------------------------------------------
# Clients that go away or crawl
# ---------------------------------------------------------------------------

def test_client_disconnects_mid_upload_and_mid_download(kdepot):
    port_a, a = new_registry(kdepot, "alpha")
    port_b, b = new_registry(kdepot, "beta")
    kdepot.create_repository("files", "raw")
    big = sc.random_bytes(16 * MIB)
    assert a.push_monolithic("img", big).status_code == 201
    manifest_b = push_image(b, "other", "v1", [b"beta layer"])
    rounds = 20   # more than the 16 worker threads of a server

    # Uploads that break off: monolithic, inside a PATCH, raw PUT.
    partial = sc.random_bytes(3 * MIB)
    sessions = []
    for i in range(rounds):
        kind = ("monolithic", "patch", "raw")[i % 3]
        if kind == "raw":
            stream = sc.RawHTTP("127.0.0.1", kdepot.port, cert=kdepot.cert)
            stream.begin("PUT", "/repository/files/partial%d.bin" % i,
                         length=8 * MIB)
        elif kind == "monolithic":
            stream = sc.RawHTTP("127.0.0.1", port_a).begin(
                "POST", "/v2/img/blobs/uploads/?digest=" + sc.digest(partial),
                length=8 * MIB)
        else:
            answer = a.start_upload("img")
            assert answer.status_code == 202
            sessions.append(answer.headers["Location"])
            stream = sc.RawHTTP("127.0.0.1", port_a).begin(
                "PATCH", answer.headers["Location"], length=8 * MIB)
        stream.send(partial[:(i % 3 + 1) * MIB])
        stream.abort(reset=bool(i % 2))

    # Downloads that break off after a little.
    for i in range(rounds):
        answer = requests.get("http://127.0.0.1:%d/v2/img/blobs/%s"
                              % (port_a, sc.digest(big)), stream=True, timeout=30)
        assert answer.status_code == 200
        answer.raw.read(64 * 1024)
        answer.close()
    for i in range(rounds):
        stream = sc.RawHTTP("127.0.0.1", port_a).begin(
            "GET", "/v2/img/blobs/" + sc.digest(big))
        stream.sock.recv(1000)
        stream.abort(reset=True)

    # Depot still serves every port.
    assert kdepot.api("GET", "/health").status_code == 200
    assert a.check_blob("img", sc.digest(big)) == []
    assert_image(b, "other", "v1", manifest_b)
    assert requests.get("http://127.0.0.1:%d/v2/" % port_b, timeout=10).status_code == 200
    answer = kdepot.request("PUT", "/repository/files/whole.bin", data=partial)
    assert answer.status_code == 201, answer.text
    # Nothing of the broken uploads is visible.
    assert a.call("HEAD", "/v2/img/blobs/" + sc.digest(partial)).status_code == 404
    for i in [i for i in range(rounds) if i % 3 == 2]:
        assert kdepot.request("GET", "/repository/files/partial%d.bin"
                              % i).status_code == 404
    # A session whose PATCH broke off can be resumed from what it holds.
    for location in sessions[:3]:
        status = a.call("GET", location)
        assert status.status_code == 204, status.text
        # "0-0" is an empty session (pieces are MiB-sized, never 1 byte).
        end = int(status.headers["Range"].split("-")[1])
        held = end + 1 if end else 0
        assert held <= 3 * MIB
        answer = a.call("PATCH", location, data=partial[held:],
                        headers={"Content-Range": "%d-%d" % (held, len(partial) - 1)})
        assert answer.status_code == 202, answer.text
        answer = a.call("PUT", answer.headers["Location"],
                        params={"digest": sc.digest(partial)})
        assert answer.status_code == 201, answer.text
    assert a.check_blob("img", sc.digest(partial)) == []

    # The broken downloads let go of the blob: deleting it frees its space.
    assert a.call("DELETE", "/v2/img/blobs/" + sc.digest(big)).status_code == 202
    for location in sessions[3:]:
        assert a.call("DELETE", location).status_code == 204
    assert wait_garbage_freed(kdepot) == (0, 0)
    assert sc.query(db_path(kdepot), "SELECT count(*) FROM content WHERE "
                    "digest = ?", (sc.digest(big),))[0][0] == 0
    stop_and_check_store(kdepot)


def test_slow_clients_do_not_block_others(kdepot):
    port, client = new_registry(kdepot, "slow")
    kdepot.create_repository("files", "raw")
    slow_blobs = [sc.random_bytes(256 * 1024) for _ in range(4)]
    streams = []
    for blob in slow_blobs:
        stream = sc.RawHTTP("127.0.0.1", port, timeout=120).begin(
            "POST", "/v2/slowimg/blobs/uploads/?digest=" + sc.digest(blob),
            length=len(blob))
        streams.append((stream, blob))
    raw_blob = sc.random_bytes(256 * 1024)
    raw_stream = sc.RawHTTP("127.0.0.1", kdepot.port, cert=kdepot.cert,
                            timeout=120).begin(
        "PUT", "/repository/files/slow.bin", length=len(raw_blob))
    streams.append((raw_stream, raw_blob))
    # A slow chunked PATCH into a session as well.
    answer = client.start_upload("slowimg")
    patch_blob = sc.random_bytes(256 * 1024)
    patch_stream = sc.RawHTTP("127.0.0.1", port, timeout=120).begin(
        "PATCH", answer.headers["Location"], chunked=True)
    patch_location = answer.headers["Location"]

    sent = [0]
    stop = threading.Event()

    def trickle():
        # 256 bytes every 100 ms to each stream while the others work, never
        # more than half of each body (at most 512 steps).
        while not stop.is_set() and sent[0] < 128 * 1024:
            for stream, blob in streams:
                stream.send(blob[sent[0]:sent[0] + 256])
            patch_stream.send(patch_blob[sent[0]:sent[0] + 256])
            sent[0] += 256
            stop.wait(0.1)

    thread = threading.Thread(target=trickle)
    thread.start()
    started = time.monotonic()
    try:
        fast = sc.Registry("http://127.0.0.1:%d" % port, timeout=20)
        for i in range(5):
            layer = sc.random_bytes(500_000)
            manifest = push_image(fast, "fast", "t%d" % i, [layer],
                                  how=("monolithic", "chunked", "put")[i % 3])
            assert_image(fast, "fast", "t%d" % i, manifest)
            answer = kdepot.request("PUT", "/repository/files/fast%d" % i,
                                    data=layer, timeout=20)
            assert answer.status_code == 201, answer.text
            assert_raw(kdepot, "files", "fast%d" % i, layer)
            assert kdepot.api("GET", "/repositories", timeout=20).status_code == 200
        print("fast requests took %.1f s beside the slow ones"
              % (time.monotonic() - started))
        assert sent[0] < 128 * 1024   # the slow bodies were still unfinished
    finally:
        stop.set()
        thread.join(30)
    # Let the slow clients finish: each upload lands whole.
    for stream, blob in streams:
        assert stream.send(blob[sent[0]:])
    for stream, blob in streams[:-1]:
        answer = stream.response()
        assert answer.status_code == 201, answer.text
        assert client.check_blob("slowimg", sc.digest(blob)) == []
    answer = raw_stream.response()
    assert answer.status_code == 201, answer.text
    assert_raw(kdepot, "files", "slow.bin", raw_blob)
    patch_stream.send(patch_blob[sent[0]:])
    patch_stream.finish_chunked()
    answer = patch_stream.response()
    assert answer.status_code == 202, answer.text
    answer = client.call("PUT", patch_location, params={"digest": sc.digest(patch_blob)})
    assert answer.status_code == 201, answer.text
    assert client.check_blob("slowimg", sc.digest(patch_blob)) == []
    for stream, _blob in streams:
        stream.close()
    patch_stream.close()


# ---------------------------------------------------------------------------
# Disk full
# ---------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB file system mounted for the test (tmpfs, else ext4 on a loop)."""
    mount = tmp_path / "small"
    mount.mkdir()
    attempts = [["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)]]
    image = tmp_path / "small.img"
    errors = []
    mounted = False
    for command in attempts:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            mounted = True
            break
        errors.append(result.stderr.strip())
    if not mounted:
        try:
            with open(image, "wb") as file:
                file.truncate(40 * MIB)
            for command in (["mkfs.ext4", "-q", "-F", str(image)],
                            ["mount", "-o", "loop", str(image), str(mount)]):
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode:
                    errors.append(result.stderr.strip())
                    break
            else:
                mounted = True
        except OSError as error:
            errors.append(str(error))
    if not mounted:
        reason = "cannot mount a small file system: %s" % "; ".join(errors)
        if os.environ.get("DEPOT_REQUIRE_CLIENTS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    yield mount
    for _ in range(20):
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
            break
        time.sleep(0.5)


def test_disk_full(small_disk):
    # The data directory is the small file system; the log lives beside it.
    depot = DepotProcess(small_disk)
    depot.start()
    try:
        run_disk_full(depot)
    finally:
        depot.stop()


def run_disk_full(depot):
    keep_port, keep = new_registry(depot, "keep")
    keep_manifest = push_image(keep, "kept", "v1", [sc.random_bytes(300_000)])
    depot.create_repository("keepraw", "raw")
    kept_file = sc.random_bytes(200_000)
    assert depot.request("PUT", "/repository/keepraw/kept.bin",
                         data=kept_file).status_code == 201
    fill_port, fill = new_registry(depot, "fill")
    depot.create_repository("rawfill", "raw")

    stored_blobs, stored_files, failures, problems = [], [], [], []
    for i in range(90):
        data = sc.random_bytes(MIB + 1000 * i)
        if i % 2 == 0:
            answer = sc.full_request(
                "127.0.0.1", fill_port, "POST",
                "/v2/fill/blobs/uploads/?digest=" + sc.digest(data), data,
                {"Content-Type": "application/octet-stream"})
            surface = "registry"
        else:
            answer = sc.full_request(
                "127.0.0.1", depot.port, "PUT", "/repository/rawfill/f%d.bin" % i,
                data, {"Content-Type": "application/octet-stream"}, cert=depot.cert)
            surface = "api"
        if answer.status_code == 201:
            (stored_blobs if surface == "registry" else stored_files).append((i, data))
            continue
        failures.append((surface, answer.status_code))
        if answer.status_code not in (507, 500):
            problems.append("%s push %d: %d %s" % (surface, i, answer.status_code,
                                                    answer.text[:200]))
        problem = sc.error_problem(answer, surface)
        if problem:
            problems.append("%s push %d: %s" % (surface, i, problem))
        if "database is locked" in answer.text:
            problems.append("%s push %d: %s" % (surface, i, answer.text))
        if sum(1 for s, _ in failures if s == surface) >= 4 and \
                len(failures) >= 8:
            break
    print("disk full: %d blobs and %d files stored, failures %r"
          % (len(stored_blobs), len(stored_files), failures))
    assert failures, "the disk never filled"
    assert {s for s, _ in failures} == {"registry", "api"}
    assert problems == []

    # Reads still work and everything stored verifies.
    assert depot.api("GET", "/health").status_code == 200
    assert_image(keep, "kept", "v1", keep_manifest)
    assert_raw(depot, "keepraw", "kept.bin", kept_file)
    for _i, data in stored_blobs:
        assert fill.check_blob("fill", sc.digest(data)) == []
    for i, data in stored_files:
        assert_raw(depot, "rawfill", "f%d.bin" % i, data)
    # A manifest push on the full disk fails cleanly too, or succeeds.
    answer = keep.put_manifest("kept", "full", keep_manifest)
    assert answer.status_code in (201, 507, 500), answer.text
    if answer.status_code != 201:
        assert sc.error_problem(answer, "registry") is None

    # A chunked upload on the full disk fails cleanly; its session stays
    # answerable.
    answer = fill.start_upload("fill")
    if answer.status_code == 202:
        location = answer.headers["Location"]
        answer = fill.call("PATCH", location, data=sc.random_bytes(3 * MIB),
                           headers={"Content-Range": "0-%d" % (3 * MIB - 1)})
        assert answer.status_code in (202, 507, 500), answer.text
        if answer.status_code != 202:
            assert sc.error_problem(answer, "registry") is None
        status = fill.call("GET", location)
        assert status.status_code in (204, 404), status.text
        fill.call("DELETE", location)
    else:
        assert answer.status_code in (507, 500), answer.text
        assert sc.error_problem(answer, "registry") is None

    # Depot restarts on the full disk and serves reads.
    depot.restart()
    assert sc.wait_registries(depot)
    fill = sc.Registry(fill.base)
    keep = sc.Registry(keep.base)
    assert_image(keep, "kept", "v1", keep_manifest)
    assert_raw(depot, "keepraw", "kept.bin", kept_file)

    # Free space: delete the raw repository and half of the blobs.
    answer = depot.api("DELETE", "/repositories/rawfill")
    assert answer.status_code == 204, answer.text
    for _i, data in stored_blobs[::2]:
        answer = fill.call("DELETE", "/v2/fill/blobs/" + sc.digest(data))
        assert answer.status_code == 202, answer.text

    # Pushes work again once the space is reused.
    def push_again():
        data = sc.random_bytes(MIB)
        answer = sc.full_request(
            "127.0.0.1", fill_port, "POST",
            "/v2/fill/blobs/uploads/?digest=" + sc.digest(data), data)
        return data if answer.status_code == 201 else None

    again = sc.wait_for(push_again, 60, 2)
    assert again, "pushes never worked again after space was freed"
    assert fill.check_blob("fill", sc.digest(again)) == []
    depot.create_repository("rawagain", "raw")
    answer = depot.request("PUT", "/repository/rawagain/x.bin", data=again)
    assert answer.status_code == 201, answer.text
    assert_raw(depot, "rawagain", "x.bin", again)
    # The freed space holds as much again as was freed, give or take.
    for i in range(12):
        data = sc.random_bytes(MIB)
        answer = fill.push_monolithic("fill", data)
        assert answer.status_code == 201, "push %d after freeing: %s" % (i, answer.text)
    for _i, data in stored_blobs[1::2]:
        assert fill.check_blob("fill", sc.digest(data)) == []
    assert_image(keep, "kept", "v1", keep_manifest)
    depot.stop()
    assert sc.integrity(db_path(depot)) == "ok"
    assert sc.consistency_problems(db_path(depot)) == []


def test_repository_deleted_while_an_upload_streams_into_it(kdepot):
    port, client = new_registry(kdepot, "doomed")
    data = sc.random_bytes(8 * MIB)
    stream = sc.RawHTTP("127.0.0.1", port).begin(
        "POST", "/v2/img/blobs/uploads/?digest=" + sc.digest(data), length=len(data))
    assert stream.send(data[:3 * MIB])
    assert sc.wait_for(lambda: unfinished_size(kdepot) >= 2 * MIB, 30)
    answer = kdepot.api("DELETE", "/repositories/doomed", timeout=60)
    assert answer.status_code == 204, answer.text
    # The client goes on sending; whatever it hears, it is not a success.
    stream.send(data[3 * MIB:])
    try:
        late = stream.response(timeout=30)
    except (OSError, ConnectionError):
        late = None
    stream.close()
    if late is not None:
        assert late.status_code != 201, "a blob was acknowledged into a deleted repository"
        assert late.status_code < 500, late.text
        assert sc.error_problem(late, "registry") is None
    # A new repository of the same name and port starts empty.
    kdepot.create_repository("doomed", "docker", config={"http_port": port})
    again = sc.Registry("http://127.0.0.1:%d" % port)
    assert again.call("HEAD", "/v2/img/blobs/" + sc.digest(data)).status_code == 404
    assert wait_garbage_freed(kdepot) == (0, 0)
    stop_and_check_store(kdepot)
