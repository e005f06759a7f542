"""The registry protocol of Depot's docker repositories, over real HTTP.

Docker Registry HTTP API V2 / OCI distribution-spec v1.1: base endpoint and
errors, blob uploads (monolithic, chunked, streamed, mounted), blobs,
manifests, discovery (catalog, tags), referrers, upload sessions kept across
restarts and expired, and the registry on the main port or on its own TLS
port. Section names in comments are those of the distribution-spec
("Pull", "Push", "Content Discovery", "Content Management", "Error Codes").

Each test uses a new docker repository (``docker_repo``), so the session's
Depot is shared without tests seeing each other's content.
"""

import json
import time
import urllib.parse
import uuid

import pytest
import requests

from conftest import DepotProcess, DockerRepository, free_port

# depot_tests is not a package: pytest puts its folder on sys.path, as for conftest.
from registry_helpers import (
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, EMPTY_DIGEST, OCI_EMPTY, OCI_INDEX,
    OCI_LAYER, OCI_MANIFEST, SCHEMA1_SIGNED, Client, Image, canonical,
    check_api_version, check_blob, check_blob_created, check_error,
    check_manifest, check_manifest_created, check_upload_accepted, descriptor,
    digest_of, finish_upload, follow_pages, get_blob, get_manifest, index_of,
    open_session, push_blob, push_chunk, put_manifest, start_upload,
    stream_chunk, chunked_request, plain_request, exchange)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------

@pytest.fixture
def registry(docker_repo):
    """A client of the ``docker_repo`` registry (plain HTTP, its own port)."""
    client = Client(docker_repo.url)
    yield client
    client.close()


@pytest.fixture
def other_docker_repo(depot):
    """A second docker repository of the same Depot, on its own port."""
    name = "docker-other-%s" % uuid.uuid4().hex[:8]
    port = free_port()
    depot.create_repository(name, "docker", config={"http_port": port})
    yield DockerRepository(depot, name, port)
    depot.api("DELETE", "/repositories/" + name)


@pytest.fixture
def other_registry(other_docker_repo):
    client = Client(other_docker_repo.url)
    yield client
    client.close()


def create_docker_repo(depot, **config):
    """Create a docker repository on ``depot`` with ``config``; returns its name."""
    name = "docker-%s" % uuid.uuid4().hex[:8]
    depot.create_repository(name, "docker", config=config)
    return name


BAD_DIGESTS = [
    "sha256:abc",                                  # too short
    "sha256:" + "g" * 64,                          # not hex
    "sha256:" + "A" * 64,                          # upper-case hex
    "sha256:" + "a" * 65,                          # too long
    "sha512:" + "a" * 64,                          # sha512 of sha256 length
    "md5:d41d8cd98f00b204e9800998ecf8427e",        # unsupported algorithm
    "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",  # unsupported
    "nocolon",
    "sha256:",
    ":" + "a" * 64,
]

BAD_NAMES = ["Upper", "a//b", "-a", "a-", "a..b", "_a", "a___b", "a/.b",
             "a/b/", "a" * 256]


# --------------------------------------------------------------------------
# Base endpoint, routing, errors ("Determining Support", "Error Codes")
# --------------------------------------------------------------------------

class TestBase:

    def test_v2_answers_200_with_version_header(self, registry):
        for path in ("/v2/", "/v2"):
            response = registry.request("GET", path)
            assert response.status_code == 200
            check_api_version(response)
            assert response.headers["Content-Type"].startswith("application/json")
            assert response.json() == {}
        head = registry.request("HEAD", "/v2/")
        assert head.status_code == 200
        check_api_version(head)

    def test_unknown_query_parameters_are_ignored(self, registry):
        image = Image("ns")
        image.push(registry, "lib/app", "v1")
        ns = {"ns": "docker.io", "whatever": "1"}
        assert registry.request("GET", "/v2/", params=ns).status_code == 200
        got = registry.request("GET", "/v2/lib/app/manifests/v1", params=ns)
        assert got.status_code == 200 and got.content == image.body
        blob = registry.request("GET", "/v2/lib/app/blobs/" + digest_of(image.config),
                                params=ns)
        assert blob.status_code == 200 and blob.content == image.config
        tags = registry.request("GET", "/v2/lib/app/tags/list", params=ns)
        assert tags.json() == {"name": "lib/app", "tags": ["v1"]}
        catalog = registry.request("GET", "/v2/_catalog", params=ns)
        assert catalog.json() == {"repositories": ["lib/app"]}
        upload = registry.request("POST", "/v2/lib/app/blobs/uploads/", params=ns)
        check_upload_accepted(upload, 0)

    @pytest.mark.parametrize("path", [
        "/", "/v1/", "/v2/nothing", "/v2/a/b/c", "/v2/a/manifests",
        "/v2/a/blobs", "/v2/a/tags", "/v2/a/tags/list/extra",
        "/v2/_catalog/x",
    ])
    def test_unknown_routes_are_404_json(self, registry, path):
        check_error(registry.request("GET", path), 404)

    @pytest.mark.parametrize("method, path", [
        ("POST", "/v2/"),
        ("DELETE", "/v2/"),
        ("PUT", "/v2/_catalog"),
        ("POST", "/v2/a/tags/list"),
        ("POST", "/v2/a/manifests/latest"),
        ("PATCH", "/v2/a/manifests/latest"),
        ("PUT", "/v2/a/blobs/" + EMPTY_DIGEST),
        ("POST", "/v2/a/blobs/" + EMPTY_DIGEST),
        ("GET", "/v2/a/blobs/uploads/"),
        ("PUT", "/v2/a/blobs/uploads/"),
        ("POST", "/v2/a/blobs/uploads/0123abcd"),
        ("DELETE", "/v2/a/referrers/" + EMPTY_DIGEST),
    ])
    def test_wrong_methods_are_405_json(self, registry, method, path):
        response = registry.request(method, path)
        check_error(response, 405, "UNSUPPORTED")
        assert response.headers.get("Allow")

    def test_errors_of_head_requests_carry_the_version_header(self, registry):
        check_error(get_blob(registry, "a", EMPTY_DIGEST, "HEAD"), 404)
        check_error(get_manifest(registry, "a", "latest", "HEAD"), 404)


# --------------------------------------------------------------------------
# Names and digests ("Pulling manifests": <name>, <reference>; digests)
# --------------------------------------------------------------------------

class TestNamesAndDigests:

    @pytest.mark.parametrize("name", BAD_NAMES)
    def test_bad_names_are_name_invalid(self, registry, name):
        check_error(start_upload(registry, name), 400, "NAME_INVALID")
        check_error(get_manifest(registry, name, "latest"), 400, "NAME_INVALID")
        check_error(get_blob(registry, name, EMPTY_DIGEST), 400, "NAME_INVALID")
        check_error(registry.request("GET", "/v2/%s/tags/list" % name), 400,
                    "NAME_INVALID")

    def test_a_name_of_255_characters_is_accepted(self, registry):
        name = "/".join(["a" * 50] * 5) + "b"
        assert len(name) == 255
        Image("long").push(registry, name, "v1")
        assert get_manifest(registry, name, "v1").status_code == 200

    @pytest.mark.parametrize("name", [
        "team/app/api", "a/manifests/b", "blobs/x", "x/blobs", "x/blobs/uploads",
        "tags/list", "a/referrers/b", "a/tags/list/b", "manifests", "v2",
        "a__b/c-d/e.f/g--h",
    ])
    def test_names_with_slashes_and_keywords(self, registry, name):
        image = Image(name)
        image.push(registry, name, "v1")
        check_manifest(registry, name, "v1", image.body, OCI_MANIFEST)
        check_manifest(registry, name, image.digest, image.body, OCI_MANIFEST)
        check_blob(registry, name, image.config)
        tags = registry.request("GET", "/v2/%s/tags/list" % name)
        assert tags.json() == {"name": name, "tags": ["v1"]}
        catalog = registry.request("GET", "/v2/_catalog").json()
        assert catalog == {"repositories": [name]}
        # A session of such a name: status, chunk, cancel.
        location = open_session(registry, name)
        assert urllib.parse.urlsplit(location).path.startswith(
            "/v2/%s/blobs/uploads/" % name)
        check_upload_accepted(push_chunk(registry, location, b"abc", 0), 3)
        check_upload_accepted(registry.request("GET", location), 3, 204)
        assert registry.request("DELETE", location).status_code == 204
        referrers = registry.request("GET", "/v2/%s/referrers/%s" % (name, image.digest))
        assert referrers.status_code == 200
        assert registry.request("DELETE", "/v2/%s/manifests/v1" % name).status_code == 202

    @pytest.mark.parametrize("digest", BAD_DIGESTS)
    def test_malformed_or_unsupported_digests_are_digest_invalid(self, registry,
                                                                 digest):
        push_blob(registry, "a", b"something")
        quoted = urllib.parse.quote(digest, safe=":+")
        for method in ("GET", "DELETE"):
            check_error(registry.request(method, "/v2/a/blobs/" + quoted), 400,
                        "DIGEST_INVALID")
        check_error(registry.request("HEAD", "/v2/a/blobs/" + quoted), 400)
        if ":" in digest:  # otherwise it is a tag (or neither) in a manifest path
            check_error(registry.request("GET", "/v2/a/manifests/" + quoted), 400,
                        "DIGEST_INVALID")
            check_error(registry.request("DELETE", "/v2/a/manifests/" + quoted),
                        400, "DIGEST_INVALID")
        check_error(registry.request("GET", "/v2/a/referrers/" + quoted), 400,
                    "DIGEST_INVALID")
        check_error(start_upload(registry, "a", digest=digest, data=b"x"), 400,
                    "DIGEST_INVALID")
        check_error(start_upload(registry, "a", mount=digest, **{"from": "b"}),
                    400, "DIGEST_INVALID")
        location = open_session(registry, "a")
        check_error(finish_upload(registry, location, digest, b"x"), 400,
                    "DIGEST_INVALID")

    def test_put_of_an_upload_without_digest_is_400(self, registry):
        location = open_session(registry, "a")
        response = registry.request("PUT", location, data=b"abc")
        check_error(response, 400, "DIGEST_INVALID")

    def test_a_reference_that_is_neither_tag_nor_digest_is_400(self, registry):
        for reference in ("-bad", ".bad", "t" * 129, "a%20b"):
            check_error(registry.request("GET", "/v2/a/manifests/" + reference),
                        400)
            image = Image(reference)
            image.push_blobs(registry, "a")
            check_error(put_manifest(registry, "a", reference, image.body,
                                     OCI_MANIFEST), 400)


# --------------------------------------------------------------------------
# Blob uploads ("Pushing blobs": monolithic, in chunks, mount, cancel)
# --------------------------------------------------------------------------

class TestMonolithicUpload:

    def test_single_post_with_digest(self, registry):
        data = b"monolithic single post"
        digest = digest_of(data)
        response = start_upload(registry, "lib/app", digest=digest, data=data)
        check_blob_created(response, "lib/app", digest)
        check_blob(registry, "lib/app", data)

    def test_single_post_with_a_streamed_body(self, registry):
        pieces = [b"mono", b"lithic ", b"streamed"]
        data = b"".join(pieces)
        response = registry.request("POST", "/v2/a/blobs/uploads/",
                                    params={"digest": digest_of(data)},
                                    data=iter(pieces))
        check_blob_created(response, "a", digest_of(data))
        check_blob(registry, "a", data)

    def test_post_then_put_with_body(self, registry):
        data = b"post then put " * 1000
        digest = digest_of(data)
        response = start_upload(registry, "lib/app")
        check_upload_accepted(response, 0)
        assert "Docker-Upload-UUID" in response.headers
        assert response.headers["Docker-Upload-UUID"] in response.headers["Location"]
        location = registry.url(response.headers["Location"])
        check_blob_created(finish_upload(registry, location, digest, data),
                           "lib/app", digest)
        check_blob(registry, "lib/app", data)
        # The session is closed.
        check_error(registry.request("GET", location), 404, "BLOB_UPLOAD_UNKNOWN")

    def test_blob_larger_than_a_stored_chunk(self, registry):
        data = bytes(range(256)) * (4096 * 3 + 7)   # 3 MiB and some
        digest = push_blob(registry, "big", data)
        check_blob(registry, "big", data, digest)

    def test_pushing_an_existing_blob_again(self, registry):
        data = b"twice"
        push_blob(registry, "a", data)
        push_blob(registry, "a", data)
        push_blob(registry, "b", data)
        check_blob(registry, "a", data)
        check_blob(registry, "b", data)

    def test_digest_mismatch_on_single_post(self, registry):
        data, other = b"the real bytes", b"other bytes"
        response = start_upload(registry, "a", digest=digest_of(other), data=data)
        check_error(response, 400, "DIGEST_INVALID")
        check_error(get_blob(registry, "a", digest_of(other)), 404, "BLOB_UNKNOWN")
        check_error(get_blob(registry, "a", digest_of(data)), 404, "BLOB_UNKNOWN")

    def test_digest_mismatch_on_put(self, registry):
        data, other = b"the real bytes", b"other bytes"
        location = open_session(registry, "a")
        push_chunk(registry, location, data[:4], 0)
        response = finish_upload(registry, location, digest_of(other), data[4:])
        check_error(response, 400, "DIGEST_INVALID")
        check_error(get_blob(registry, "a", digest_of(other)), 404, "BLOB_UNKNOWN")
        check_error(get_blob(registry, "a", digest_of(data)), 404, "BLOB_UNKNOWN")

    def test_sha512_digests(self, registry):
        data = b"a blob addressed by sha512"
        digest = digest_of(data, "sha512")
        check_blob_created(start_upload(registry, "a", digest=digest, data=data),
                           "a", digest)
        check_blob(registry, "a", data, digest)
        # Chunked, closed with a sha512 digest.
        data2 = b"chunked sha512 " * 100
        digest2 = digest_of(data2, "sha512")
        location = open_session(registry, "a")
        response = push_chunk(registry, location, data2[:700], 0)
        check_upload_accepted(response, 700)
        location = registry.url(response.headers["Location"])
        check_blob_created(finish_upload(registry, location, digest2, data2[700:]),
                           "a", digest2)
        check_blob(registry, "a", data2, digest2)
        check_error(finish_upload(registry, open_session(registry, "a"),
                                  digest_of(b"other", "sha512"), b"x"),
                    400, "DIGEST_INVALID")

    def test_the_empty_blob(self, registry):
        assert digest_of(b"") == EMPTY_DIGEST
        check_blob_created(start_upload(registry, "a", digest=EMPTY_DIGEST,
                                        data=b""), "a", EMPTY_DIGEST)
        check_blob(registry, "a", b"", EMPTY_DIGEST)
        location = open_session(registry, "b")
        check_blob_created(finish_upload(registry, location, EMPTY_DIGEST),
                           "b", EMPTY_DIGEST)
        check_blob(registry, "b", b"", EMPTY_DIGEST)
        response = get_blob(registry, "b", EMPTY_DIGEST,
                            headers={"Range": "bytes=0-"})
        check_error(response, 416)
        assert response.headers["Content-Range"] == "bytes */0"


class TestChunkedUpload:

    def test_several_chunks_with_content_range(self, registry):
        data = b"".join(b"chunk %02d|" % number for number in range(30))
        digest = digest_of(data)
        location = open_session(registry, "team/app")
        offset = 0
        for size in (1, 50, 100, 119):
            chunk = data[offset:offset + size]
            response = push_chunk(registry, location, chunk, offset)
            offset += size
            check_upload_accepted(response, offset)
            location = registry.url(response.headers["Location"])
            status = registry.request("GET", location)
            check_upload_accepted(status, offset, 204)
        assert offset == len(data)
        check_blob_created(finish_upload(registry, location, digest),
                           "team/app", digest)
        check_blob(registry, "team/app", data)

    def test_chunk_out_of_order_is_416_with_range(self, registry):
        data = bytes(range(200))
        location = open_session(registry, "a")
        check_upload_accepted(push_chunk(registry, location, data[:100], 0), 100)
        for start in (0, 50, 101, 150):
            response = push_chunk(registry, location, data[start:start + 20], start)
            check_error(response, 416)
            assert response.headers.get("Range") == "0-99"
            assert response.headers.get("Location")
        # The session still holds the first 100 bytes and carries on.
        check_upload_accepted(registry.request("GET", location), 100, 204)
        check_upload_accepted(push_chunk(registry, location, data[100:], 100), 200)
        check_blob_created(finish_upload(registry, location, digest_of(data)),
                           "a", digest_of(data))
        check_blob(registry, "a", data)

    def test_first_chunk_not_at_zero_is_416(self, registry):
        location = open_session(registry, "a")
        response = push_chunk(registry, location, b"abc", 5)
        check_error(response, 416)
        assert response.headers.get("Range") == "0-0"

    def test_patch_without_content_range_appends(self, registry):
        data = b"first part|second part"
        location = open_session(registry, "a")
        check_upload_accepted(push_chunk(registry, location, data[:11]), 11)
        check_upload_accepted(push_chunk(registry, location, data[11:]), len(data))
        check_blob_created(finish_upload(registry, location, digest_of(data)),
                           "a", digest_of(data))
        check_blob(registry, "a", data)

    def test_streamed_patch_with_chunked_transfer_encoding(self, registry):
        pieces = [bytes([number]) * 300_000 for number in range(9)]  # 2.7 MB
        data = b"".join(pieces)
        location = open_session(registry, "docker/style")
        response = stream_chunk(registry, location, pieces)
        assert response.request.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in response.request.headers
        check_upload_accepted(response, len(data))
        location = registry.url(response.headers["Location"])
        check_blob_created(finish_upload(registry, location, digest_of(data)),
                           "docker/style", digest_of(data))
        check_blob(registry, "docker/style", data)

    def test_final_chunk_in_the_closing_put(self, registry):
        data = b"0123456789" * 10
        for with_range in (False, True):
            name = "with-range" if with_range else "without-range"
            location = open_session(registry, name)
            response = push_chunk(registry, location, data[:60], 0)
            check_upload_accepted(response, 60)
            location = registry.url(response.headers["Location"])
            response = finish_upload(registry, location, digest_of(data), data[60:],
                                     start=60 if with_range else None)
            check_blob_created(response, name, digest_of(data))
            check_blob(registry, name, data)

    def test_put_with_a_streamed_body(self, registry):
        pieces = [b"streamed ", b"closing ", b"put"]
        data = b"".join(pieces)
        location = open_session(registry, "a")
        response = registry.request("PUT", location, params={"digest": digest_of(data)},
                                    data=iter(pieces))
        check_blob_created(response, "a", digest_of(data))
        check_blob(registry, "a", data)

    def test_a_patch_that_breaks_off_resumes_from_what_arrived(self, docker_repo,
                                                              registry):
        # "Resumable Push": the connection drops in the middle of a chunk.
        data = bytes(range(256)) * 4
        location = open_session(registry, "a")
        path = urllib.parse.urlsplit(location).path
        (status, headers, body), = exchange(docker_repo.port, plain_request(
            "PATCH", path, data[:300], length=len(data)))
        assert status == 400 and headers["docker-distribution-api-version"]
        status = registry.request("GET", location)
        check_upload_accepted(status, 300, 204)
        check_upload_accepted(push_chunk(registry, location, data[300:], 300),
                              len(data))
        check_blob_created(finish_upload(registry, location, digest_of(data)),
                           "a", digest_of(data))
        check_blob(registry, "a", data)

    def test_upload_status(self, registry):
        location = open_session(registry, "a")
        status = registry.request("GET", location)
        check_upload_accepted(status, 0, 204)
        assert status.content == b""
        assert urllib.parse.urlsplit(registry.url(status.headers["Location"])).path == \
            urllib.parse.urlsplit(location).path
        push_chunk(registry, location, b"12345", 0)
        check_upload_accepted(registry.request("GET", location), 5, 204)

    def test_cancel_an_upload(self, registry):
        location = open_session(registry, "a")
        push_chunk(registry, location, b"some bytes", 0)
        response = registry.request("DELETE", location)
        assert response.status_code == 204
        check_api_version(response)
        check_error(registry.request("GET", location), 404, "BLOB_UPLOAD_UNKNOWN")
        check_error(push_chunk(registry, location, b"more", 10), 404,
                    "BLOB_UPLOAD_UNKNOWN")
        check_error(finish_upload(registry, location, digest_of(b"some bytes")),
                    404, "BLOB_UPLOAD_UNKNOWN")
        check_error(registry.request("DELETE", location), 404, "BLOB_UPLOAD_UNKNOWN")

    def test_unknown_session(self, registry):
        location = "/v2/a/blobs/uploads/" + uuid.uuid4().hex
        check_error(registry.request("GET", location), 404, "BLOB_UPLOAD_UNKNOWN")
        check_error(push_chunk(registry, location, b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
        check_error(finish_upload(registry, location, EMPTY_DIGEST), 404,
                    "BLOB_UPLOAD_UNKNOWN")
        check_error(registry.request("DELETE", location), 404, "BLOB_UPLOAD_UNKNOWN")

    def test_a_session_belongs_to_its_name(self, registry):
        location = open_session(registry, "owner")
        session = urllib.parse.urlsplit(location).path.rsplit("/", 1)[1]
        other = "/v2/intruder/blobs/uploads/" + session
        check_error(registry.request("GET", other), 404, "BLOB_UPLOAD_UNKNOWN")
        check_error(push_chunk(registry, other, b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
        check_upload_accepted(registry.request("GET", location), 0, 204)


class TestMount:

    def test_mount_with_from(self, registry):
        data = b"a layer to mount"
        digest = push_blob(registry, "source/app", data)
        response = start_upload(registry, "target/app", mount=digest,
                                **{"from": "source/app"})
        check_blob_created(response, "target/app", digest)
        check_blob(registry, "target/app", data)
        check_blob(registry, "source/app", data)

    def test_mount_without_from_finds_the_blob_in_this_registry(self, registry):
        data = b"a layer somewhere in this registry"
        digest = push_blob(registry, "somewhere", data)
        response = start_upload(registry, "target", mount=digest)
        check_blob_created(response, "target", digest)
        check_blob(registry, "target", data)

    def test_mount_of_an_unknown_blob_opens_a_session(self, registry):
        data = b"never pushed"
        response = start_upload(registry, "target", mount=digest_of(data),
                                **{"from": "source"})
        check_upload_accepted(response, 0)
        location = registry.url(response.headers["Location"])
        check_blob_created(finish_upload(registry, location, digest_of(data), data),
                           "target", digest_of(data))
        check_blob(registry, "target", data)
        response = start_upload(registry, "target2", mount=digest_of(b"nowhere"))
        check_upload_accepted(response, 0)

    def test_mount_from_a_name_that_lacks_the_blob(self, registry):
        data = b"only in elsewhere"
        digest = push_blob(registry, "elsewhere", data)
        response = start_upload(registry, "target", mount=digest,
                                **{"from": "empty"})
        # The registry MAY look further than `from`; either way it is consistent.
        assert response.status_code in (201, 202)
        if response.status_code == 201:
            check_blob(registry, "target", data)
        else:
            check_upload_accepted(response, 0)
            check_error(get_blob(registry, "target", digest), 404, "BLOB_UNKNOWN")

    def test_no_mount_from_another_depot_repository(self, registry, other_registry):
        data = b"in the other repository only"
        digest = push_blob(other_registry, "source", data)
        response = start_upload(registry, "target", mount=digest,
                                **{"from": "source"})
        check_upload_accepted(response, 0)
        check_upload_accepted(start_upload(registry, "target", mount=digest), 0)
        check_error(get_blob(registry, "target", digest), 404, "BLOB_UNKNOWN")


# --------------------------------------------------------------------------
# Blobs ("Pulling blobs", "Range request support", "Deleting Blobs")
# --------------------------------------------------------------------------

class TestBlobs:

    DATA = bytes(range(256)) * 4 + b"tail"      # 1028 bytes

    @pytest.fixture
    def blob(self, registry):
        return push_blob(registry, "lib/blob", self.DATA)

    def test_head_and_get(self, registry, blob):
        check_blob(registry, "lib/blob", self.DATA, blob)
        head = get_blob(registry, "lib/blob", blob, "HEAD")
        assert head.headers.get("Accept-Ranges") == "bytes"

    @pytest.mark.parametrize("header, start, end", [
        ("bytes=0-9", 0, 9),
        ("bytes=10-19", 10, 19),
        ("bytes=1000-", 1000, 1027),
        ("bytes=1020-5000", 1020, 1027),
        ("bytes=-4", 1024, 1027),
        ("bytes=-5000", 0, 1027),
        ("bytes=1027-1027", 1027, 1027),
    ])
    def test_range(self, registry, blob, header, start, end):
        response = get_blob(registry, "lib/blob", blob, headers={"Range": header})
        assert response.status_code == 206, (response.status_code, response.headers)
        assert response.headers["Content-Range"] == "bytes %d-%d/%d" % (
            start, end, len(self.DATA))
        assert response.content == self.DATA[start:end + 1]
        assert response.headers["Content-Length"] == str(end - start + 1)
        assert response.headers["Docker-Content-Digest"] == blob

    @pytest.mark.parametrize("header", ["bytes=1028-", "bytes=5000-6000", "bytes=-0"])
    def test_range_not_satisfiable(self, registry, blob, header):
        response = get_blob(registry, "lib/blob", blob, headers={"Range": header})
        check_error(response, 416)
        assert response.headers["Content-Range"] == "bytes */%d" % len(self.DATA)

    def test_an_unsatisfiable_range_is_not_cached_as_the_blob(self, registry, blob):
        response = get_blob(registry, "lib/blob", blob,
                            headers={"Range": "bytes=5000-"})
        check_error(response, 416)
        # The error must not be marked fresh for a year with the blob's ETag.
        assert "max-age=31536000" not in response.headers.get("Cache-Control", ""), \
            dict(response.headers)
        assert response.headers.get("ETag") != '"%s"' % blob, dict(response.headers)

    def test_the_same_bytes_under_sha256_and_sha512(self, registry):
        data = b"one content, two digests"
        by256 = push_blob(registry, "a", data)
        by512 = push_blob(registry, "a", data, "sha512")
        check_blob(registry, "a", data, by256)
        check_blob(registry, "a", data, by512)
        assert registry.request("DELETE", "/v2/a/blobs/" + by256).status_code == 202
        check_error(get_blob(registry, "a", by256), 404, "BLOB_UNKNOWN")
        check_blob(registry, "a", data, by512)

    def test_range_across_stored_chunks(self, registry):
        data = bytes(range(251)) * 12_000       # 3 MB, several stored chunks
        digest = push_blob(registry, "big", data)
        start, end = 1024 * 1024 - 10, 2 * 1024 * 1024 + 10
        response = get_blob(registry, "big", digest,
                            headers={"Range": "bytes=%d-%d" % (start, end)})
        assert response.status_code == 206
        assert response.content == data[start:end + 1]

    def test_unknown_blob(self, registry):
        check_error(get_blob(registry, "lib/blob", EMPTY_DIGEST), 404, "BLOB_UNKNOWN")
        check_error(get_blob(registry, "lib/blob", EMPTY_DIGEST, "HEAD"), 404)

    def test_delete_blob(self, registry, blob):
        response = registry.request("DELETE", "/v2/lib/blob/blobs/" + blob)
        assert response.status_code == 202
        check_api_version(response)
        check_error(get_blob(registry, "lib/blob", blob), 404, "BLOB_UNKNOWN")
        check_error(get_blob(registry, "lib/blob", blob, "HEAD"), 404)
        check_error(registry.request("DELETE", "/v2/lib/blob/blobs/" + blob), 404,
                    "BLOB_UNKNOWN")

    def test_delete_in_one_name_leaves_the_others(self, registry, blob):
        start_upload(registry, "lib/other", mount=blob, **{"from": "lib/blob"})
        assert registry.request("DELETE", "/v2/lib/blob/blobs/" + blob).status_code == 202
        check_blob(registry, "lib/other", self.DATA, blob)

    def test_a_blob_of_name_a_is_not_visible_through_name_b(self, registry, blob):
        check_error(get_blob(registry, "lib/other", blob), 404, "BLOB_UNKNOWN")
        check_error(get_blob(registry, "lib/other", blob, "HEAD"), 404)
        check_error(registry.request("DELETE", "/v2/lib/other/blobs/" + blob), 404,
                    "BLOB_UNKNOWN")

    def test_a_blob_is_not_visible_through_another_depot_repository(
            self, registry, other_registry, blob):
        check_error(get_blob(other_registry, "lib/blob", blob), 404, "BLOB_UNKNOWN")
        check_error(get_blob(other_registry, "lib/blob", blob, "HEAD"), 404)
        image = Image("isolated")
        image.push(registry, "lib/blob", "v1")
        check_error(get_manifest(other_registry, "lib/blob", "v1"), 404,
                    "MANIFEST_UNKNOWN")
        check_error(put_manifest(other_registry, "lib/blob", "v1", image.body,
                                 OCI_MANIFEST), 400, "MANIFEST_BLOB_UNKNOWN")


# --------------------------------------------------------------------------
# Manifests ("Pulling manifests", "Pushing Manifests", "Deleting ...")
# --------------------------------------------------------------------------

class TestManifests:

    @pytest.mark.parametrize("media_type", [DOCKER_MANIFEST, OCI_MANIFEST])
    def test_image_manifest_by_tag(self, registry, media_type):
        image = Image("img", media_type=media_type, layers=2)
        response = image.push(registry, "lib/app", "latest")
        assert response.headers.get("Docker-Content-Digest") == image.digest
        check_manifest(registry, "lib/app", "latest", image.body, media_type)
        check_manifest(registry, "lib/app", image.digest, image.body, media_type)

    def test_image_manifest_by_digest_is_not_tagged(self, registry):
        image = Image("bydigest")
        image.push(registry, "lib/app")
        check_manifest(registry, "lib/app", image.digest, image.body, OCI_MANIFEST)
        assert registry.request("GET", "/v2/lib/app/tags/list").json() == \
            {"name": "lib/app", "tags": []}

    def test_manifest_by_sha512_digest(self, registry):
        image = Image("sha512")
        image.push_blobs(registry, "a")
        digest = digest_of(image.body, "sha512")
        response = put_manifest(registry, "a", digest, image.body, OCI_MANIFEST)
        check_manifest_created(response, "a", digest)
        got = get_manifest(registry, "a", digest)
        assert got.status_code == 200 and got.content == image.body
        assert got.headers["Docker-Content-Digest"] == digest

    def test_stored_and_served_byte_exact(self, registry):
        image = Image("exact")
        image.push_blobs(registry, "a")
        document = image.document
        # Odd whitespace, unusual key order, a trailing newline, non-ASCII.
        body = ('{\n\t"layers" :  %s ,\r\n  "config":%s,"schemaVersion":   2,'
                '"mediaType": "%s", "annotations": {"z": "\u00e9t\u00e9 \u2603",'
                ' "a": "1"}  }\n' % (
                    json.dumps(document["layers"], indent=3),
                    json.dumps(document["config"], separators=(" , ", " : ")),
                    OCI_MANIFEST)).encode()
        digest = digest_of(body)
        check_manifest_created(put_manifest(registry, "a", "odd", body, OCI_MANIFEST),
                               "a", digest)
        check_manifest(registry, "a", "odd", body, OCI_MANIFEST)
        check_manifest(registry, "a", digest, body, OCI_MANIFEST)

    def test_content_type_parameters_are_ignored(self, registry):
        image = Image("params")
        image.push_blobs(registry, "a")
        response = put_manifest(registry, "a", "v1", image.body,
                                OCI_MANIFEST + "; charset=utf-8")
        check_manifest_created(response, "a", image.digest)
        check_manifest(registry, "a", "v1", image.body, OCI_MANIFEST)

    def test_media_type_from_the_body_without_content_type(self, registry):
        image = Image("no-content-type", media_type=DOCKER_MANIFEST)
        image.push_blobs(registry, "a")
        response = registry.request("PUT", "/v2/a/manifests/v1", data=image.body)
        assert "Content-Type" not in response.request.headers
        check_manifest_created(response, "a", image.digest)
        check_manifest(registry, "a", "v1", image.body, DOCKER_MANIFEST)

    def test_docker_manifest_list(self, registry):
        children = [Image("amd64", media_type=DOCKER_MANIFEST),
                    Image("arm64", media_type=DOCKER_MANIFEST)]
        for child in children:
            child.push(registry, "multi")
        body = index_of(children, DOCKER_MANIFEST_LIST)
        response = put_manifest(registry, "multi", "latest", body, DOCKER_MANIFEST_LIST)
        check_manifest_created(response, "multi", digest_of(body))
        check_manifest(registry, "multi", "latest", body, DOCKER_MANIFEST_LIST)
        # A docker-only Accept still gets the stored bytes unchanged.
        check_manifest(registry, "multi", "latest", body, DOCKER_MANIFEST_LIST,
                       headers={"Accept": DOCKER_MANIFEST})
        check_manifest(registry, "multi", "latest", body, DOCKER_MANIFEST_LIST,
                       headers={"Accept": "%s, %s;q=0.9, */*;q=0.1"
                                % (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)})

    def test_oci_index_children_are_checked(self, registry):
        present, missing = Image("present"), Image("missing")
        present.push(registry, "multi")
        missing.push_blobs(registry, "multi")
        body = index_of([present, missing])
        check_error(put_manifest(registry, "multi", "latest", body, OCI_INDEX), 400,
                    "MANIFEST_BLOB_UNKNOWN")
        check_error(get_manifest(registry, "multi", "latest"), 404, "MANIFEST_UNKNOWN")
        # A child in another name does not count either.
        missing.push(registry, "elsewhere")
        check_error(put_manifest(registry, "multi", "latest", body, OCI_INDEX), 400,
                    "MANIFEST_BLOB_UNKNOWN")
        missing.push(registry, "multi")
        check_manifest_created(put_manifest(registry, "multi", "latest", body,
                                            OCI_INDEX), "multi", digest_of(body))
        check_manifest(registry, "multi", "latest", body, OCI_INDEX)

    def test_oci_artifact_with_artifact_type(self, registry):
        config = b"{}"
        layer = b"signature payload"
        push_blob(registry, "art", config)
        push_blob(registry, "art", layer)
        document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "artifactType": "application/vnd.example.sig.v1",
                    "config": descriptor(OCI_EMPTY, config),
                    "layers": [descriptor("application/vnd.example.sig.v1+json",
                                          layer)]}
        body = canonical(document)
        check_manifest_created(put_manifest(registry, "art", "sig", body, OCI_MANIFEST),
                               "art", digest_of(body))
        check_manifest(registry, "art", "sig", body, OCI_MANIFEST)

    def test_helm_chart_without_media_type_field(self, registry):
        config = b'{"name":"mychart","version":"0.1.0","apiVersion":"v2"}'
        chart = b"\x1f\x8b fake chart tarball"
        push_blob(registry, "charts/mychart", config)
        push_blob(registry, "charts/mychart", chart)
        # As helm writes it: no mediaType field, a non-image config type.
        body = canonical({
            "schemaVersion": 2,
            "config": descriptor("application/vnd.cncf.helm.config.v1+json", config),
            "layers": [descriptor("application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                                  chart)]})
        response = put_manifest(registry, "charts/mychart", "0.1.0", body, OCI_MANIFEST)
        check_manifest_created(response, "charts/mychart", digest_of(body))
        check_manifest(registry, "charts/mychart", "0.1.0", body, OCI_MANIFEST)

    def test_artifact_without_config(self, registry):
        layer = b"just a layer"
        push_blob(registry, "art", layer)
        body = canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                          "artifactType": "application/vnd.example.thing",
                          "config": descriptor(OCI_EMPTY, b"{}"),
                          "layers": [descriptor(OCI_LAYER, layer)]})
        # config blob {} not pushed yet: rejected, then accepted once it is.
        check_error(put_manifest(registry, "art", "t", body, OCI_MANIFEST), 400,
                    "MANIFEST_BLOB_UNKNOWN")
        push_blob(registry, "art", b"{}")
        check_manifest_created(put_manifest(registry, "art", "t", body, OCI_MANIFEST),
                               "art", digest_of(body))

    def test_foreign_layers_need_not_be_pushed(self, registry):
        config = b'{"os":"windows"}'
        push_blob(registry, "win", config)
        body = canonical({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": descriptor("application/vnd.docker.container.image.v1+json",
                                 config),
            "layers": [descriptor(
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                b"windows base layer", urls=["https://example.com/layer"])]})
        check_manifest_created(put_manifest(registry, "win", "v1", body,
                                            DOCKER_MANIFEST), "win", digest_of(body))
        check_manifest(registry, "win", "v1", body, DOCKER_MANIFEST)

    def test_a_manifest_without_layers(self, registry):
        push_blob(registry, "a", b"{}")
        body = canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                          "artifactType": "application/vnd.example.empty",
                          "config": descriptor(OCI_EMPTY, b"{}"), "layers": []})
        check_manifest_created(put_manifest(registry, "a", "v1", body, OCI_MANIFEST),
                               "a", digest_of(body))
        check_manifest(registry, "a", "v1", body, OCI_MANIFEST)

    @pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
    def test_json_that_is_not_json(self, registry, value):
        # RFC 8259 has no NaN or Infinity; Go clients cannot parse such a
        # manifest, so it must be MANIFEST_INVALID, not stored.
        image = Image("nan")
        image.push_blobs(registry, "a")
        body = image.body[:-1] + b',"annotations":{"x":1},"extra":' + value + b"}"
        check_error(put_manifest(registry, "a", "nan", body, OCI_MANIFEST), 400,
                    "MANIFEST_INVALID")
        check_error(get_manifest(registry, "a", "nan"), 404, "MANIFEST_UNKNOWN")

    def test_digest_mismatch(self, registry):
        image = Image("mismatch")
        image.push_blobs(registry, "a")
        wrong = digest_of(image.body + b" ")
        check_error(put_manifest(registry, "a", wrong, image.body, OCI_MANIFEST), 400,
                    "DIGEST_INVALID")
        check_error(get_manifest(registry, "a", wrong), 404, "MANIFEST_UNKNOWN")
        check_error(get_manifest(registry, "a", image.digest), 404, "MANIFEST_UNKNOWN")

    def test_missing_blobs(self, registry):
        image = Image("missing", layers=2)
        check_error(put_manifest(registry, "a", "v1", image.body, OCI_MANIFEST), 400,
                    "MANIFEST_BLOB_UNKNOWN")
        push_blob(registry, "a", image.config)
        push_blob(registry, "a", image.layers[0])
        errors = check_error(put_manifest(registry, "a", "v1", image.body,
                                          OCI_MANIFEST), 400, "MANIFEST_BLOB_UNKNOWN")
        assert errors
        # Blobs in another name do not count.
        push_blob(registry, "b", image.layers[1])
        check_error(put_manifest(registry, "a", "v1", image.body, OCI_MANIFEST), 400,
                    "MANIFEST_BLOB_UNKNOWN")
        check_error(get_manifest(registry, "a", "v1"), 404, "MANIFEST_UNKNOWN")

    def test_schema1_is_rejected(self, registry):
        body = canonical({
            "schemaVersion": 1, "name": "a", "tag": "v1", "architecture": "amd64",
            "fsLayers": [{"blobSum": EMPTY_DIGEST}],
            "history": [{"v1Compatibility": "{}"}],
            "signatures": [{"header": {"alg": "ES256"}, "signature": "x",
                            "protected": "e30"}]})
        for media_type in (SCHEMA1_SIGNED,
                           "application/vnd.docker.distribution.manifest.v1+json",
                           None):
            check_error(put_manifest(registry, "a", "v1", body, media_type), 400,
                        "MANIFEST_INVALID")
        check_error(get_manifest(registry, "a", "v1"), 404, "MANIFEST_UNKNOWN")

    @pytest.mark.parametrize("body", [
        b"", b"not json", b"{", b"[]", b"null", b'"string"', b"\xff\xfe{}",
        b'{"schemaVersion": 2, "mediaType": "%s", "config": 5}' % OCI_MANIFEST.encode(),
        b'{"schemaVersion": 2, "mediaType": "%s", "layers": []}' % OCI_MANIFEST.encode(),
        b'{"schemaVersion": 2, "mediaType": "%s", "manifests": {}}' % OCI_INDEX.encode(),
        b'{"schemaVersion": 2, "mediaType": "%s", "manifests": [{"digest": "x"}]}'
        % OCI_INDEX.encode(),
        b'{"schemaVersion": 3, "mediaType": "%s"}' % OCI_INDEX.encode(),
        b'{"schemaVersion": 2, "mediaType": "%s", "config": {"mediaType": "x/y",'
        b' "digest": "%s", "size": -1}}' % (OCI_MANIFEST.encode(), EMPTY_DIGEST.encode()),
        b'{"schemaVersion": 2, "mediaType": "%s", "config": {"mediaType": "x/y",'
        b' "digest": "%s", "size": 0}, "subject": "%s"}'
        % (OCI_MANIFEST.encode(), EMPTY_DIGEST.encode(), EMPTY_DIGEST.encode()),
    ], ids=["empty", "text", "truncated", "array", "null", "string", "not-utf8",
            "config-not-object", "no-config", "manifests-not-list", "bad-child",
            "schema3", "negative-size", "subject-not-descriptor"])
    def test_invalid_manifests(self, registry, body):
        media_type = OCI_INDEX if b"manifests" in body or b"schemaVersion\": 3" in body \
            else OCI_MANIFEST
        check_error(put_manifest(registry, "a", "v1", body, media_type), 400,
                    "MANIFEST_INVALID")

    def test_media_type_field_differs_from_content_type(self, registry):
        image = Image("differs", media_type=DOCKER_MANIFEST)
        image.push_blobs(registry, "a")
        check_error(put_manifest(registry, "a", "v1", image.body, OCI_MANIFEST), 400,
                    "MANIFEST_INVALID")

    @pytest.mark.parametrize("opener, closer", [(b'{"a":', b"}"), (b"[", b"]")])
    def test_deeply_nested_json(self, registry, opener, closer):
        depth = 10_000
        body = (b'{"schemaVersion":2,"mediaType":"%s","config":' % OCI_MANIFEST.encode()
                + opener * depth + b"1" + closer * depth + b"}")
        check_error(put_manifest(registry, "a", "deep", body, OCI_MANIFEST), 400,
                    "MANIFEST_INVALID")
        # The registry is still fine.
        assert registry.request("GET", "/v2/").status_code == 200

    def test_four_mib_manifest_is_accepted(self, registry):
        image = Image("big")
        image.push_blobs(registry, "a")
        limit = 4 * 1024 * 1024
        document = dict(image.document, annotations={"pad": ""})
        padding = limit - len(canonical(document))
        document["annotations"]["pad"] = "x" * padding
        body = canonical(document)
        assert len(body) == limit
        check_manifest_created(put_manifest(registry, "a", "big", body, OCI_MANIFEST),
                               "a", digest_of(body))
        check_manifest(registry, "a", "big", body, OCI_MANIFEST)

    def test_manifest_over_four_mib_is_413(self, registry):
        image = Image("toobig")
        image.push_blobs(registry, "a")
        document = dict(image.document, annotations={"pad": ""})
        document["annotations"]["pad"] = "x" * (4 * 1024 * 1024
                                                - len(canonical(document)) + 1)
        body = canonical(document)
        assert len(body) == 4 * 1024 * 1024 + 1
        check_error(put_manifest(registry, "a", "big", body, OCI_MANIFEST), 413)
        check_error(get_manifest(registry, "a", "big"), 404, "MANIFEST_UNKNOWN")
        # Streamed (no Content-Length) too.
        response = registry.request(
            "PUT", "/v2/a/manifests/big2", headers={"Content-Type": OCI_MANIFEST},
            data=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]))
        check_error(response, 413)

    def test_a_tag_moves_to_a_manifest_of_another_media_type(self, registry):
        image = Image("single", media_type=DOCKER_MANIFEST)
        image.push(registry, "app", "latest")
        check_manifest(registry, "app", "latest", image.body, DOCKER_MANIFEST)
        other = Image("other")
        other.push(registry, "app")
        index = index_of([image, other])
        check_manifest_created(put_manifest(registry, "app", "latest", index,
                                            OCI_INDEX), "app", digest_of(index))
        check_manifest(registry, "app", "latest", index, OCI_INDEX)
        check_manifest(registry, "app", image.digest, image.body, DOCKER_MANIFEST)
        # And back.
        image.push(registry, "app", "latest")
        check_manifest(registry, "app", "latest", image.body, DOCKER_MANIFEST)

    def test_unknown_manifest(self, registry):
        Image("known").push(registry, "a", "v1")
        check_error(get_manifest(registry, "a", "v2"), 404, "MANIFEST_UNKNOWN")
        check_error(get_manifest(registry, "a", "v2", "HEAD"), 404)
        check_error(get_manifest(registry, "a", EMPTY_DIGEST), 404, "MANIFEST_UNKNOWN")
        check_error(get_manifest(registry, "nothing", "v1"), 404)

    def test_a_manifest_of_name_a_is_not_visible_through_name_b(self, registry):
        image = Image("scoped")
        image.push(registry, "a", "v1")
        image.push_blobs(registry, "b")
        check_error(get_manifest(registry, "b", "v1"), 404, "MANIFEST_UNKNOWN")
        check_error(get_manifest(registry, "b", image.digest), 404, "MANIFEST_UNKNOWN")
        check_error(registry.request("DELETE", "/v2/b/manifests/" + image.digest), 404,
                    "MANIFEST_UNKNOWN")
        check_manifest(registry, "a", "v1", image.body, OCI_MANIFEST)

    def test_delete_by_tag_removes_the_tag_only(self, registry):
        image = Image("tagged")
        image.push(registry, "a", "v1")
        put_manifest(registry, "a", "v2", image.body, OCI_MANIFEST)
        response = registry.request("DELETE", "/v2/a/manifests/v1")
        assert response.status_code == 202
        check_api_version(response)
        check_error(get_manifest(registry, "a", "v1"), 404, "MANIFEST_UNKNOWN")
        check_manifest(registry, "a", "v2", image.body, OCI_MANIFEST)
        check_manifest(registry, "a", image.digest, image.body, OCI_MANIFEST)
        assert registry.request("GET", "/v2/a/tags/list").json()["tags"] == ["v2"]
        check_error(registry.request("DELETE", "/v2/a/manifests/v1"), 404,
                    "MANIFEST_UNKNOWN")

    def test_delete_by_digest_removes_its_tags(self, registry):
        image, other = Image("deleted"), Image("kept")
        image.push(registry, "a", "v1")
        put_manifest(registry, "a", "v2", image.body, OCI_MANIFEST)
        other.push(registry, "a", "v3")
        response = registry.request("DELETE", "/v2/a/manifests/" + image.digest)
        assert response.status_code == 202
        for reference in ("v1", "v2", image.digest):
            check_error(get_manifest(registry, "a", reference), 404, "MANIFEST_UNKNOWN")
            check_error(get_manifest(registry, "a", reference, "HEAD"), 404)
        assert registry.request("GET", "/v2/a/tags/list").json()["tags"] == ["v3"]
        check_error(registry.request("DELETE", "/v2/a/manifests/" + image.digest), 404,
                    "MANIFEST_UNKNOWN")
        # The blobs stay; the manifest can be pushed again.
        image.push(registry, "a", "v1")
        check_manifest(registry, "a", "v1", image.body, OCI_MANIFEST)


# --------------------------------------------------------------------------
# Content Discovery: catalog and tags
# --------------------------------------------------------------------------

class TestDiscovery:

    NAMES = ["z", "b", "a/b", "a", "c/d/e", "a-b", "a.b", "b0"]

    def push_names(self, registry):
        image = Image("catalog")
        for name in self.NAMES:
            image.push(registry, name, "v1")
        return sorted(self.NAMES)

    def test_catalog_sorted(self, registry):
        assert registry.request("GET", "/v2/_catalog").json() == {"repositories": []}
        names = self.push_names(registry)
        response = registry.request("GET", "/v2/_catalog")
        assert response.status_code == 200
        check_api_version(response)
        assert response.json() == {"repositories": names}
        assert "Link" not in response.headers

    def test_catalog_n_last_and_link(self, registry):
        names = self.push_names(registry)
        first = registry.request("GET", "/v2/_catalog", params={"n": 3})
        assert first.json()["repositories"] == names[:3]
        assert first.links["next"]["url"]
        after = registry.request("GET", "/v2/_catalog",
                                 params={"n": 2, "last": names[2]})
        assert after.json()["repositories"] == names[3:5]
        # A `last` that is no name.
        missing = registry.request("GET", "/v2/_catalog", params={"last": "a/c"})
        assert missing.json()["repositories"] == [n for n in names if n > "a/c"]
        zero = registry.request("GET", "/v2/_catalog", params={"n": 0})
        assert zero.status_code == 200 and zero.json()["repositories"] == []
        assert "Link" not in zero.headers
        everything = registry.request("GET", "/v2/_catalog", params={"n": 100})
        assert everything.json()["repositories"] == names
        assert "Link" not in everything.headers

    @pytest.mark.parametrize("n", [1, 2, 3, 7, 8])
    def test_catalog_following_link_to_the_end(self, registry, n):
        names = self.push_names(registry)
        pages = follow_pages(registry, "/v2/_catalog", {"n": n})
        seen = []
        for page in pages:
            listed = page.json()["repositories"]
            assert 0 < len(listed) <= n or (listed == [] and page is pages[-1])
            seen += listed
        assert seen == names
        assert 'rel="next"' not in pages[-1].headers.get("Link", "")
        for page in pages[:-1]:
            assert page.headers["Link"].endswith('; rel="next"')

    TAGS = ["v1", "latest", "1.0", "V2", "a_b", "1.0-rc1", "_under", "z" * 128]

    def push_tags(self, registry):
        image = Image("tags")
        image.push(registry, "lib/app", self.TAGS[0])
        for tag in self.TAGS[1:]:
            check_manifest_created(put_manifest(registry, "lib/app", tag, image.body,
                                                OCI_MANIFEST), "lib/app", image.digest)
        return sorted(self.TAGS)

    def test_tags_sorted(self, registry):
        tags = self.push_tags(registry)
        response = registry.request("GET", "/v2/lib/app/tags/list")
        assert response.status_code == 200
        check_api_version(response)
        assert response.json() == {"name": "lib/app", "tags": tags}

    def test_tags_n_last_and_link(self, registry):
        tags = self.push_tags(registry)
        first = registry.request("GET", "/v2/lib/app/tags/list", params={"n": 2})
        assert first.json() == {"name": "lib/app", "tags": tags[:2]}
        assert first.links["next"]["url"]
        after = registry.request("GET", "/v2/lib/app/tags/list",
                                 params={"n": 3, "last": tags[1]})
        assert after.json()["tags"] == tags[2:5]
        only_last = registry.request("GET", "/v2/lib/app/tags/list",
                                     params={"last": tags[4]})
        assert only_last.json()["tags"] == tags[5:]
        missing = registry.request("GET", "/v2/lib/app/tags/list",
                                   params={"last": "m"})
        assert missing.json()["tags"] == [tag for tag in tags if tag > "m"]
        beyond = registry.request("GET", "/v2/lib/app/tags/list",
                                  params={"last": "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"
                                          "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"
                                          "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"
                                          "zzzzzzz"})
        assert beyond.status_code == 200 and beyond.json()["tags"] == []
        zero = registry.request("GET", "/v2/lib/app/tags/list", params={"n": 0})
        assert zero.status_code == 200 and zero.json()["tags"] == []
        assert "Link" not in zero.headers

    @pytest.mark.parametrize("n", [1, 3, 8])
    def test_tags_following_link_to_the_end(self, registry, n):
        tags = self.push_tags(registry)
        pages = follow_pages(registry, "/v2/lib/app/tags/list", {"n": n})
        seen = []
        for page in pages:
            assert page.json()["name"] == "lib/app"
            assert len(page.json()["tags"]) <= n
            seen += page.json()["tags"]
        assert seen == tags
        assert "next" not in pages[-1].links

    def test_tags_of_an_unknown_name(self, registry):
        Image("known").push(registry, "known", "v1")
        check_error(registry.request("GET", "/v2/unknown/tags/list"), 404,
                    "NAME_UNKNOWN")
        check_error(registry.request("GET", "/v2/kno/tags/list"), 404, "NAME_UNKNOWN")

    def test_tags_of_a_name_with_only_untagged_manifests(self, registry):
        Image("untagged").push(registry, "lib/app")
        response = registry.request("GET", "/v2/lib/app/tags/list")
        assert response.status_code == 200
        assert response.json() == {"name": "lib/app", "tags": []}


# --------------------------------------------------------------------------
# Content Discovery: referrers ("Pushing Manifests with Subject",
# "Listing Referrers")
# --------------------------------------------------------------------------

def referrer_of(subject, artifact_type="application/vnd.example.sbom.v1",
                annotations=None, label="sbom", **fields):
    """An OCI artifact manifest whose subject is the Image ``subject``."""
    document = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_EMPTY, b"{}"),
        "layers": [descriptor("application/vnd.example+json", label.encode())],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest,
                    "size": len(subject.body)},
        **fields}
    if artifact_type is not None:
        document["artifactType"] = artifact_type
    if annotations:
        document["annotations"] = annotations
    return canonical(document)


class TestReferrers:

    def push_referrer(self, registry, name, subject, reference=None, **kwargs):
        body = referrer_of(subject, **kwargs)
        push_blob(registry, name, b"{}")
        push_blob(registry, name, kwargs.get("label", "sbom").encode())
        response = put_manifest(registry, name, reference or digest_of(body), body,
                                OCI_MANIFEST)
        check_manifest_created(response, name, digest_of(body))
        assert response.headers.get("OCI-Subject") == subject.digest
        return body

    def referrers(self, registry, name, digest, **params):
        response = registry.request("GET", "/v2/%s/referrers/%s" % (name, digest),
                                    params=params or None)
        assert response.status_code == 200, (response.status_code, response.text)
        check_api_version(response)
        assert response.headers["Content-Type"] == OCI_INDEX
        index = response.json()
        assert index["schemaVersion"] == 2
        assert index["mediaType"] == OCI_INDEX
        return response, index["manifests"]

    def test_subject_that_is_missing_is_accepted(self, registry):
        subject = Image("not pushed")
        body = self.push_referrer(registry, "a", subject)
        check_manifest(registry, "a", digest_of(body), body, OCI_MANIFEST)
        response, manifests = self.referrers(registry, "a", subject.digest)
        assert [m["digest"] for m in manifests] == [digest_of(body)]

    def test_listing_with_artifact_type_and_annotations(self, registry):
        subject = Image("subject")
        subject.push(registry, "a", "v1")
        annotations = {"org.opencontainers.image.created": "2024-01-01T00:00:00Z",
                       "org.example.sbom.format": "json"}
        sbom = self.push_referrer(registry, "a", subject, annotations=annotations)
        sig = self.push_referrer(registry, "a", subject, label="sig",
                                 artifact_type="application/vnd.example.sig.v1")
        response, manifests = self.referrers(registry, "a", subject.digest)
        assert "OCI-Filters-Applied" not in response.headers
        by_digest = {m["digest"]: m for m in manifests}
        assert set(by_digest) == {digest_of(sbom), digest_of(sig)}
        assert by_digest[digest_of(sbom)] == {
            "mediaType": OCI_MANIFEST, "digest": digest_of(sbom), "size": len(sbom),
            "artifactType": "application/vnd.example.sbom.v1",
            "annotations": annotations}
        assert by_digest[digest_of(sig)] == {
            "mediaType": OCI_MANIFEST, "digest": digest_of(sig), "size": len(sig),
            "artifactType": "application/vnd.example.sig.v1"}

    def test_artifact_type_defaults_to_the_config_media_type(self, registry):
        subject = Image("subject")
        subject.push(registry, "a")
        body = self.push_referrer(registry, "a", subject, artifact_type=None)
        _, manifests = self.referrers(registry, "a", subject.digest)
        assert manifests == [{"mediaType": OCI_MANIFEST, "digest": digest_of(body),
                              "size": len(body), "artifactType": OCI_EMPTY}]

    def test_empty_artifact_type_defaults_to_the_config_media_type(self, registry):
        # "If the artifactType is empty or missing in the image manifest, the
        # value of artifactType MUST be set to the config descriptor mediaType."
        subject = Image("subject")
        body = self.push_referrer(registry, "a", subject, artifact_type="")
        _, manifests = self.referrers(registry, "a", subject.digest)
        assert [m.get("artifactType") for m in manifests] == [OCI_EMPTY], manifests
        assert manifests[0]["digest"] == digest_of(body)

    def test_index_referrer(self, registry):
        subject = Image("subject")
        child = Image("child")
        child.push(registry, "a")
        document = json.loads(index_of([child]))
        document["subject"] = {"mediaType": OCI_MANIFEST, "digest": subject.digest,
                               "size": len(subject.body)}
        document["annotations"] = {"k": "v"}
        body = canonical(document)
        response = put_manifest(registry, "a", "idx", body, OCI_INDEX)
        check_manifest_created(response, "a", digest_of(body))
        assert response.headers.get("OCI-Subject") == subject.digest
        _, manifests = self.referrers(registry, "a", subject.digest)
        # An index without artifactType: the descriptor has none.
        assert manifests == [{"mediaType": OCI_INDEX, "digest": digest_of(body),
                              "size": len(body), "annotations": {"k": "v"}}]

    def test_filter_by_artifact_type(self, registry):
        subject = Image("subject")
        subject.push(registry, "a")
        sbom = self.push_referrer(registry, "a", subject)
        self.push_referrer(registry, "a", subject, label="sig",
                           artifact_type="application/vnd.example.sig.v1")
        response, manifests = self.referrers(
            registry, "a", subject.digest,
            artifactType="application/vnd.example.sbom.v1")
        assert response.headers.get("OCI-Filters-Applied") == "artifactType"
        assert [m["digest"] for m in manifests] == [digest_of(sbom)]
        response, manifests = self.referrers(registry, "a", subject.digest,
                                             artifactType="application/none")
        assert response.headers.get("OCI-Filters-Applied") == "artifactType"
        assert manifests == []

    def test_no_referrers_is_an_empty_index(self, registry):
        subject = Image("lonely")
        subject.push(registry, "a", "v1")
        response, manifests = self.referrers(registry, "a", subject.digest)
        assert manifests == []
        # An unknown digest, and a name with nothing in it, too.
        _, manifests = self.referrers(registry, "a", EMPTY_DIGEST)
        assert manifests == []
        _, manifests = self.referrers(registry, "nothing/here", subject.digest)
        assert manifests == []

    def test_referrers_are_scoped_to_the_name(self, registry):
        subject = Image("subject")
        self.push_referrer(registry, "a", subject)
        _, manifests = self.referrers(registry, "b", subject.digest)
        assert manifests == []

    def test_deleting_the_referrer_removes_it(self, registry):
        subject = Image("subject")
        subject.push(registry, "a", "v1")
        sbom = self.push_referrer(registry, "a", subject)
        sig = self.push_referrer(registry, "a", subject, label="sig",
                                 artifact_type="application/vnd.example.sig.v1")
        assert registry.request("DELETE", "/v2/a/manifests/" + digest_of(sbom)) \
            .status_code == 202
        _, manifests = self.referrers(registry, "a", subject.digest)
        assert [m["digest"] for m in manifests] == [digest_of(sig)]
        # A tagged referrer deleted by tag only stays a referrer.
        tagged = self.push_referrer(registry, "a", subject, reference="att",
                                    label="att", artifact_type="application/att")
        assert registry.request("DELETE", "/v2/a/manifests/att").status_code == 202
        _, manifests = self.referrers(registry, "a", subject.digest)
        assert {m["digest"] for m in manifests} == {digest_of(sig), digest_of(tagged)}


# --------------------------------------------------------------------------
# The connection after an error: bodies must not be left on the wire
# --------------------------------------------------------------------------

class TestConnection:
    """An error answered before the request body was read must not leave
    that body on a kept-alive connection, where it would be parsed as the
    next request (docker and podman stream layers with chunked PATCHes)."""

    NEXT = b"GET /v2/ HTTP/1.1\r\nHost: registry\r\n\r\n"

    def error_requests(self, registry):
        location = open_session(registry, "a")
        push_chunk(registry, location, b"x" * 100, 0)
        path = urllib.parse.urlsplit(location).path
        return {
            "416 chunk out of order": chunked_request(
                "PATCH", path, b"y" * 4096, [("Content-Range", "5-4100")]),
            "404 unknown session": chunked_request(
                "PATCH", "/v2/a/blobs/uploads/" + uuid.uuid4().hex, b"y" * 4096),
            "400 bad name": chunked_request(
                "POST", "/v2/A/blobs/uploads/?digest=" + EMPTY_DIGEST, b"y" * 4096),
            "400 bad digest": chunked_request(
                "PUT", path + "?digest=sha256:abc", b"y" * 4096),
            "405 method": chunked_request("POST", "/v2/", b"y" * 4096),
        }

    @pytest.mark.parametrize("case", ["416 chunk out of order", "404 unknown session",
                                      "400 bad name", "400 bad digest", "405 method"])
    def test_the_next_request_after_an_error_to_a_chunked_body(
            self, docker_repo, registry, case):
        request = self.error_requests(registry)[case]
        responses = exchange(docker_repo.port, request + self.NEXT)
        first = responses[0]
        assert first[0] == int(case.split()[0]), responses
        # Either the connection is closed after the error (the client then
        # opens a new one) or the next request gets its own answer.
        if len(responses) > 1:
            status, headers, body = responses[1]
            assert (status, body) == (200, b"{}"), responses[1]
            assert headers.get("docker-distribution-api-version") == "registry/2.0"
        assert len(responses) <= 2, responses

    def test_the_next_request_after_an_error_to_a_sized_body(self, docker_repo):
        request = plain_request("PATCH", "/v2/a/blobs/uploads/" + uuid.uuid4().hex,
                                b"GET /v2/_catalog HTTP/1.1\r\nHost: x\r\n\r\n")
        responses = exchange(docker_repo.port, request + self.NEXT)
        assert responses[0][0] == 404
        assert [status for status, _, _ in responses[1:]] in ([], [200]), responses

    def test_a_client_session_survives_an_error_to_a_streamed_patch(self, registry):
        # What docker sees when its streamed PATCH meets an expired session.
        for _attempt in range(3):
            response = stream_chunk(registry, "/v2/a/blobs/uploads/" + uuid.uuid4().hex,
                                    [b"y" * 10])
            check_error(response, 404, "BLOB_UPLOAD_UNKNOWN")
            response = registry.request("GET", "/v2/")
            assert response.status_code == 200, (response.status_code, response.text)
            check_api_version(response)


# --------------------------------------------------------------------------
# Upload sessions live in the store: restart and expiry
# --------------------------------------------------------------------------

class TestSessionsInTheStore:

    def test_upload_session_survives_a_restart(self, fresh_depot):
        port = free_port()
        create_docker_repo(fresh_depot, http_port=port)
        client = Client("http://127.0.0.1:%d" % port)
        data = bytes(range(256)) * 5000        # 1.28 MB: a stored chunk and more
        try:
            location = open_session(client, "lib/app")
            response = push_chunk(client, location, data[:700_000], 0)
            check_upload_accepted(response, 700_000)
            location = client.url(response.headers["Location"])
            fresh_depot.restart()
            check_upload_accepted(client.request("GET", location), 700_000, 204)
            response = push_chunk(client, location, data[700_000:1_000_000], 700_000)
            check_upload_accepted(response, 1_000_000)
            response = finish_upload(client, location, digest_of(data),
                                     data[1_000_000:], start=1_000_000)
            check_blob_created(response, "lib/app", digest_of(data))
            check_blob(client, "lib/app", data)
        finally:
            client.close()

    def test_killed_depot_keeps_sessions_and_blobs(self, fresh_depot):
        port = free_port()
        create_docker_repo(fresh_depot, http_port=port)
        client = Client("http://127.0.0.1:%d" % port)
        try:
            stored = push_blob(client, "a", b"acknowledged before the kill")
            location = open_session(client, "a")
            check_upload_accepted(push_chunk(client, location, b"12345", 0), 5)
            fresh_depot.kill()
            fresh_depot.start()
            check_blob(client, "a", b"acknowledged before the kill", stored)
            check_upload_accepted(client.request("GET", location), 5, 204)
        finally:
            client.close()

    def test_idle_sessions_expire(self, tmp_path):
        # The janitor checks every min(60 s, max(expiry / 2, 1 s)): with an
        # expiry of 2 s, an idle session goes within a few seconds.
        process = DepotProcess(tmp_path / "data", extra=["--upload-expiry", "2"])
        process.start()
        client = None
        try:
            port = free_port()
            create_docker_repo(process, http_port=port)
            client = Client("http://127.0.0.1:%d" % port)
            location = open_session(client, "a")
            check_upload_accepted(push_chunk(client, location, b"idle", 0), 4)
            stored = push_blob(client, "a", b"finished blobs do not expire")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                response = client.request("GET", location)
                if response.status_code != 204:
                    break
                time.sleep(0.25)
            check_error(response, 404, "BLOB_UPLOAD_UNKNOWN")
            check_error(push_chunk(client, location, b"more", 4), 404,
                        "BLOB_UPLOAD_UNKNOWN")
            check_blob(client, "a", b"finished blobs do not expire", stored)
        finally:
            if client is not None:
                client.close()
            process.stop()


# --------------------------------------------------------------------------
# Where the registry is served: the main port, an HTTPS port
# --------------------------------------------------------------------------

class TestServing:

    def test_registry_on_the_main_port(self, fresh_depot):
        name = create_docker_repo(fresh_depot, http_port=0, https_port=0)
        shown = fresh_depot.api("GET", "/repositories/" + name).json()
        assert shown["registry"]["main"]["url"].endswith(":%d/v2/" % fresh_depot.port)
        client = Client(fresh_depot.url, verify=fresh_depot.cert)
        try:
            response = client.request("GET", "/v2/")
            assert response.status_code == 200
            check_api_version(response)
            image = Image("main")
            image.push(client, "lib/app", "v1")
            check_manifest(client, "lib/app", "v1", image.body, OCI_MANIFEST)
            check_error(client.request("GET", "/v2/nothing/here"), 404)
            # The management API still answers beside it.
            assert fresh_depot.api("GET", "/health").status_code == 200
            # ...and after a restart the registry is still there.
            fresh_depot.restart()
            check_manifest(client, "lib/app", "v1", image.body, OCI_MANIFEST)
        finally:
            client.close()

    def test_moving_a_registry_to_the_main_port_and_back(self, fresh_depot):
        port = free_port()
        name = create_docker_repo(fresh_depot, http_port=port)
        own = Client("http://127.0.0.1:%d" % port)
        main = Client(fresh_depot.url, verify=fresh_depot.cert)
        try:
            data = b"moves with its registry"
            digest = push_blob(own, "a", data)
            response = fresh_depot.api("PATCH", "/repositories/" + name, json={
                "config": {"http_port": 0, "https_port": 0}})
            assert response.status_code == 200, response.text
            check_blob(main, "a", data, digest)
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get("http://127.0.0.1:%d/v2/" % port, timeout=10)
            other = free_port()
            response = fresh_depot.api("PATCH", "/repositories/" + name, json={
                "config": {"http_port": other}})
            assert response.status_code == 200, response.text
            check_error(main.request("GET", "/v2/"), 404)
            check_blob(Client("http://127.0.0.1:%d" % other), "a", data, digest)
        finally:
            own.close()
            main.close()

    def test_a_registry_port_cannot_be_the_main_port(self, fresh_depot):
        for config in ({"https_port": fresh_depot.port},
                       {"http_port": fresh_depot.port}):
            response = fresh_depot.api("POST", "/repositories", json={
                "name": "clash", "type": "docker", "config": config})
            assert response.status_code == 409, response.text
        assert fresh_depot.api("GET", "/health").status_code == 200

    def test_a_recreated_repository_starts_empty(self, depot):
        port = free_port()
        name = create_docker_repo(depot, http_port=port)
        client = Client("http://127.0.0.1:%d" % port)
        try:
            image = Image("gone")
            image.push(client, "a", "v1")
            location = open_session(client, "a")
            assert depot.api("DELETE", "/repositories/" + name).status_code == 204
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get("http://127.0.0.1:%d/v2/" % port, timeout=10)
            depot.create_repository(name, "docker", config={"http_port": port})
            client.close()
            client = Client("http://127.0.0.1:%d" % port)
            assert client.request("GET", "/v2/_catalog").json() == {"repositories": []}
            check_error(get_manifest(client, "a", "v1"), 404, "MANIFEST_UNKNOWN")
            check_error(get_blob(client, "a", digest_of(image.config)), 404,
                        "BLOB_UNKNOWN")
            check_error(client.request("GET", location), 404, "BLOB_UPLOAD_UNKNOWN")
        finally:
            client.close()
            depot.api("DELETE", "/repositories/" + name)

    def test_main_port_without_registry_answers_404_json(self, fresh_depot):
        response = fresh_depot.request("GET", "/v2/")
        check_error(response, 404)

    def test_a_second_main_port_registry_is_409(self, fresh_depot):
        first = create_docker_repo(fresh_depot, http_port=0, https_port=0)
        response = fresh_depot.api("POST", "/repositories", json={
            "name": "second", "type": "docker",
            "config": {"http_port": 0, "https_port": 0}})
        assert response.status_code == 409, response.text
        assert first in response.json()["error"]
        # Once the first is gone, the main port is free again.
        assert fresh_depot.api("DELETE", "/repositories/" + first).status_code == 204
        check_error(fresh_depot.request("GET", "/v2/"), 404)
        create_docker_repo(fresh_depot, http_port=0, https_port=0)
        assert fresh_depot.request("GET", "/v2/").status_code == 200

    def test_https_port_serves_the_registry_with_depots_certificate(self, depot):
        port = free_port()
        name = create_docker_repo(depot, https_port=port)
        client = Client("https://127.0.0.1:%d" % port, verify=depot.cert)
        try:
            response = client.request("GET", "/v2/")
            assert response.status_code == 200
            check_api_version(response)
            image = Image("tls")
            image.push(client, "secure/app", "v1")
            check_manifest(client, "secure/app", "v1", image.body, OCI_MANIFEST)
            with pytest.raises(requests.exceptions.SSLError):
                requests.get("https://127.0.0.1:%d/v2/" % port, timeout=10)
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get("http://127.0.0.1:%d/v2/" % port, timeout=10)
        finally:
            client.close()
            depot.api("DELETE", "/repositories/" + name)

    def test_http_and_https_ports_serve_the_same_registry(self, depot):
        http_port, https_port = free_port(), free_port()
        name = create_docker_repo(depot, http_port=http_port, https_port=https_port)
        plain = Client("http://127.0.0.1:%d" % http_port)
        secure = Client("https://127.0.0.1:%d" % https_port, verify=depot.cert)
        try:
            image = Image("both")
            image.push(plain, "a", "v1")
            check_manifest(secure, "a", "v1", image.body, OCI_MANIFEST)
            check_blob(secure, "a", image.config)
        finally:
            plain.close()
            secure.close()
            depot.api("DELETE", "/repositories/" + name)
