"""Load: many clients pushing and pulling at once.

16 clients push the same layers and manifests into one image name, 16 push
into names of their own (sharing one layer with everybody), others pull
whatever is there, and a few write raw files, all at the same time. Every
request must succeed or fail cleanly: never a 5xx, never "database is
locked", never a dropped connection; every acknowledged manifest must then
pull with all its blobs, digests verified, and the store must be consistent.
"""

import random
import threading
import time

import requests

try:
    from depot_tests import store_checks as sc
    from depot_tests.conftest import free_port
except ImportError:  # depot_tests is not a package: pytest put its folder on sys.path
    import store_checks as sc
    from conftest import free_port

MIB = sc.MIB
SAME, SOLO, PULLERS, RAW = 16, 16, 4, 8
HOW = ("monolithic", "chunked", "streamed", "put")


class Recorder:
    """Collects every answer that is not a clean success or a clean failure."""

    def __init__(self):
        self.lock = threading.Lock()
        self.problems = []
        self.count = 0

    def add(self, problem):
        with self.lock:
            self.problems.append(problem)

    def check(self, what, answer, ok=(200, 201, 202, 204), allowed=()):
        with self.lock:
            self.count += 1
        text = answer.text if hasattr(answer, "text") else ""
        if "database is locked" in text or "busy" in text.lower():
            self.add("%s: %d %s" % (what, answer.status_code, text[:300]))
        if answer.status_code >= 500:
            self.add("%s: %d %s" % (what, answer.status_code, text[:300]))
            return False
        if answer.status_code in ok:
            return True
        if answer.status_code not in allowed:
            self.add("%s: unexpected %d %s" % (what, answer.status_code, text[:300]))
        return False

    def guard(self, what, function, *args):
        """Run one client's work; a dropped connection or exception is a problem."""
        try:
            function(*args)
        except requests.RequestException as error:
            self.add("%s: %s: %s" % (what, type(error).__name__, error))
        except AssertionError as error:
            self.add("%s: %s" % (what, error))


def push_blobs(client, recorder, who, name, blobs, how):
    for blob in blobs:
        answer = client.push_blob(name, blob, how)
        if not recorder.check("%s push blob %s" % (who, how), answer):
            return False
        if answer.headers.get("Docker-Content-Digest") != sc.digest(blob):
            recorder.add("%s: 201 without the right Docker-Content-Digest: %r"
                         % (who, answer.headers.get("Docker-Content-Digest")))
    return True


def test_concurrent_pushes_and_pulls(fresh_depot):
    depot = fresh_depot
    port = free_port()
    depot.create_repository("load", "docker", config={"http_port": port})
    depot.create_repository("files", "raw")
    base = "http://127.0.0.1:%d" % port
    recorder = Recorder()
    acknowledged = []            # (name, reference, manifest bytes)
    ack_lock = threading.Lock()

    common = sc.random_bytes(int(1.5 * MIB))       # in every image
    shared_layers = [common, sc.random_bytes(300_000), sc.random_bytes(10_000)]
    shared_config = b'{"shared": 1}'
    shared_manifest = sc.manifest_for(shared_config, shared_layers)
    moved_config = b'{"shared": 2}'
    moved_manifest = sc.manifest_for(moved_config, shared_layers[::-1])

    def ack(name, reference, manifest):
        with ack_lock:
            acknowledged.append((name, reference, manifest))

    def same_name_client(i):
        client = sc.Registry(base)
        how = HOW[i % len(HOW)]
        who = "same-%d" % i
        if not push_blobs(client, recorder, who, "shared/app",
                          [shared_config] + shared_layers, how):
            return
        for tag in ("latest", "c%d" % i):
            answer = client.put_manifest("shared/app", tag, shared_manifest)
            if recorder.check(who + " put manifest " + tag, answer):
                ack("shared/app", tag, shared_manifest)
        # Half of them move latest to another manifest of the same layers.
        if i % 2 and push_blobs(client, recorder, who, "shared/app",
                                [moved_config], how):
            answer = client.put_manifest("shared/app", "latest", moved_manifest)
            if recorder.check(who + " move latest", answer):
                ack("shared/app", sc.digest(moved_manifest), moved_manifest)
        client.close()

    def solo_client(i):
        client = sc.Registry(base)
        who = "solo-%d" % i
        name = "solo/n%d" % i
        for round_ in range(2):
            how = HOW[(i + round_) % len(HOW)]
            own = sc.random_bytes(400_000 + i * 1000 + round_)
            config = ('{"solo": %d, "round": %d}' % (i, round_)).encode()
            if not push_blobs(client, recorder, who, name, [config, common, own], how):
                return
            manifest = sc.manifest_for(config, [common, own])
            tag = "v%d" % round_
            answer = client.put_manifest(name, tag, manifest)
            if recorder.check(who + " put manifest", answer):
                ack(name, tag, manifest)
        client.close()

    pushers_done = threading.Event()
    pulls = [0]

    def puller(i):
        client = sc.Registry(base)
        rng = random.Random(i)
        who = "puller-%d" % i
        deadline = time.monotonic() + 120
        for _ in range(400):
            if pushers_done.is_set() or time.monotonic() > deadline:
                break
            answer = client.call("GET", "/v2/_catalog")
            if not recorder.check(who + " catalog", answer):
                continue
            names = answer.json()["repositories"]
            if not names:
                time.sleep(0.05)
                continue
            name = rng.choice(names)
            answer = client.call("GET", "/v2/%s/tags/list" % name)
            if not recorder.check(who + " tags", answer, allowed=(404,)):
                continue
            tags = answer.json()["tags"] or []
            if not tags:
                continue
            tag = rng.choice(tags)
            for problem in client.pull_verified(name, tag):
                recorder.add("%s pull %s:%s: %s" % (who, name, tag, problem))
            with ack_lock:
                pulls[0] += 1
        client.close()

    raw_bodies = [sc.random_bytes(700_000 + i) for i in range(RAW)]

    def raw_client(i):
        session = requests.Session()
        for round_ in range(3):
            for path in ("same.bin", "own/%d.bin" % i):
                answer = session.put(depot.url + "/repository/files/" + path,
                                     data=raw_bodies[i], verify=depot.cert,
                                     timeout=60)
                recorder.check("raw-%d put %s" % (i, path), answer)
            answer = session.get(depot.url + "/repository/files/same.bin",
                                 verify=depot.cert, timeout=60)
            if recorder.check("raw-%d get" % i, answer):
                if sc.digest(answer.content) not in {sc.digest(b) for b in raw_bodies}:
                    recorder.add("raw-%d: same.bin is none of the bodies put "
                                 "(%d bytes)" % (i, len(answer.content)))
        session.close()

    workers = [threading.Thread(target=recorder.guard,
                                args=("same-%d" % i, same_name_client, i))
               for i in range(SAME)]
    workers += [threading.Thread(target=recorder.guard,
                                 args=("solo-%d" % i, solo_client, i))
                for i in range(SOLO)]
    workers += [threading.Thread(target=recorder.guard,
                                 args=("raw-%d" % i, raw_client, i))
                for i in range(RAW)]
    pullers = [threading.Thread(target=recorder.guard,
                                args=("puller-%d" % i, puller, i))
               for i in range(PULLERS)]
    started = time.monotonic()
    for thread in pullers + workers:
        thread.start()
    for thread in workers:
        thread.join(180)
    pushers_done.set()
    for thread in pullers:
        thread.join(60)
    elapsed = time.monotonic() - started
    print("load: %d requests checked, %d pulls, %d manifests acknowledged, %.1f s"
          % (recorder.count, pulls[0], len(acknowledged), elapsed))
    assert not any(thread.is_alive() for thread in workers + pullers), \
        "clients still hanging after their time"
    assert recorder.problems == [], "\n".join(recorder.problems[:40])

    # Everything acknowledged pulls whole.
    client = sc.Registry(base)
    problems = []
    for name, reference, manifest in acknowledged:
        by_digest = client.get_manifest(name, sc.digest(manifest))
        if by_digest.status_code != 200 or by_digest.content != manifest:
            problems.append("%s@%s: %d" % (name, sc.digest(manifest),
                                           by_digest.status_code))
        problems += client.pull_verified(name, sc.digest(manifest))
    latest = client.get_manifest("shared/app", "latest")
    assert latest.status_code == 200
    assert latest.content in (shared_manifest, moved_manifest)
    for i in range(SAME):
        answer = client.get_manifest("shared/app", "c%d" % i)
        assert answer.status_code == 200 and answer.content == shared_manifest
    for i in range(SOLO):
        for tag in ("v0", "v1"):
            problems += client.pull_verified("solo/n%d" % i, tag)
    assert problems == []
    tags = client.call("GET", "/v2/shared/app/tags/list").json()["tags"]
    assert sorted(tags) == sorted(["latest"] + ["c%d" % i for i in range(SAME)])
    # Content is stored once however many pushed it.
    db = str(depot.data_dir / "depot.db")
    copies = sc.query(db, "SELECT count(*) FROM content WHERE digest = ?",
                      (sc.digest(common),))[0][0]
    assert copies == 1
    log = depot.log()
    assert "database is locked" not in log
    assert "Traceback" not in log, log[log.index("Traceback"):][:3000]
    depot.stop()
    assert sc.integrity(db) == "ok"
    assert sc.consistency_problems(db) == []
