"""Real registry clients against a Depot docker repository.

Each test pushes with a real client (docker, containerd's ctr, podman,
buildah, skopeo, oras-py), pulls back and compares by digest.  Images are
built locally (see ``clients.py``); nothing comes from the internet.  A missing
client skips the test, or fails it when ``DEPOT_REQUIRE_CLIENTS=1`` (CI).

The registry under test is conftest's ``docker_repo``: ``.host`` is
``127.0.0.1:PORT`` of a plain-HTTP registry, ``.url`` its ``http://`` URL, and
``.depot`` the Depot serving it (for its management API).  One dockerd, one
containers-storage and the built images are shared by the whole session.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time

import pytest
import requests

try:
    from depot_tests import clients
except ImportError:  # depot_tests is not a package: pytest put its folder on sys.path
    import clients


# --------------------------------------------------------------------------
# Session-wide tools and images
# --------------------------------------------------------------------------

class Images:
    """Locally built test images, each built once per session on first use."""

    def __init__(self, root):
        self.root = root
        self.layout = clients.Layout(root / "layout")

    @functools.cached_property
    def small(self):
        return clients.build_small_image(self.layout, "small")

    @functools.cached_property
    def other(self):
        return clients.build_small_image(self.layout, "other", label="other")

    @functools.cached_property
    def multi_oci(self):
        return clients.build_multiarch_image(self.layout, "multi-oci")

    @functools.cached_property
    def multi_docker(self):
        return clients.build_multiarch_image(self.layout, "multi-docker", docker_media=True)

    @functools.cached_property
    def many(self):
        return clients.build_many_layer_image(self.layout, "many", count=20)

    @functools.cached_property
    def repeated(self):
        """Layers that repeat and layers that are empty tars, as builds produce them."""
        same = {"etc/same.txt": b"the same layer twice\n"}
        return clients.build_image(self.layout, "repeated",
                                   [same, {}, same, {"app/main": b"main\n"}, {}])

    @functools.cached_property
    def big(self):
        return clients.build_big_layer_image(self.layout, "big", size_mb=300)

    def archive(self, containers, image):
        """A ``docker load`` tarball of ``image``, tagged ``depot-test/<ref>:1``."""
        name = f"depot-test/{image.ref}:1"
        path = self.root / f"{image.ref}.docker.tar"
        return clients.docker_archive(containers, image, path, name), name


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return Images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def containers(tmp_path_factory):
    """podman, buildah and skopeo sharing one private storage and config."""
    return clients.Containers(tmp_path_factory.mktemp("containers"))


@pytest.fixture
def skopeo(containers):
    clients.require("skopeo")
    return containers


@pytest.fixture(scope="session")
def _dockerd_session():
    if os.geteuid() != 0 or not (shutil.which("dockerd") and
                                 shutil.which("docker")):
        yield None
        return
    with clients.Dockerd() as daemon:
        yield daemon


@pytest.fixture
def dockerd(_dockerd_session, skopeo):
    """A private Docker engine (one per session) that each test leaves empty."""
    clients.require("root", "dockerd", "docker")
    yield _dockerd_session
    _dockerd_session.remove_all_images()


def ref(repo, image_name, tag=None):
    """``host:port/image_name[:tag]`` inside the docker repository under test."""
    return f"{repo.host}/{image_name}" + (f":{tag}" if tag else "")


def docker_load_and_tag(dockerd, images, containers, image, target):
    """``docker load`` a built image and ``docker tag`` it as ``target``."""
    tarball, loaded = images.archive(containers, image)
    dockerd.load(tarball)
    dockerd.docker("tag", loaded, target)
    return loaded


def docker_push_then_pull(dockerd, images, containers, image, target):
    """Load, push, forget the image entirely, pull it back; return the pushed digest."""
    loaded = docker_load_and_tag(dockerd, images, containers, image, target)
    digest = clients.pushed_digest(dockerd.push(target))

    dockerd.remove_image(loaded, target)
    assert not dockerd.image_exists(image.config_digest), "image still there before pull"

    dockerd.pull(target)
    pulled = dockerd.image_inspect(target)
    assert pulled["Id"] == image.config_digest
    repo_name = target.rsplit(":", 1)[0]
    assert f"{repo_name}@{digest}" in pulled["RepoDigests"]
    return digest, pulled


def assert_dir_copy_matches(path, image):
    """A ``skopeo copy [--all] ... dir:path`` holds exactly ``image``'s bytes."""
    assert (path / "manifest.json").read_bytes() == image.raw
    for child in image.children.values():
        hexpart = child.digest.split(":")[1]
        assert (path / f"{hexpart}.manifest.json").read_bytes() == child.raw
    for img in [image, *image.children.values()]:
        for blob in [img.config_digest, *img.layer_digests]:
            if blob:
                assert clients.file_digest(path / blob.split(":")[1]) == blob


# --------------------------------------------------------------------------
# docker
# --------------------------------------------------------------------------

def test_docker_push_pull_small_image(dockerd, images, containers, docker_repo):
    target = ref(docker_repo, "docker/small", "1")

    digest, pulled = docker_push_then_pull(dockerd, images, containers, images.small, target)

    assert clients.registry_manifest_digest(docker_repo.url, "docker/small", "1") == digest
    raw = containers.inspect_raw(f"docker://{target}")
    assert clients.sha256_digest(raw) == digest
    assert pulled["Architecture"] == "amd64"

    # And by digest, with nothing left locally.
    dockerd.remove_image(target)
    by_digest = f"{ref(docker_repo, 'docker/small')}@{digest}"
    dockerd.pull(by_digest)
    assert dockerd.image_inspect(by_digest)["Id"] == images.small.config_digest


def test_docker_pull_missing_tag_says_manifest_unknown(dockerd, docker_repo):
    failed = dockerd.docker("pull", ref(docker_repo, "docker/nothing", "missing"), check=False)

    assert failed.returncode != 0
    assert "manifest unknown" in failed.stderr.lower() or "not found" in failed.stderr, \
        failed.stderr
    assert "invalid character" not in failed.stderr, failed.stderr


@pytest.mark.parametrize("kind", ["oci-index", "docker-manifest-list"])
def test_docker_pull_multiarch_per_platform(dockerd, images, containers, docker_repo, kind):
    image = images.multi_oci if kind == "oci-index" else images.multi_docker
    name = f"multi/{kind}"
    target = ref(docker_repo, name, "1")
    containers.copy(image.source, f"docker://{target}", "--all")

    for platform in ("linux/arm64", "linux/amd64"):
        child = image.children[platform]
        dockerd.pull(target, platform=platform)

        pulled = dockerd.image_inspect(target)
        assert pulled["Id"] == child.config_digest, platform
        assert pulled["Architecture"] == platform.split("/")[1]
        assert f"{ref(docker_repo, name)}@{image.digest}" in pulled["RepoDigests"]

        dockerd.remove_image(target)


def test_docker_push_same_layers_to_second_name_mounts(dockerd, images, containers,
                                                        docker_repo):
    first, second = ref(docker_repo, "app/first", "1"), ref(docker_repo, "app/second", "1")
    loaded = docker_load_and_tag(dockerd, images, containers, images.many, first)
    first_digest = clients.pushed_digest(dockerd.push(first))

    dockerd.docker("tag", first, second)
    out = dockerd.push(second)

    # docker remembers that it pushed these layers to app/first and mounts them.
    layer_lines = [ln for ln in out.splitlines() if ln[:12].isalnum() and ": " in ln
                   and "digest:" not in ln and "Preparing" not in ln and "Waiting" not in ln]
    assert layer_lines and all("Mounted from app/first" in ln or "Layer already exists" in ln
                               for ln in layer_lines), out
    assert clients.pushed_digest(out) == first_digest

    dockerd.remove_image(loaded, first, second)
    for target in (first, second):
        dockerd.pull(target)
        assert dockerd.image_inspect(target)["Id"] == images.many.config_digest
    assert (clients.registry_manifest_digest(docker_repo.url, "app/first", "1")
            == clients.registry_manifest_digest(docker_repo.url, "app/second", "1"))
    dockerd.remove_image(first, second)


def test_docker_nested_image_name(dockerd, images, containers, docker_repo):
    target = ref(docker_repo, "team/app/api", "v1")

    digest, _ = docker_push_then_pull(dockerd, images, containers, images.small, target)

    assert containers.list_tags(f"docker://{ref(docker_repo, 'team/app/api')}") == ["v1"]
    assert clients.registry_manifest_digest(docker_repo.url, "team/app/api", "v1") == digest
    dockerd.remove_image(target)


def test_docker_manifest_create_and_push(dockerd, images, containers, docker_repo):
    """``docker manifest`` (the CLI's own registry client) assembles a list from two names."""
    image = images.multi_oci
    per_arch = {}
    for platform, child_ref in images.layout.tag_children(image).items():
        per_arch[platform] = ref(docker_repo, f"manifest/app-{platform.split('/')[1]}", "1")
        containers.copy(f"oci:{images.layout.path}:{child_ref}", f"docker://{per_arch[platform]}")
    target = ref(docker_repo, "manifest/app", "1")

    dockerd.docker("manifest", "create", "--insecure", target, *per_arch.values())
    out = dockerd.docker("manifest", "push", "--insecure", "--purge", target).stdout
    list_digest = out.strip().splitlines()[-1].strip()

    raw = containers.inspect_raw(f"docker://{target}")
    assert clients.sha256_digest(raw) == list_digest
    listed = {(m["platform"]["os"] + "/" + m["platform"]["architecture"]): m["digest"]
              for m in json.loads(raw)["manifests"]}
    assert listed == {p: c.digest for p, c in image.children.items()}
    for platform, child in image.children.items():
        dockerd.pull(target, platform=platform)
        assert dockerd.image_inspect(target)["Id"] == child.config_digest
        dockerd.remove_image(target)


@pytest.fixture
def containerd(dockerd):
    """containerd's ``ctr``, talking to the containerd of the private dockerd."""
    clients.require("ctr")
    yield dockerd
    dockerd.ctr_remove_all_images()


def test_containerd_ctr_push_pull(containerd, images, containers, docker_repo):
    """containerd uploads each blob as one PUT with a body; pull it back, then by platform."""
    tarball, loaded = images.archive(containers, images.small)
    containerd.ctr("images", "import", tarball)
    local = f"docker.io/{loaded}"
    target = ref(docker_repo, "ctr/small", "1")
    containerd.ctr("images", "tag", local, target)
    local_digest = ctr_image_digest(containerd, target)

    containerd.ctr("images", "push", "--plain-http", target)
    assert clients.registry_manifest_digest(docker_repo.url, "ctr/small", "1") == local_digest
    containerd.ctr("images", "rm", "--sync", target, local)

    containerd.ctr("images", "pull", "--plain-http", target)
    assert ctr_image_digest(containerd, target) == local_digest

    multi = ref(docker_repo, "ctr/multi", "1")
    containers.copy(images.multi_oci.oci, f"docker://{multi}", "--all")
    containerd.ctr("images", "pull", "--plain-http", "--platform", "linux/arm64", multi)
    assert ctr_image_digest(containerd, multi) == images.multi_oci.digest
    arm = images.multi_oci.children["linux/arm64"]
    content = containerd.ctr("content", "ls", "--quiet").stdout.split()
    assert arm.digest in content and arm.config_digest in content
    amd = images.multi_oci.children["linux/amd64"]
    assert amd.config_digest not in content


def ctr_image_digest(containerd, name):
    """The manifest digest that ``ctr images ls`` records for ``name``."""
    for line in containerd.ctr("images", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[2]
    raise AssertionError(f"{name} not in ctr images ls")


# --------------------------------------------------------------------------
# podman and buildah
# --------------------------------------------------------------------------

def test_podman_push_pull_small_image(containers, images, docker_repo, tmp_path):
    clients.require("podman")
    target = ref(docker_repo, "podman/small", "1")
    image_id = images.small.config_digest.split(":")[1]
    containers.podman("pull", images.small.oci)
    containers.podman("tag", image_id, target)

    digest_file = tmp_path / "digest"
    containers.podman("push", "--tls-verify=false", "--digestfile", digest_file, target)
    digest = digest_file.read_text().strip()
    containers.podman("rmi", "--force", image_id)

    containers.podman("pull", "--tls-verify=false", target)
    out = containers.podman("image", "inspect", target).stdout
    pulled = json.loads(out)[0]
    assert pulled["Id"] == image_id
    assert pulled["Digest"] == digest
    assert clients.registry_manifest_digest(docker_repo.url, "podman/small", "1") == digest
    containers.podman("rmi", "--force", image_id)


def test_podman_manifest_push_all(containers, images, docker_repo, tmp_path):
    clients.require("podman")
    image = images.multi_oci
    local = f"localhost/depot-test/list:{tmp_path.name}"
    containers.podman("manifest", "create", local)
    for child_ref in images.layout.tag_children(image).values():
        containers.podman("manifest", "add", local, f"oci:{images.layout.path}:{child_ref}")
    target = ref(docker_repo, "podman/list", "1")

    digest_file = tmp_path / "digest"
    containers.podman("manifest", "push", "--all", "--tls-verify=false",
                      "--digestfile", digest_file, local, f"docker://{target}")
    containers.podman("manifest", "rm", local)

    raw = containers.inspect_raw(f"docker://{target}")
    assert clients.sha256_digest(raw) == digest_file.read_text().strip()
    pushed = {m["digest"] for m in json.loads(raw)["manifests"]}
    assert pushed == {c.digest for c in image.children.values()}
    for platform, child in image.children.items():
        arch = platform.split("/")[1]
        containers.podman("pull", "--tls-verify=false", "--arch", arch, target)
        pulled = json.loads(containers.podman("image", "inspect", target).stdout)[0]
        assert "sha256:" + pulled["Id"] == child.config_digest
        assert pulled["Architecture"] == arch
        containers.podman("rmi", "--force", pulled["Id"])


def test_podman_search_lists_catalog_and_tags(containers, images, docker_repo):
    clients.require("podman", "skopeo")
    for name, tag in [("search/alpha", "1"), ("search/beta", "2"), ("elsewhere/gamma", "3")]:
        containers.copy(images.small.oci, f"docker://{ref(docker_repo, name, tag)}")

    found = json.loads(containers.podman("search", "--tls-verify=false", "--format", "json",
                                         ref(docker_repo, "search")).stdout)
    assert sorted(r["Name"] for r in found) == [ref(docker_repo, "search/alpha"),
                                                 ref(docker_repo, "search/beta")]
    tags = json.loads(containers.podman("search", "--tls-verify=false", "--list-tags",
                                        "--format", "json",
                                        ref(docker_repo, "search/beta")).stdout)
    assert [t for r in tags for t in r["Tags"]] == ["2"]


def test_buildah_build_and_push(containers, docker_repo, tmp_path):
    clients.require("buildah", "skopeo")
    content = f"built by buildah for {docker_repo.host}\n"
    (tmp_path / "greeting.txt").write_text(content)
    ctr = containers.buildah("from", "scratch").stdout.strip()
    containers.buildah("copy", ctr, tmp_path / "greeting.txt", "/greeting.txt")
    containers.buildah("config", "--label", "org.example.depot.test=buildah",
                       "--cmd", "/greeting.txt", ctr)
    local = f"localhost/depot-test/buildah:{tmp_path.name}"
    containers.buildah("commit", "--rm", ctr, local)

    target = ref(docker_repo, "buildah/app", "1")
    digest_file = tmp_path / "digest"
    containers.buildah("push", "--tls-verify=false", "--digestfile", digest_file,
                       local, f"docker://{target}")
    digest = digest_file.read_text().strip()

    # Pull back with another client into a plain directory and look inside.
    out = tmp_path / "pulled"
    containers.copy(f"docker://{target}", f"dir:{out}")
    raw = (out / "manifest.json").read_bytes()
    assert clients.sha256_digest(raw) == digest
    manifest = json.loads(raw)
    assert len(manifest["layers"]) == 1
    layer = out / manifest["layers"][0]["digest"].split(":")[1]
    assert clients.file_digest(layer) == manifest["layers"][0]["digest"]
    with tarfile.open(layer) as tar:
        member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "greeting.txt")
        assert tar.extractfile(member).read().decode() == content
    labels = containers.inspect(f"docker://{target}")["Labels"]
    assert labels["org.example.depot.test"] == "buildah"
    containers.buildah("rmi", local)


# --------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["oci-index", "docker-manifest-list"])
def test_skopeo_copy_multiarch_all(skopeo, images, docker_repo, tmp_path, kind):
    image = images.multi_oci if kind == "oci-index" else images.multi_docker
    target = f"docker://{ref(docker_repo, 'skopeo/' + kind, '1')}"

    skopeo.copy(image.source, target, "--all")

    assert skopeo.inspect_raw(target) == image.raw
    base = f"docker://{ref(docker_repo, 'skopeo/' + kind)}"
    for platform, child in image.children.items():
        assert skopeo.inspect_raw(f"{base}@{child.digest}") == child.raw, platform
        arch = platform.split("/")[1]
        info = skopeo.inspect(target, "--override-arch", arch)
        assert info["Architecture"] == arch
        assert info["Layers"] == child.layer_digests
    assert (clients.registry_manifest_digest(docker_repo.url, f"skopeo/{kind}", "1")
            == image.digest)

    skopeo.copy(target, f"dir:{tmp_path / 'back'}", "--all")
    assert_dir_copy_matches(tmp_path / "back", image)


def test_skopeo_many_layers(skopeo, images, docker_repo, tmp_path):
    image = images.many
    target = f"docker://{ref(docker_repo, 'skopeo/many', '1')}"

    skopeo.copy(image.oci, target)

    assert skopeo.inspect_raw(target) == image.raw
    skopeo.copy(target, f"dir:{tmp_path / 'back'}")
    assert_dir_copy_matches(tmp_path / "back", image)
    assert len(image.layer_digests) == 20


def test_docker_many_layers(dockerd, images, containers, docker_repo):
    target = ref(docker_repo, "docker/many", "1")

    _, pulled = docker_push_then_pull(dockerd, images, containers, images.many, target)

    config = json.loads(images.layout.read_blob(images.many.config_digest))
    assert pulled["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
    assert len(pulled["RootFS"]["Layers"]) == 20
    dockerd.remove_image(target)


def test_skopeo_big_layer(skopeo, images, docker_repo, tmp_path):
    image = images.big
    target = f"docker://{ref(docker_repo, 'skopeo/big', '1')}"

    skopeo.copy(image.oci, target)

    assert skopeo.inspect_raw(target) == image.raw
    skopeo.copy(target, f"dir:{tmp_path / 'back'}")
    assert_dir_copy_matches(tmp_path / "back", image)


def test_docker_big_layer(dockerd, images, containers, docker_repo):
    target = ref(docker_repo, "docker/big", "1")

    _, pulled = docker_push_then_pull(dockerd, images, containers, images.big, target)

    config = json.loads(images.layout.read_blob(images.big.config_digest))
    assert pulled["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
    assert pulled["Size"] >= 300 << 20
    dockerd.remove_image(target)


def test_repeated_and_empty_layers(dockerd, images, containers, docker_repo):
    image = images.repeated
    assert len(set(image.layer_digests)) < len(image.layer_digests)
    skopeo_target = f"docker://{ref(docker_repo, 'edge/skopeo', '1')}"
    containers.copy(image.oci, skopeo_target)
    assert containers.inspect_raw(skopeo_target) == image.raw

    _, pulled = docker_push_then_pull(dockerd, images, containers, image,
                                      ref(docker_repo, "edge/docker", "1"))

    config = json.loads(images.layout.read_blob(image.config_digest))
    assert pulled["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]


def test_docker_push_interrupted_then_retried(dockerd, images, containers, docker_repo):
    """Ctrl-C during the upload of a 300 MiB layer, then push again and pull."""
    target = ref(docker_repo, "docker/interrupted", "1")
    loaded = docker_load_and_tag(dockerd, images, containers, images.big, target)
    env = dict(os.environ, DOCKER_CONFIG=str(dockerd.client_config), DOCKER_HOST=dockerd.host)

    # Interrupt once Depot reports an upload session in progress.
    push = subprocess.Popen(["docker", "push", target], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        for _ in range(1200):
            if push.poll() is not None or upload_sessions(docker_repo) > 0:
                break
            time.sleep(0.05)
        push.send_signal(signal.SIGINT)
        push.wait(timeout=60)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
        output = push.stdout.read()
        push.stdout.close()
    assert push.returncode != 0, "the push ended before it could be interrupted:\n" + output

    digest = clients.pushed_digest(dockerd.push(target))
    dockerd.remove_image(loaded, target)
    dockerd.pull(target)
    assert dockerd.image_inspect(target)["Id"] == images.big.config_digest
    assert clients.registry_manifest_digest(docker_repo.url, "docker/interrupted", "1") == digest


def upload_sessions(docker_repo):
    """Open upload sessions of the repository, from Depot's management API."""
    answer = docker_repo.depot.api("GET", "/repositories/" + docker_repo.name)
    return answer.json().get("content", {}).get("uploads", 0) if answer.ok else 0


def test_skopeo_copy_to_second_name_mounts_blobs(skopeo, images, docker_repo):
    image = images.many
    first = f"docker://{ref(docker_repo, 'mount/first', '1')}"
    second = f"docker://{ref(docker_repo, 'mount/second', '1')}"
    skopeo.copy(image.oci, first)

    log = skopeo.skopeo("--debug", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                        "--preserve-digests", first, second).stderr

    # Every layer is mounted from mount/first: none is uploaded again.
    for layer in image.layer_digests:
        assert f"Upload of layer {layer} complete" not in log, layer
    assert log.count("mount OK") + log.count("already exists") >= len(image.layer_digests)
    assert "mount OK" in log
    assert skopeo.inspect_raw(second) == image.raw


def test_skopeo_list_tags_and_delete(skopeo, images, docker_repo):
    name = ref(docker_repo, "skopeo/tags")
    skopeo.copy(images.small.oci, f"docker://{name}:v1")
    skopeo.copy(images.other.oci, f"docker://{name}:v2")
    skopeo.copy(images.other.oci, f"docker://{name}:latest")
    assert skopeo.list_tags(f"docker://{name}") == ["latest", "v1", "v2"]

    # skopeo delete resolves the tag and deletes the manifest by digest.
    skopeo.delete(f"docker://{name}:v1")
    assert skopeo.list_tags(f"docker://{name}") == ["latest", "v2"]
    gone = skopeo.skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{name}:v1",
                         check=False)
    assert gone.returncode != 0
    assert "manifest unknown" in gone.stderr.lower(), gone.stderr
    r = requests.get(f"{docker_repo.url}/v2/skopeo/tags/manifests/{images.small.digest}",
                     headers={"Accept": clients.OCI_MANIFEST}, timeout=30)
    assert r.status_code == 404

    # Deleting by digest removes both tags that point at it.
    skopeo.delete(f"docker://{name}@{images.other.digest}")
    r = requests.get(f"{docker_repo.url}/v2/skopeo/tags/tags/list", timeout=30)
    assert r.status_code in (200, 404), r.text
    if r.status_code == 200:
        assert not r.json().get("tags")
    else:
        assert r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert skopeo.skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{name}:v2",
                         check=False).returncode != 0


def test_skopeo_list_tags_of_many_tags(skopeo, images, docker_repo):
    """251 tags all come back through skopeo (which follows ``Link`` when a registry pages)."""
    name = "skopeo/paged"
    skopeo.copy(images.small.oci, f"docker://{ref(docker_repo, name, 'seed')}")
    tags = ["seed"] + [f"t{i:03d}" for i in range(250)]
    with requests.Session() as http:
        for tag in tags[1:]:
            r = http.put(f"{docker_repo.url}/v2/{name}/manifests/{tag}", data=images.small.raw,
                         headers={"Content-Type": images.small.media_type}, timeout=30)
            assert r.status_code == 201, (r.status_code, r.text)

    assert skopeo.list_tags(f"docker://{ref(docker_repo, name)}") == sorted(tags)


def test_parallel_pushes_of_the_same_layers(skopeo, images, docker_repo, tmp_path):
    """Four skopeo processes upload the same 20 layers to four names at once."""
    image = images.many
    targets = [f"docker://{ref(docker_repo, f'parallel/n{i}', '1')}" for i in range(4)]
    procs = [subprocess.Popen(["skopeo", "--policy", str(skopeo.policy), "copy",
                               "--dest-tls-verify=false", "--preserve-digests", image.oci, t],
                              env=skopeo.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True)
             for t in targets]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()

    assert [rc for rc, _ in results] == [0] * 4, results
    for t in targets:
        assert skopeo.inspect_raw(t) == image.raw
    skopeo.copy(targets[-1], f"dir:{tmp_path / 'back'}")
    assert_dir_copy_matches(tmp_path / "back", image)


def test_skopeo_tag_moves_from_manifest_to_index(skopeo, images, docker_repo):
    target = f"docker://{ref(docker_repo, 'skopeo/moving', 'latest')}"
    skopeo.copy(images.small.oci, target)
    assert skopeo.inspect_raw(target) == images.small.raw

    skopeo.copy(images.multi_oci.oci, target, "--all")

    assert skopeo.inspect_raw(target) == images.multi_oci.raw
    info = skopeo.inspect(target, "--override-arch", "arm64")
    assert info["Layers"] == images.multi_oci.children["linux/arm64"].layer_digests


def test_skopeo_inspect_missing_says_manifest_unknown(skopeo, docker_repo):
    failed = skopeo.skopeo("inspect", "--raw", "--tls-verify=false",
                           f"docker://{ref(docker_repo, 'skopeo/nothing', 'missing')}",
                           check=False)

    assert failed.returncode != 0
    assert "manifest unknown" in failed.stderr.lower(), failed.stderr


# --------------------------------------------------------------------------
# A registry on HTTPS, trusted through Depot's own certificate
# --------------------------------------------------------------------------

@pytest.fixture
def tls_registry(depot, tmp_path):
    """A docker repository on an HTTPS port only; yields (host, dir holding ca.crt)."""
    port = clients.free_port()
    name = "tls-clients"
    depot.create_repository(name, "docker", config={"http_port": 0, "https_port": port})
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copyfile(depot.cert, certs / "ca.crt")
    try:
        yield f"127.0.0.1:{port}", certs
    finally:
        depot.api("DELETE", "/repositories/" + name)


def test_skopeo_and_podman_over_verified_tls(containers, images, tls_registry):
    clients.require("skopeo", "podman")
    host, certs = tls_registry
    target = f"{host}/tls/small:1"

    containers.skopeo("copy", "--dest-cert-dir", certs, "--preserve-digests",
                      images.small.oci, f"docker://{target}")

    raw = containers.inspect_raw(f"docker://{target}", "--cert-dir", certs, tls_verify=True)
    assert raw == images.small.raw
    containers.podman("pull", "--cert-dir", certs, target)
    pulled = json.loads(containers.podman("image", "inspect", target).stdout)[0]
    assert "sha256:" + pulled["Id"] == images.small.config_digest
    assert pulled["Digest"] == images.small.digest
    containers.podman("rmi", "--force", pulled["Id"])

    # Verification really is on: without the certificate the client refuses.
    untrusted = containers.skopeo("inspect", "--raw", f"docker://{target}", check=False)
    assert untrusted.returncode != 0
    assert "x509" in untrusted.stderr or "certificate" in untrusted.stderr, untrusted.stderr


# --------------------------------------------------------------------------
# OCI artifacts with a subject, and the referrers API
# --------------------------------------------------------------------------

SBOM_TYPE = "application/vnd.example.sbom.v1+json"
SIGNATURE_TYPE = "application/vnd.example.signature.v1"


def push_artifact_raw(url, name, subject, artifact_type, payload: bytes):
    """Push an OCI 1.1 artifact (empty config, ``artifactType``) by plain HTTP."""
    empty = b"{}"
    for blob in (empty, payload):
        digest = clients.sha256_digest(blob)
        r = requests.post(f"{url}/v2/{name}/blobs/uploads/", timeout=30)
        assert r.status_code == 202, (r.status_code, r.text)
        location = requests.compat.urljoin(url + "/", r.headers["Location"])
        sep = "&" if "?" in location else "?"
        r = requests.put(f"{location}{sep}digest={digest}", data=blob, timeout=30,
                         headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, (r.status_code, r.text)
    manifest = {
        "schemaVersion": 2,
        "mediaType": clients.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": clients.OCI_EMPTY, "digest": clients.sha256_digest(empty),
                   "size": 2, "data": "e30="},
        "layers": [{"mediaType": "application/octet-stream",
                    "digest": clients.sha256_digest(payload), "size": len(payload)}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest,
                    "size": len(subject.raw)},
    }
    raw = json.dumps(manifest).encode()
    digest = clients.sha256_digest(raw)
    r = requests.put(f"{url}/v2/{name}/manifests/{digest}", data=raw, timeout=30,
                     headers={"Content-Type": clients.OCI_MANIFEST})
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers.get("OCI-Subject") == subject.digest
    return digest


def test_artifact_with_subject_found_through_referrers(skopeo, images, docker_repo,
                                                       tmp_path, monkeypatch):
    clients.require("py:oras")
    import oras.client
    import oras.oci

    name = "oras/app"
    subject = images.small
    skopeo.copy(subject.oci, f"docker://{ref(docker_repo, name, '1')}")

    # oras-py: an SBOM file whose config media type is the artifact type.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sbom.json").write_text('{"spdxVersion": "SPDX-2.3"}')
    (tmp_path / "config.json").write_text("{}")
    client = oras.client.OrasClient(hostname=docker_repo.host, insecure=True)
    resp = client.push(
        target=ref(docker_repo, name, "sbom"),
        files=["sbom.json:application/spdx+json"],
        manifest_config=f"config.json:{SBOM_TYPE}",
        subject=oras.oci.Subject(mediaType=subject.media_type, digest=subject.digest,
                                 size=len(subject.raw)),
    )
    assert resp.status_code == 201
    sbom_digest = resp.headers["Docker-Content-Digest"]

    # The same by hand, OCI 1.1 style: empty config and an artifactType.
    sig_digest = push_artifact_raw(docker_repo.url, name, subject, SIGNATURE_TYPE, b"sig")

    referrers_url = f"{docker_repo.url}/v2/{name}/referrers/{subject.digest}"
    r = requests.get(referrers_url, timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith(clients.OCI_INDEX)
    index = r.json()
    assert index["mediaType"] == clients.OCI_INDEX
    found = {m["digest"]: m for m in index["manifests"]}
    assert set(found) == {sbom_digest, sig_digest}
    assert found[sbom_digest]["artifactType"] == SBOM_TYPE
    assert found[sig_digest]["artifactType"] == SIGNATURE_TYPE
    assert all(m["mediaType"] == clients.OCI_MANIFEST for m in found.values())

    r = requests.get(referrers_url, params={"artifactType": SBOM_TYPE}, timeout=30)
    assert r.status_code == 200
    assert [m["digest"] for m in r.json()["manifests"]] == [sbom_digest]
    assert r.headers.get("OCI-Filters-Applied") == "artifactType"

    r = requests.get(f"{docker_repo.url}/v2/{name}/referrers/{sbom_digest}", timeout=30)
    assert r.status_code == 200 and r.json()["manifests"] == []

    # oras-py pulls the SBOM back intact.
    files = client.pull(target=ref(docker_repo, name, "sbom"), outdir=str(tmp_path / "out"))
    assert [open(f).read() for f in files] == ['{"spdxVersion": "SPDX-2.3"}']


def test_oras_chunked_upload_and_pull(skopeo, docker_repo, tmp_path, monkeypatch):
    """oras-py in chunked mode: PATCH after PATCH with Content-Range, then PUT."""
    clients.require("py:oras")
    import oras.client

    monkeypatch.chdir(tmp_path)
    payload = os.urandom((5 << 20) + 12345)
    (tmp_path / "model.bin").write_bytes(payload)
    client = oras.client.OrasClient(hostname=docker_repo.host, insecure=True)
    target = ref(docker_repo, "oras/chunked", "1")

    resp = client.push(target=target, files=["model.bin"], do_chunked=True, chunk_size=1 << 20)
    assert resp.status_code == 201

    files = client.pull(target=target, outdir=str(tmp_path / "out"))
    assert len(files) == 1
    with open(files[0], "rb") as f:
        assert f.read() == payload
    manifest = json.loads(skopeo.inspect_raw(f"docker://{target}"))
    assert manifest["layers"][0]["digest"] == clients.sha256_digest(payload)
