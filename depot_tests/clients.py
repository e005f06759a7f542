"""Drive real registry clients (docker, podman, buildah, skopeo, oras) from tests.

Everything here is named after what a user does: build an image, start a
private Docker engine, push, pull, copy.  No image is ever pulled from the
internet: images are written by hand as OCI image layouts (tar + gzip + JSON)
and handed to the clients from there (``oci:`` for skopeo and podman, a
``docker-archive`` tarball for ``docker load``).

Isolation from the machine:

* dockerd runs with its own ``--data-root``, ``--exec-root``, ``--pidfile``,
  unix socket, ``--config-file`` and no networking of its own
  (``--bridge=none --iptables=false --ip6tables=false``), on ``vfs``.
  The docker CLI gets its own ``DOCKER_CONFIG``.  The containerd that dockerd
  starts under its exec-root also serves ``ctr``, in a namespace of its own.
* podman and buildah share one containers-storage in a temp dir
  (``--root``/``--runroot``/``--storage-driver vfs``); podman also gets its own
  ``--tmpdir``, ``--cgroup-manager cgroupfs`` and ``--events-backend file``.
* skopeo, podman and buildah get their own auth file
  (``REGISTRY_AUTH_FILE``) and registries.conf (``CONTAINERS_REGISTRIES_CONF``);
  skopeo gets an accept-anything ``--policy`` of its own.

A client that is not installed makes the test skip, unless
``DEPOT_REQUIRE_CLIENTS=1`` (CI), where it fails: see :func:`require`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REQUIRE_ENV = "DEPOT_REQUIRE_CLIENTS"

# Media types.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

REF_NAME = "org.opencontainers.image.ref.name"

# A fixed timestamp keeps every built image byte-for-byte reproducible.
EPOCH = 1700000000
CREATED = "2023-11-14T22:13:20Z"


# --------------------------------------------------------------------------
# Clients present or not
# --------------------------------------------------------------------------

def clients_required() -> bool:
    """True when a missing client must fail the test instead of skipping it."""
    return os.environ.get(REQUIRE_ENV) == "1"


def require(*names: str) -> None:
    """Make sure each named client is usable, else skip (or fail in CI).

    A name is an executable on PATH (``"skopeo"``), ``"py:<module>"`` for a
    Python package (``"py:oras"``), or ``"root"`` for tests that need root
    (dockerd).
    """
    missing = []
    for name in names:
        if name == "root":
            if os.geteuid() != 0:
                missing.append("root privileges")
        elif name.startswith("py:"):
            if importlib.util.find_spec(name[3:]) is None:
                missing.append(f"Python package {name[3:]!r}")
        elif shutil.which(name) is None:
            missing.append(f"{name!r} on PATH")
    if not missing:
        return
    reason = "registry client missing: " + ", ".join(missing)
    if clients_required():
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------

class ClientError(AssertionError):
    """A client command exited non-zero; the message carries its output."""

    def __init__(self, cmd, proc):
        self.cmd = cmd
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        super().__init__(
            f"command failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}"
        )


def _tail(text: str, limit: int = 6000) -> str:
    text = text or ""
    return text if len(text) <= limit else "...\n" + text[-limit:]


def run(cmd, *, env=None, check=True, timeout=600, input=None) -> subprocess.CompletedProcess:
    """Run a command, capture its output, raise ClientError on failure."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(
        cmd, env=env, input=input, capture_output=True, text=True, timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise ClientError(cmd, proc)
    return proc


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------
# Digests
# --------------------------------------------------------------------------

def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# --------------------------------------------------------------------------
# Building images by hand: OCI image layouts
# --------------------------------------------------------------------------

def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A reproducible tar of regular files (directories are added as needed)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen = set()
        for name in sorted(files):
            parts = name.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in seen:
                    seen.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
                    tar.addfile(info)
            data = files[name]
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict | None = None
    annotations: dict | None = None

    def json(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            d["platform"] = self.platform
        if self.annotations:
            d["annotations"] = self.annotations
        return d


@dataclass
class Image:
    """A manifest (or index) written into an OCI layout, tagged there as ``ref``."""

    layout: "Layout"
    ref: str
    media_type: str
    digest: str
    raw: bytes                      # exact manifest / index bytes
    config_digest: str | None = None  # single-platform images: the docker image ID
    layer_digests: list[str] = field(default_factory=list)
    children: dict[str, "Image"] = field(default_factory=dict)  # "linux/arm64" -> Image

    @property
    def oci(self) -> str:
        """The ``oci:`` layout reference of this image (OCI media types only)."""
        return f"oci:{self.layout.path}:{self.ref}"

    @property
    def source(self) -> str:
        """A skopeo transport reference that serves these exact bytes.

        containers/image's ``oci:`` transport only knows OCI media types, so an
        image with Docker media types is exported to a ``dir:`` directory
        (manifest.json, ``<hex>.manifest.json`` per list instance, ``<hex>`` blobs).
        """
        if self.media_type in (OCI_MANIFEST, OCI_INDEX):
            return self.oci
        d = self.layout.path.parent / f"{self.layout.path.name}.dir.{self.ref}"
        if not (d / "manifest.json").exists():
            d.mkdir(parents=True, exist_ok=True)
            (d / "version").write_text("Directory Transport Version: 1.1\n")
            for img in [self, *self.children.values()]:
                if img is not self:
                    (d / f"{img.digest.split(':')[1]}.manifest.json").write_bytes(img.raw)
                for blob in [img.config_digest, *img.layer_digests]:
                    if blob:
                        dst = d / blob.split(":")[1]
                        if not dst.exists():
                            shutil.copyfile(self.layout.blob_path(blob), dst)
            (d / "manifest.json").write_bytes(self.raw)
        return f"dir:{d}"

    @property
    def is_list(self) -> bool:
        return self.media_type in (OCI_INDEX, DOCKER_LIST)


class Layout:
    """An OCI image layout directory (oci-layout, index.json, blobs/sha256/...)."""

    def __init__(self, path):
        self.path = Path(path)
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self._index = self.path / "index.json"
        if not self._index.exists():
            self._write_index({"schemaVersion": 2, "manifests": []})

    def _write_index(self, index):
        self._index.write_text(json.dumps(index, indent=2))

    def blob_path(self, digest: str) -> Path:
        algo, hexpart = digest.split(":", 1)
        return self.path / "blobs" / algo / hexpart

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def add_blob(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        p = self.blob_path(digest)
        if not p.exists():
            p.write_bytes(data)
        return digest, len(data)

    def add_blob_file(self, src: Path) -> tuple[str, int]:
        digest = file_digest(src)
        size = src.stat().st_size
        dst = self.blob_path(digest)
        if dst.exists():
            src.unlink()
        else:
            os.replace(src, dst)
        return digest, size

    def tag_children(self, image: "Image") -> dict[str, str]:
        """Tag each platform of a multi-arch image as ``<ref>.<arch>``; return platform->ref."""
        refs = {}
        for platform, child in image.children.items():
            refs[platform] = f"{image.ref}.{platform.split('/')[1]}"
            self.tag(refs[platform], Descriptor(child.media_type, child.digest, len(child.raw)))
        return refs

    def tag(self, ref: str, desc: Descriptor) -> None:
        index = json.loads(self._index.read_text())
        index["manifests"] = [
            m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != ref
        ]
        entry = desc.json()
        entry.setdefault("annotations", {})[REF_NAME] = ref
        index["manifests"].append(entry)
        self._write_index(index)


def _image_config(arch: str, os_: str, variant: str | None, diff_ids: list[str],
                  labels: dict | None) -> dict:
    cfg = {
        "architecture": arch,
        "os": os_,
        "created": CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/hello"],
            "Labels": dict(labels or {}),
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": CREATED, "created_by": f"depot-tests layer {i}"}
                    for i in range(len(diff_ids))],
    }
    if variant:
        cfg["variant"] = variant
    return cfg


def build_image(layout: Layout, ref: str | None, layers: list[dict[str, bytes]], *,
                arch: str = "amd64", os_: str = "linux", variant: str | None = None,
                docker_media: bool = False, labels: dict | None = None) -> Image:
    """Write a single-platform image; tag it as ``ref`` in the layout unless None.

    ``layers`` is a list of {path: content} dicts, one per layer.  With
    ``docker_media`` the manifest uses Docker schema 2 media types, else OCI.
    """
    layer_descs, diff_ids = [], []
    for files in layers:
        raw = tar_bytes(files)
        diff_ids.append(sha256_digest(raw))
        digest, size = layout.add_blob(gzip_bytes(raw))
        layer_descs.append(Descriptor(DOCKER_LAYER_GZIP if docker_media else OCI_LAYER_GZIP,
                                      digest, size))
    return _finish_image(layout, ref, layer_descs, diff_ids, arch=arch, os_=os_,
                         variant=variant, docker_media=docker_media, labels=labels)


def _finish_image(layout, ref, layer_descs, diff_ids, *, arch, os_, variant, docker_media,
                  labels) -> Image:
    cfg_bytes = canonical_json(_image_config(arch, os_, variant, diff_ids, labels))
    cfg_digest, cfg_size = layout.add_blob(cfg_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker_media else OCI_MANIFEST,
        "config": Descriptor(DOCKER_CONFIG if docker_media else OCI_CONFIG,
                             cfg_digest, cfg_size).json(),
        "layers": [d.json() for d in layer_descs],
    }
    raw = json.dumps(manifest, indent=3).encode()  # not canonical on purpose: bytes must survive
    digest, size = layout.add_blob(raw)
    img = Image(layout, ref or "", manifest["mediaType"], digest, raw, cfg_digest,
                [d.digest for d in layer_descs])
    if ref:
        layout.tag(ref, Descriptor(img.media_type, digest, size))
    return img


def build_small_image(layout: Layout, ref: str = "small", *, docker_media: bool = False,
                      label: str = "small") -> Image:
    """A small single-platform linux/amd64 image: one layer, a few files."""
    files = {
        "hello": b"#!/bin/sh\necho hello from depot\n",
        "etc/depot-release": f"depot test image {label}\n".encode(),
    }
    return build_image(layout, ref, [files], docker_media=docker_media,
                       labels={"org.example.depot.test": label})


PLATFORMS = (("linux", "amd64", None), ("linux", "arm64", "v8"))


def build_multiarch_image(layout: Layout, ref: str, *, docker_media: bool = False) -> Image:
    """A linux/amd64 + linux/arm64 image: an OCI index or a Docker manifest list."""
    children = {}
    descs = []
    for os_, arch, variant in PLATFORMS:
        files = {"hello": f"#!/bin/sh\necho hello from {arch}\n".encode(),
                 "etc/arch": f"{os_}/{arch}{'/' + variant if variant else ''}\n".encode()}
        child = build_image(layout, None, [files], arch=arch, os_=os_, variant=variant,
                            docker_media=docker_media,
                            labels={"org.example.depot.arch": arch,
                                    "org.example.depot.kind": "docker" if docker_media else "oci"})
        platform = {"architecture": arch, "os": os_}
        if variant:
            platform["variant"] = variant
        children[f"{os_}/{arch}"] = child
        descs.append(Descriptor(child.media_type, child.digest, len(child.raw), platform))
    index = {
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST if docker_media else OCI_INDEX,
        "manifests": [d.json() for d in descs],
    }
    raw = json.dumps(index, indent=3).encode()
    digest, size = layout.add_blob(raw)
    layout.tag(ref, Descriptor(index["mediaType"], digest, size))
    return Image(layout, ref, index["mediaType"], digest, raw, children=children)


def build_many_layer_image(layout: Layout, ref: str = "many", count: int = 20) -> Image:
    """An image with ``count`` small layers, each adding its own file."""
    layers = [{f"layer/{i:02d}.txt": (f"layer {i}\n" * (i + 1)).encode() + os.urandom(512)}
              for i in range(count)]
    return build_image(layout, ref, layers, labels={"org.example.depot.test": "many"})


def build_big_layer_image(layout: Layout, ref: str = "big", size_mb: int = 300) -> Image:
    """An image with one layer holding ``size_mb`` MiB of random (incompressible) data.

    The layer is gzip with stored (level 0) blocks: still a valid gzip stream,
    but written in seconds; the data would not compress anyway.
    """
    tmp = layout.path / "big-layer.tmp"
    diff = hashlib.sha256()

    class _Hashing(io.RawIOBase):  # hashes the uncompressed tar as it is written
        def __init__(self, gz):
            self.gz = gz

        def writable(self):
            return True

        def write(self, b):
            diff.update(b)
            return self.gz.write(b)

    with open(tmp, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", compresslevel=0,
                                                mtime=0) as gz:
        sink = io.BufferedWriter(_Hashing(gz), buffer_size=1 << 20)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("data/random.bin")
            info.size, info.mode, info.mtime = size_mb << 20, 0o644, EPOCH

            class _Random(io.RawIOBase):
                left = info.size

                def readable(self):
                    return True

                def readinto(self, b):
                    n = min(len(b), self.left)
                    b[:n] = os.urandom(n)
                    self.left -= n
                    return n

            tar.addfile(info, io.BufferedReader(_Random(), buffer_size=1 << 20))
        sink.flush()
    digest, size = layout.add_blob_file(tmp)
    return _finish_image(layout, ref, [Descriptor(OCI_LAYER_GZIP, digest, size)],
                         ["sha256:" + diff.hexdigest()], arch="amd64", os_="linux",
                         variant=None, docker_media=False,
                         labels={"org.example.depot.test": "big"})


# --------------------------------------------------------------------------
# skopeo, podman, buildah: one private containers-storage and config
# --------------------------------------------------------------------------

class Containers:
    """podman, buildah and skopeo, isolated in ``workdir``, plain HTTP allowed per call."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.root = self.workdir / "storage"
        self.runroot = self.workdir / "run"
        self.tmpdir = self.workdir / "tmp"
        for d in (self.root, self.runroot, self.tmpdir):
            d.mkdir(parents=True, exist_ok=True)
        self.policy = self.workdir / "policy.json"
        self.policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
        registries = self.workdir / "registries.conf"
        registries.write_text('unqualified-search-registries = []\nshort-name-mode = "disabled"\n')
        self.auth = self.workdir / "auth.json"
        self.auth.write_text('{"auths":{}}')
        self.env = dict(os.environ,
                        REGISTRY_AUTH_FILE=str(self.auth),
                        CONTAINERS_REGISTRIES_CONF=str(registries),
                        TMPDIR=str(self.tmpdir))

    def _storage(self):
        return ["--root", self.root, "--runroot", self.runroot, "--storage-driver", "vfs"]

    def podman(self, *args, check=True, timeout=600):
        return run(["podman", *self._storage(), "--tmpdir", self.tmpdir,
                    "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args],
                   env=self.env, check=check, timeout=timeout)

    def buildah(self, *args, check=True, timeout=600):
        return run(["buildah", *self._storage(), *args], env=self.env, check=check,
                   timeout=timeout)

    def skopeo(self, *args, check=True, timeout=600):
        return run(["skopeo", "--policy", self.policy, *args], env=self.env, check=check,
                   timeout=timeout)

    # What users do with skopeo against a plain-HTTP registry.
    def copy(self, src: str, dst: str, *extra, check=True):
        """``skopeo copy`` that fails rather than change a digest.

        skopeo's blob-info cache (global for root) could otherwise swap in a
        differently compressed copy of a layer it saw elsewhere on the registry.
        """
        return self.skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                           "--preserve-digests", *extra, src, dst, check=check)

    def inspect_raw(self, ref: str, *extra, tls_verify: bool = False) -> bytes:
        """``skopeo inspect --raw``: the manifest bytes exactly as the registry sent them."""
        cmd = ["skopeo", "--policy", str(self.policy), "inspect", "--raw",
               f"--tls-verify={str(tls_verify).lower()}", *map(str, extra), ref]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise ClientError(cmd, subprocess.CompletedProcess(
                cmd, proc.returncode, proc.stdout.decode(errors="replace"),
                proc.stderr.decode(errors="replace")))
        return proc.stdout

    def inspect(self, ref: str, *extra) -> dict:
        return json.loads(self.skopeo("inspect", "--tls-verify=false", *extra, ref).stdout)

    def list_tags(self, ref: str) -> list[str]:
        out = json.loads(self.skopeo("list-tags", "--tls-verify=false", ref).stdout)
        return sorted(out.get("Tags") or [])

    def delete(self, ref: str, check=True):
        return self.skopeo("delete", "--tls-verify=false", ref, check=check)


# --------------------------------------------------------------------------
# A private Docker engine
# --------------------------------------------------------------------------

class Dockerd:
    """A dockerd of our own; use as a context manager or call start()/stop()."""

    def __init__(self, workdir=None, insecure_registries=("127.0.0.0/8",)):
        # Unix socket paths are limited to 108 bytes: keep the dirs short.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dkd", dir="/tmp"))
        self.data_root = self.workdir / "data"
        self.exec_root = self.workdir / "exec"
        self.pidfile = self.workdir / "docker.pid"
        self.socket = self.workdir / "docker.sock"
        self.config_file = self.workdir / "daemon.json"
        self.client_config = self.workdir / "client"
        self.log_path = self.workdir / "dockerd.log"
        self.insecure_registries = list(insecure_registries)
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def command(self) -> list[str]:
        return [
            "dockerd",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pidfile),
            "-H", self.host,
            "--config-file", str(self.config_file),
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--storage-driver=vfs",
            "--userland-proxy=false",
        ]

    def start(self, timeout: float = 90) -> "Dockerd":
        for d in (self.data_root, self.exec_root, self.client_config):
            d.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps({
            "insecure-registries": self.insecure_registries,
            "max-concurrent-uploads": 5,
            "max-concurrent-downloads": 3,
        }))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            if self.socket.exists():
                p = self.docker("version", "--format", "{{.Server.Version}}", check=False,
                                timeout=30)
                if p.returncode == 0:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("dockerd did not come up:\n" + self.log_tail())
            time.sleep(0.2)

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # dockerd runs in its own session: this hits it and its containerd only.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        # Anything dockerd left mounted under its roots (netns files, etc.).
        with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f]
        for m in sorted(mounts, reverse=True):
            if m.startswith(str(self.workdir) + "/"):
                subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Dockerd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def docker(self, *args, check=True, timeout=900, input=None):
        env = dict(os.environ, DOCKER_CONFIG=str(self.client_config), DOCKER_HOST=self.host)
        env.pop("DOCKER_CONTEXT", None)
        return run(["docker", *args], env=env, check=check, timeout=timeout, input=input)

    @property
    def containerd_socket(self) -> Path:
        """The socket of the containerd this dockerd started for itself."""
        return self.exec_root / "containerd" / "containerd.sock"

    def ctr(self, *args, check=True, timeout=900):
        """containerd's own client, in a namespace of its own (not docker's "moby")."""
        return run(["ctr", "--address", self.containerd_socket, "--namespace", "depot-tests",
                    *args], check=check, timeout=timeout)

    def ctr_remove_all_images(self) -> None:
        refs = self.ctr("images", "ls", "--quiet").stdout.split()
        if refs:
            self.ctr("images", "rm", "--sync", *refs)

    # What users do.
    def load(self, tarball) -> str:
        return self.docker("load", "-i", str(tarball)).stdout

    def push(self, ref: str) -> str:
        """``docker push``; returns its output (it names the pushed digest)."""
        return self.docker("push", ref).stdout

    def pull(self, ref: str, platform: str | None = None) -> str:
        args = ["pull"] + (["--platform", platform] if platform else []) + [ref]
        return self.docker(*args).stdout

    def image_inspect(self, ref: str) -> dict:
        return json.loads(self.docker("image", "inspect", ref).stdout)[0]

    def image_exists(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    def remove_all_images(self) -> None:
        ids = self.docker("images", "--all", "--quiet", "--no-trunc").stdout.split()
        if ids:
            self.docker("image", "rm", "--force", *sorted(set(ids)))

    def remove_image(self, *refs: str) -> None:
        """Untag every ref and delete the image with its layers (so a pull is a real pull)."""
        self.docker("image", "rm", "--force", *refs)


def pushed_digest(push_output: str) -> str:
    """The manifest digest printed by ``docker push`` ("...: digest: sha256:... size: N")."""
    for line in push_output.splitlines():
        if "digest: " in line:
            return line.split("digest: ", 1)[1].split()[0]
    raise AssertionError(f"no digest in docker push output:\n{push_output}")


def docker_archive(containers: Containers, image: Image, path, name: str) -> Path:
    """Write ``image`` as a tarball for ``docker load`` (tagged ``name``)."""
    path = Path(path)
    if not path.exists():
        containers.skopeo("copy", image.oci, f"docker-archive:{path}:{name}")
    return path


# --------------------------------------------------------------------------
# Talking HTTP to the registry directly (referrers API, manifests by digest)
# --------------------------------------------------------------------------

def registry_manifest_digest(url: str, name: str, reference: str, media_types=None) -> str:
    """HEAD a manifest and return its ``Docker-Content-Digest``."""
    import requests

    accept = ", ".join(media_types or (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
    r = requests.head(f"{url}/v2/{name}/manifests/{reference}", headers={"Accept": accept},
                      timeout=60)
    assert r.status_code == 200, (r.status_code, r.headers)
    return r.headers["Docker-Content-Digest"]
