"""Soak: pushes, pulls, deletes, raw files and restarts (clean and kill -9),
mixed for a bounded time, then a full check of what was acknowledged and of
the store itself.

``DEPOT_SOAK_SECONDS`` sets the duration (default 60). Workers keep a model
of what Depot acknowledged. A request cut off by a restart leaves its item
*uncertain*: the next time the worker can reach Depot it reads the item back
and accepts either the state before or the state after that request, never
anything else. At the end every tag must resolve to the bytes last
acknowledged, every manifest must pull with all its blobs, every raw file
must match, deleted things must stay deleted, and the database (read with
Depot stopped) must pass integrity and consistency checks.
"""

import os
import random
import threading
import time

import requests

try:
    from depot_tests import store_checks as sc
    from depot_tests.conftest import DepotProcess, free_port
except ImportError:  # depot_tests is not a package: pytest put its folder on sys.path
    import store_checks as sc
    from conftest import DepotProcess, free_port

MIB = sc.MIB
SECONDS = float(os.environ.get("DEPOT_SOAK_SECONDS", "60"))
WORKERS = 3
HOW = ("monolithic", "chunked", "streamed", "put")
ABSENT = None
#: What a client sees when Depot is killed or restarted under it, a response
#: body cut in the middle included. (A body that Depot itself failed to send
#: is logged by Depot; the end of the test checks the log for that.)
DOWN = (requests.ConnectionError, requests.Timeout,
        requests.exceptions.ChunkedEncodingError)


class Worker:
    """One client with its own image name and raw directory, and its model."""

    def __init__(self, number, registry_base, depot, layers, seed):
        self.number = number
        self.name = "w%d/app" % number
        self.registry_base, self.depot = registry_base, depot
        self.layers = layers
        self.rng = random.Random(seed)
        self.tags = {}            # tag -> manifest bytes
        self.manifests = {}       # digest -> bytes (present)
        self.deleted_manifests = set()
        self.files = {}           # path -> bytes (present)
        self.deleted_files = set()
        self.blobs = {}           # standalone digest -> bytes (present)
        self.deleted_blobs = set()
        self.uncertain = []       # (kind, key, allowed states)
        self.problems = []
        self.counter = 0
        self.ops = 0
        self.client = sc.Registry(registry_base, timeout=30)
        self.http = requests.Session()

    # Plumbing ------------------------------------------------------------

    def answer_ok(self, what, answer, ok=(200, 201, 202, 204)):
        if answer.status_code in ok:
            return True
        self.problems.append("%s: %d %s" % (what, answer.status_code,
                                            answer.text[:300]))
        return False

    def raw(self, method, path, **kwargs):
        kwargs.setdefault("timeout", 30)
        return self.http.request(method, self.depot.url + "/repository/soakraw/"
                                 + path, verify=self.depot.cert, **kwargs)

    def reconnect(self):
        self.client.close()
        self.client = sc.Registry(self.registry_base, timeout=30)
        self.http.close()
        self.http = requests.Session()

    # Reading an item back --------------------------------------------------

    def read_tag(self, tag):
        answer = self.client.get_manifest(self.name, tag)
        if answer.status_code == 404:
            return ABSENT
        self.answer_ok("read tag %s" % tag, answer)
        return answer.content

    def read_manifest(self, manifest_digest):
        answer = self.client.get_manifest(self.name, manifest_digest)
        if answer.status_code == 404:
            return ABSENT
        self.answer_ok("read manifest", answer)
        return answer.content

    def read_file(self, path):
        answer = self.raw("GET", path)
        if answer.status_code == 404:
            return ABSENT
        self.answer_ok("read file %s" % path, answer)
        return answer.content

    def read_blob(self, blob_digest):
        answer = self.client.get_blob(self.name, blob_digest)
        if answer.status_code == 404:
            return ABSENT
        self.answer_ok("read blob", answer)
        return answer.content

    def resolve(self):
        """Read back every uncertain item; raises DOWN while Depot is away."""
        while self.uncertain:
            kind, key, allowed = self.uncertain[0]
            actual = {"tag": self.read_tag, "manifest": self.read_manifest,
                      "file": self.read_file, "blob": self.read_blob}[kind](key)
            if actual not in allowed:
                self.problems.append(
                    "%s %s of worker %d after an interrupted request: got %s, "
                    "expected one of %s" % (
                        kind, key, self.number, describe(actual),
                        [describe(a) for a in allowed]))
            self.apply(kind, key, actual)
            self.uncertain.pop(0)

    def apply(self, kind, key, value):
        present, gone = {"tag": (self.tags, None),
                         "manifest": (self.manifests, self.deleted_manifests),
                         "file": (self.files, self.deleted_files),
                         "blob": (self.blobs, self.deleted_blobs)}[kind]
        if value is ABSENT:
            present.pop(key, None)
            if gone is not None:
                gone.add(key)
        else:
            present[key] = value
            if gone is not None:
                gone.discard(key)

    # Operations ------------------------------------------------------------

    def step(self):
        self.ops += 1
        choice = self.rng.random()
        if choice < 0.30:
            self.push_image()
        elif choice < 0.50:
            self.pull()
        elif choice < 0.55:
            self.delete_tag()
        elif choice < 0.60:
            self.delete_manifest()
        elif choice < 0.75:
            self.put_file()
        elif choice < 0.85:
            self.get_file()
        elif choice < 0.90:
            self.delete_file()
        else:
            self.standalone_blob()

    def push_image(self):
        self.counter += 1
        tag = "t%d" % self.rng.randrange(4)
        config = ('{"worker": %d, "n": %d}' % (self.number, self.counter)).encode()
        layers = self.rng.sample(self.layers, self.rng.randint(1, 3))
        manifest = sc.manifest_for(config, layers)
        manifest_digest = sc.digest(manifest)
        before_tag = self.tags.get(tag)
        try:
            for blob in [config] + layers:
                how = self.rng.choice(HOW)
                answer = self.client.push_blob(self.name, blob, how)
                if not self.answer_ok("push blob (%s)" % how, answer, (201,)):
                    return
            answer = self.client.put_manifest(self.name, tag, manifest)
        except DOWN:
            self.uncertain.append(("tag", tag, [before_tag, manifest]))
            self.uncertain.append(("manifest", manifest_digest,
                                   [ABSENT, manifest]))
            raise
        if self.answer_ok("put manifest", answer, (201,)):
            self.tags[tag] = manifest
            self.manifests[manifest_digest] = manifest
            self.deleted_manifests.discard(manifest_digest)

    def pull(self):
        if not self.tags:
            return
        tag = self.rng.choice(sorted(self.tags))
        answer = self.client.get_manifest(self.name, tag)
        if not self.answer_ok("pull %s" % tag, answer, (200,)):
            return
        if answer.content != self.tags[tag]:
            self.problems.append("tag %s of %s: served %s, acknowledged %s"
                                 % (tag, self.name, describe(answer.content),
                                    describe(self.tags[tag])))
            return
        for blob_digest in sc.referenced_blobs(answer.content):
            self.problems += [p for p in self.client.check_blob(self.name, blob_digest)]

    def delete_tag(self):
        if not self.tags:
            return
        tag = self.rng.choice(sorted(self.tags))
        try:
            answer = self.client.call("DELETE", "/v2/%s/manifests/%s"
                                      % (self.name, tag))
        except DOWN:
            self.uncertain.append(("tag", tag, [self.tags[tag], ABSENT]))
            raise
        if self.answer_ok("delete tag", answer, (202,)):
            del self.tags[tag]

    def delete_manifest(self):
        if not self.manifests:
            return
        manifest_digest = self.rng.choice(sorted(self.manifests))
        tags = [tag for tag, data in self.tags.items()
                if sc.digest(data) == manifest_digest]
        try:
            answer = self.client.call("DELETE", "/v2/%s/manifests/%s"
                                      % (self.name, manifest_digest))
        except DOWN:
            self.uncertain.append(("manifest", manifest_digest,
                                   [self.manifests[manifest_digest], ABSENT]))
            for tag in tags:
                self.uncertain.append(("tag", tag, [self.tags[tag], ABSENT]))
            raise
        if self.answer_ok("delete manifest", answer, (202,)):
            del self.manifests[manifest_digest]
            self.deleted_manifests.add(manifest_digest)
            for tag in tags:
                del self.tags[tag]

    def put_file(self):
        path = "w%d/d%d/f%d.bin" % (self.number, self.rng.randrange(3),
                                   self.rng.randrange(6))
        if self.rng.random() < 0.3:
            data = self.rng.choice(self.layers)      # shared with the registry
        else:
            data = self.rng.randbytes(self.rng.choice((10, 5000, 300_000, 1_300_000)))
        before = self.files.get(path)
        try:
            answer = self.raw("PUT", path, data=data)
        except DOWN:
            self.uncertain.append(("file", path, [before, data]))
            raise
        if self.answer_ok("put file", answer, (200, 201)):
            expected = 200 if before is not None else 201
            if answer.status_code != expected:
                self.problems.append("put file %s: %d, expected %d" % (
                    path, answer.status_code, expected))
            self.files[path] = data
            self.deleted_files.discard(path)

    def get_file(self):
        if not self.files:
            return
        path = self.rng.choice(sorted(self.files))
        actual = self.read_file(path)
        if actual != self.files[path]:
            self.problems.append("file %s: served %s, acknowledged %s" % (
                path, describe(actual), describe(self.files[path])))

    def delete_file(self):
        if not self.files:
            return
        path = self.rng.choice(sorted(self.files))
        try:
            answer = self.raw("DELETE", path)
        except DOWN:
            self.uncertain.append(("file", path, [self.files[path], ABSENT]))
            raise
        if self.answer_ok("delete file", answer, (204,)):
            del self.files[path]
            self.deleted_files.add(path)

    def standalone_blob(self):
        if self.blobs and self.rng.random() < 0.5:
            blob_digest = self.rng.choice(sorted(self.blobs))
            try:
                answer = self.client.call("DELETE", "/v2/%s/blobs/%s"
                                          % (self.name, blob_digest))
            except DOWN:
                self.uncertain.append(("blob", blob_digest,
                                       [self.blobs[blob_digest], ABSENT]))
                raise
            if self.answer_ok("delete blob", answer, (202,)):
                del self.blobs[blob_digest]
                self.deleted_blobs.add(blob_digest)
            return
        data = self.rng.randbytes(self.rng.choice((100, 200_000, 1_100_000)))
        how = self.rng.choice(HOW)
        try:
            answer = self.client.push_blob(self.name, data, how)
        except DOWN:
            self.uncertain.append(("blob", sc.digest(data), [ABSENT, data]))
            raise
        if self.answer_ok("push standalone blob (%s)" % how, answer, (201,)):
            self.blobs[sc.digest(data)] = data
            self.deleted_blobs.discard(sc.digest(data))

    # Final check -------------------------------------------------------------

    def verify_all(self):
        problems = []
        for tag, data in sorted(self.tags.items()):
            actual = self.read_tag(tag)
            if actual != data:
                problems.append("tag %s:%s is %s, acknowledged %s" % (
                    self.name, tag, describe(actual), describe(data)))
                continue
            problems += self.client.pull_verified(self.name, tag)
        answer = self.client.call("GET", "/v2/%s/tags/list" % self.name)
        if answer.status_code == 200:
            listed = sorted(answer.json()["tags"] or [])
        else:
            listed = []
        if listed != sorted(self.tags):
            problems.append("tags of %s: listed %s, acknowledged %s"
                            % (self.name, listed, sorted(self.tags)))
        for manifest_digest, data in sorted(self.manifests.items()):
            if self.read_manifest(manifest_digest) != data:
                problems.append("manifest %s of %s is missing or different"
                                % (manifest_digest, self.name))
            else:
                problems += self.client.pull_verified(self.name, manifest_digest)
        for manifest_digest in sorted(self.deleted_manifests):
            if self.read_manifest(manifest_digest) is not ABSENT:
                problems.append("deleted manifest %s of %s is back"
                                % (manifest_digest, self.name))
        for path, data in sorted(self.files.items()):
            actual = self.read_file(path)
            if actual != data:
                problems.append("file %s is %s, acknowledged %s"
                                % (path, describe(actual), describe(data)))
        for path in sorted(self.deleted_files):
            if self.read_file(path) is not ABSENT:
                problems.append("deleted file %s is back" % path)
        for blob_digest, data in sorted(self.blobs.items()):
            if self.read_blob(blob_digest) != data:
                problems.append("blob %s of %s is missing or different"
                                % (blob_digest, self.name))
        for blob_digest in sorted(self.deleted_blobs):
            if self.read_blob(blob_digest) is not ABSENT:
                problems.append("deleted blob %s of %s is back"
                                % (blob_digest, self.name))
        return problems


def describe(value):
    if value is ABSENT:
        return "absent"
    return "%d bytes %s" % (len(value), sc.digest(value)[:19])


def run_worker(worker, stop, down):
    deadline = time.monotonic() + SECONDS + 120
    while not stop.is_set() and time.monotonic() < deadline and worker.ops < 100_000:
        if down.is_set():
            time.sleep(0.05)
        try:
            worker.resolve()
            worker.step()
        except DOWN:
            worker.reconnect()
            time.sleep(0.2)
        except Exception as error:   # a test bug or a protocol surprise
            worker.problems.append("worker %d: %s: %s"
                                   % (worker.number, type(error).__name__, error))
            time.sleep(0.2)


def churn(depot, number, problems):
    """Create a docker repository, push into it, pull, delete it."""
    name = "churn%d" % number
    port = free_port()
    answer = depot.api("POST", "/repositories", json={
        "name": name, "type": "docker", "config": {"http_port": port}})
    if answer.status_code != 201:
        problems.append("create %s: %d %s" % (name, answer.status_code, answer.text))
        return
    client = sc.Registry("http://127.0.0.1:%d" % port)
    layers = [os.urandom(200_000), os.urandom(MIB + number)]
    config = b'{"churn": %d}' % number
    for blob in [config] + layers:
        answer = client.push_blob("img", blob, HOW[number % len(HOW)])
        if answer.status_code != 201:
            problems.append("churn push: %d %s" % (answer.status_code, answer.text))
    manifest = sc.manifest_for(config, layers)
    answer = client.put_manifest("img", "v1", manifest)
    if answer.status_code != 201:
        problems.append("churn manifest: %d %s" % (answer.status_code, answer.text))
    problems += client.pull_verified("img", "v1")
    client.close()
    answer = depot.api("DELETE", "/repositories/" + name)
    if answer.status_code != 204:
        problems.append("delete %s: %d %s" % (name, answer.status_code, answer.text))


def test_soak(tmp_path):
    depot = DepotProcess(tmp_path / "data").start()
    db = str(depot.data_dir / "depot.db")
    try:
        port = free_port()
        depot.create_repository("soak", "docker", config={"http_port": port})
        depot.create_repository("soakraw", "raw")
        rng = random.Random(int(os.environ.get("DEPOT_SOAK_SEED", "1")))
        layers = [rng.randbytes(size) for size in
                  (5_000, 100_000, 700_000, 1_200_000, 2_500_000, 30_000)]
        base = "http://127.0.0.1:%d" % port
        workers = [Worker(i, base, depot, layers, rng.random()) for i in range(WORKERS)]
        stop, down = threading.Event(), threading.Event()
        threads = [threading.Thread(target=run_worker, args=(w, stop, down))
                   for w in workers]
        main_problems = []
        restarts = kills = churns = 0
        started = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            while time.monotonic() - started < SECONDS and restarts + kills < 1000:
                time.sleep(rng.uniform(3, 8))
                if time.monotonic() - started >= SECONDS:
                    break
                action = rng.random()
                if action < 0.4:
                    depot.kill()
                    kills += 1
                    result = sc.integrity(db)
                    if result != "ok":
                        main_problems.append("integrity after kill %d: %s"
                                             % (kills, result))
                    depot.start()
                    sc.wait_registries(depot)
                elif action < 0.7:
                    depot.restart()
                    sc.wait_registries(depot)
                    restarts += 1
                else:
                    try:
                        churn(depot, churns, main_problems)
                    except DOWN as error:
                        main_problems.append("churn: %s" % error)
                    churns += 1
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
        ops = sum(w.ops for w in workers)
        print("soak: %.0f s, %d operations, %d kills, %d restarts, %d churns"
              % (time.monotonic() - started, ops, kills, restarts, churns))

        # Everything acknowledged is there; deleted things stay deleted.
        problems = list(main_problems)
        for worker in workers:
            worker.reconnect()
            worker.resolve()
            problems += worker.problems
            problems += worker.verify_all()
        assert problems == [], "\n".join(problems[:60])
        catalog = sc.Registry(base).call("GET", "/v2/_catalog").json()
        assert set(catalog["repositories"]) <= {w.name for w in workers}

        # Garbage is freed, then the file is sound and consistent.
        sc.wait_for(lambda: sc.garbage_count(db) == (0, 0), 60, 0.5)
        assert sc.garbage_count(db) == (0, 0)
        churned = depot.api("GET", "/repositories").json()
        names = [r["name"] for r in (churned if isinstance(churned, list)
                                     else churned.get("repositories", []))]
        assert not [n for n in names if n.startswith("churn")], names
        log = depot.log()
        assert "database is locked" not in log
        assert "sending stored content failed" not in log
    finally:
        depot.stop()
    assert sc.integrity(db) == "ok"
    assert sc.consistency_problems(db, rehash_limit=1000) == []
