"""The management API, start-up, settings, TLS and the server life cycle."""

import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time

import apsw
import pytest
import requests
from cryptography import x509

from conftest import DEPOT, DepotProcess, free_port


def check_error(answer, status, *words):
    """The answer is ``status`` with a JSON ``{"error": ...}`` naming ``words``."""
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error"}, body
    for word in words:
        assert word in body["error"], body
    return body["error"]


# Health, listing, unknown routes ---------------------------------------------

def test_health_reports_version_and_database(depot):
    answer = depot.api("GET", "/health")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert body["version"]


def test_list_is_empty_then_sorted_by_name(fresh_depot):
    assert fresh_depot.api("GET", "/repositories").json() == []
    for name in ("zeta", "alpha", "mid"):
        fresh_depot.create_repository(name, "raw")
    names = [repo["name"] for repo in
             fresh_depot.api("GET", "/repositories").json()]
    assert names == ["alpha", "mid", "zeta"]


def test_unknown_path_is_json_404(depot):
    check_error(depot.api("GET", "/nothing-here"), 404, "not found")
    check_error(depot.request("GET", "/"), 404)


def test_wrong_method_is_json_405(depot):
    check_error(depot.api("PUT", "/repositories"), 405, "PUT")
    check_error(depot.api("POST", "/health"), 405)


# Creating repositories ---------------------------------------------------------

def test_create_answers_201_with_location_and_record(depot):
    answer = depot.api("POST", "/repositories", json={
        "name": "created-raw", "type": "raw", "description": "build outputs"})
    assert answer.status_code == 201, answer.text
    assert answer.headers["Location"] == "/api/v1/repositories/created-raw"
    body = answer.json()
    assert body["name"] == "created-raw" and body["type"] == "raw"
    assert body["description"] == "build outputs" and body["config"] == {}
    assert body["created_at"].endswith("Z") and body["updated_at"]
    shown = depot.api("GET", "/repositories/created-raw").json()
    assert shown["content"] == {"files": 0, "bytes": 0, "stored_bytes": 0}
    assert depot.api("DELETE", "/repositories/created-raw").status_code == 204


def test_taken_name_is_409(depot, raw_repo):
    check_error(depot.api("POST", "/repositories",
                          json={"name": raw_repo, "type": "raw"}), 409,
                raw_repo)


@pytest.mark.parametrize("body, field", [
    ({"type": "raw"}, "name"),
    ({"name": "", "type": "raw"}, "name"),
    ({"name": "Upper", "type": "raw"}, "name"),
    ({"name": "-dash-first", "type": "raw"}, "name"),
    ({"name": "has space", "type": "raw"}, "name"),
    ({"name": "a" * 65, "type": "raw"}, "name"),
    ({"name": 7, "type": "raw"}, "name"),
    ({"name": "ok"}, "type"),
    ({"name": "ok", "type": "maven"}, "type"),
    ({"name": "ok", "type": "raw", "description": 5}, "description"),
    ({"name": "ok", "type": "raw", "config": []}, "config"),
    ({"name": "ok", "type": "raw", "config": {"http_port": 1}}, "config.http_port"),
    ({"name": "ok", "type": "docker", "config": {"http_port": "80"}},
     "config.http_port"),
    ({"name": "ok", "type": "docker", "config": {"http_port": True}},
     "config.http_port"),
    ({"name": "ok", "type": "docker", "config": {"https_port": 70000}},
     "config.https_port"),
    ({"name": "ok", "type": "docker", "config": {"http_port": -1}},
     "config.http_port"),
    ({"name": "ok", "type": "docker", "config": {"ports": 1}}, "config.ports"),
    ({"name": "ok", "type": "raw", "colour": "red"}, "colour"),
])
def test_invalid_fields_are_400_naming_the_field(depot, body, field):
    check_error(depot.api("POST", "/repositories", json=body), 400, field)
    assert depot.api("GET", "/repositories/ok").status_code == 404


def test_name_of_64_characters_is_accepted(depot):
    name = "a" + "b.c_d-" * 10 + "efg"
    assert len(name) == 64
    depot.create_repository(name, "raw")
    assert depot.api("DELETE", "/repositories/" + name).status_code == 204


@pytest.mark.parametrize("data", [b"{not json", b"", b"\xff\xfe{}", b"[1, 2]",
                                  b'"text"'])
def test_body_that_is_not_a_json_object_is_400(depot, data):
    check_error(depot.api("POST", "/repositories", data=data,
                          headers={"Content-Type": "application/json"}), 400)


def test_deeply_nested_json_is_400(depot):
    data = b"[" * 100000 + b"]" * 100000
    check_error(depot.api("POST", "/repositories", data=data), 400, "nested")
    assert depot.api("GET", "/health").status_code == 200


# Showing, changing, deleting ---------------------------------------------------

def test_show_unknown_is_404(depot):
    check_error(depot.api("GET", "/repositories/absent"), 404, "absent")
    check_error(depot.api("PATCH", "/repositories/absent",
                          json={"description": "x"}), 404)
    check_error(depot.api("DELETE", "/repositories/absent"), 404)


def test_patch_changes_description_and_refuses_name_and_type(depot, raw_repo):
    before = depot.api("GET", "/repositories/" + raw_repo).json()
    time.sleep(1.1)
    answer = depot.api("PATCH", "/repositories/" + raw_repo,
                       json={"description": "new words"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["description"] == "new words"
    assert answer.json()["updated_at"] > before["updated_at"]
    assert answer.json()["created_at"] == before["created_at"]
    check_error(depot.api("PATCH", "/repositories/" + raw_repo,
                          json={"name": "other"}), 400, "name")
    check_error(depot.api("PATCH", "/repositories/" + raw_repo,
                          json={"type": "docker"}), 400, "type")
    check_error(depot.api("PATCH", "/repositories/" + raw_repo,
                          json={"config": {"http_port": 1}}), 400, "config")
    check_error(depot.api("PATCH", "/repositories/" + raw_repo,
                          json={"extra": 1}), 400, "extra")
    shown = depot.api("GET", "/repositories/" + raw_repo).json()
    assert shown["description"] == "new words"


def test_delete_removes_the_repository_and_its_files(depot):
    depot.create_repository("short-lived", "raw")
    assert depot.request("PUT", "/repository/short-lived/a.txt",
                         data=b"x").status_code == 201
    assert depot.api("DELETE", "/repositories/short-lived").status_code == 204
    check_error(depot.api("GET", "/repositories/short-lived"), 404)
    depot.create_repository("short-lived", "raw")
    check_error(depot.request("GET", "/repository/short-lived/a.txt"), 404)
    depot.api("DELETE", "/repositories/short-lived")


# Docker repositories: ports and servers ---------------------------------------

def registry_answers(url, **kwargs):
    try:
        answer = requests.get(url + "/v2/", timeout=5, **kwargs)
    except requests.ConnectionError:
        return False
    return answer.status_code == 200 and \
        answer.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_docker_repository_without_config_gets_port_5000(fresh_depot):
    answer = fresh_depot.api("POST", "/repositories",
                             json={"name": "default", "type": "docker"})
    if answer.status_code == 409:
        check_error(answer, 409, "5000")
        pytest.skip("port 5000 is held by another program on this machine")
    assert answer.status_code == 201, answer.text
    assert answer.json()["config"] == {"http_port": 5000, "https_port": 0}
    assert answer.json()["registry"]["http"]["up"] is True
    assert registry_answers("http://127.0.0.1:5000")


def test_create_starts_the_registry_and_delete_frees_the_port(depot):
    port = free_port()
    body = depot.create_repository("ports", "docker",
                                   config={"http_port": port})
    assert body["registry"]["http"] == {
        "port": port, "url": "http://127.0.0.1:%d/v2/" % port, "up": True,
        "error": None}
    assert registry_answers("http://127.0.0.1:%d" % port)
    assert depot.api("DELETE", "/repositories/ports").status_code == 204
    assert not registry_answers("http://127.0.0.1:%d" % port)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_https_port_serves_the_registry_with_depots_certificate(depot):
    port = free_port()
    depot.create_repository("tls-registry", "docker",
                            config={"https_port": port})
    try:
        assert registry_answers("https://127.0.0.1:%d" % port,
                                verify=depot.cert)
    finally:
        depot.api("DELETE", "/repositories/tls-registry")


@pytest.mark.parametrize("which", ["main", "other", "held", "same"])
def test_ports_that_cannot_be_had_are_refused_and_nothing_is_saved(
        depot, docker_repo, which):
    holder = None
    if which == "main":
        config, words = {"http_port": depot.port}, ["main port"]
    elif which == "other":
        config, words = {"http_port": docker_repo.port}, [docker_repo.name]
    elif which == "same":
        port = free_port()
        config, words = {"http_port": port, "https_port": port}, ["differ"]
    else:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config, words = {"http_port": port}, [str(port), "bound"]
    try:
        answer = depot.api("POST", "/repositories", json={
            "name": "refused", "type": "docker", "config": config})
        assert answer.status_code in (400, 409)
        check_error(answer, answer.status_code, *words)
        check_error(depot.api("GET", "/repositories/refused"), 404)
    finally:
        if holder:
            holder.close()


def test_patch_moves_the_registry_and_failure_changes_nothing(depot):
    old, new = free_port(), free_port()
    depot.create_repository("mover", "docker", config={"http_port": old})
    try:
        answer = depot.api("PATCH", "/repositories/mover",
                           json={"config": {"http_port": new}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["registry"]["http"]["port"] == new
        assert registry_answers("http://127.0.0.1:%d" % new)
        assert not registry_answers("http://127.0.0.1:%d" % old)

        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            held = holder.getsockname()[1]
            check_error(depot.api("PATCH", "/repositories/mover",
                                  json={"config": {"http_port": held}}),
                        409, str(held))
        shown = depot.api("GET", "/repositories/mover").json()
        assert shown["config"]["http_port"] == new
        assert registry_answers("http://127.0.0.1:%d" % new)
    finally:
        depot.api("DELETE", "/repositories/mover")


def test_only_one_registry_on_the_main_port(depot):
    depot.create_repository("on-main", "docker",
                            config={"http_port": 0, "https_port": 0})
    try:
        assert registry_answers(depot.url, verify=depot.cert)
        check_error(depot.api("POST", "/repositories", json={
            "name": "second-main", "type": "docker",
            "config": {"http_port": 0, "https_port": 0}}), 409, "on-main")
        shown = depot.api("GET", "/repositories/on-main").json()
        assert shown["registry"]["main"]["url"].endswith(":%d/v2/" % depot.port)
        check_error(depot.request("GET", "/repository/on-main/x"), 400,
                    "docker repository", "/v2/")
    finally:
        depot.api("DELETE", "/repositories/on-main")
    answer = depot.request("GET", "/v2/")
    assert answer.status_code == 404
    assert answer.json()["errors"][0]["code"] == "UNSUPPORTED"


def test_restart_brings_registries_back_and_reports_one_that_cannot_bind(
        fresh_depot):
    kept, blocked = free_port(), free_port()
    fresh_depot.create_repository("kept", "docker", config={"http_port": kept})
    fresh_depot.create_repository("blocked", "docker",
                                  config={"http_port": blocked})
    fresh_depot.stop()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", blocked))
        holder.listen()
        fresh_depot.start()
        assert registry_answers("http://127.0.0.1:%d" % kept)
        status = fresh_depot.api("GET", "/repositories/blocked").json()
        assert status["registry"]["http"]["up"] is False
        assert "cannot be bound" in status["registry"]["http"]["error"]
    assert "blocked" in fresh_depot.log() and "cannot be bound" in \
        fresh_depot.log()


# Start-up, shutdown, persistence ----------------------------------------------

def test_data_survives_a_restart(fresh_depot):
    fresh_depot.create_repository("lasting", "raw", description="kept")
    assert fresh_depot.request("PUT", "/repository/lasting/f.bin",
                               data=b"persist me").status_code == 201
    fresh_depot.restart()
    assert fresh_depot.api("GET", "/repositories/lasting").json()[
        "description"] == "kept"
    assert fresh_depot.request("GET", "/repository/lasting/f.bin").content == \
        b"persist me"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_with_exit_code_0(tmp_path, sig):
    process = DepotProcess(tmp_path / "data").start()
    assert process.stop(sig) == 0
    assert "stopped" in process.log()
    connection = apsw.Connection(str(tmp_path / "data" / "depot.db"),
                                 flags=apsw.SQLITE_OPEN_READONLY)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_second_depot_on_the_same_data_is_refused(fresh_depot):
    second = DepotProcess(fresh_depot.data_dir).start(wait=False)
    code = second.process.wait(30)
    second.log_file.close()
    assert code != 0
    assert "already using" in second.log()
    assert fresh_depot.api("GET", "/health").status_code == 200


def test_start_up_log_names_urls_data_and_fingerprint(fresh_depot):
    certificate = x509.load_pem_x509_certificate(
        open(fresh_depot.cert, "rb").read())
    fingerprint = certificate.fingerprint(
        certificate.signature_hash_algorithm.__class__()).hex()
    text = fresh_depot.log()
    shown = ":".join(fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
    assert shown in text
    assert str(fresh_depot.data_dir) in text
    assert "https://127.0.0.1:%d/api/v1/" % fresh_depot.port in text


def test_each_request_logs_one_access_line(fresh_depot):
    fresh_depot.api("GET", "/repositories/not-there-at-all")
    lines = [line for line in fresh_depot.log().splitlines()
             if "/api/v1/repositories/not-there-at-all" in line]
    assert len(lines) == 1
    assert " GET " in lines[0] and " 404 " in lines[0] and "ms" in lines[0]


def test_certificate_names_key_mode_and_reuse(fresh_depot):
    certificate = x509.load_pem_x509_certificate(
        open(fresh_depot.cert, "rb").read())
    names = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    addresses = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert "localhost" in dns and socket.gethostname() in dns
    assert "127.0.0.1" in addresses and "::1" in addresses
    key = fresh_depot.data_dir / "key.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    before = open(fresh_depot.cert, "rb").read()
    fresh_depot.restart()
    assert open(fresh_depot.cert, "rb").read() == before
    # The certificate verifies for the host name "localhost" too.
    answer = requests.get("https://localhost:%d/api/v1/health"
                          % fresh_depot.port, verify=fresh_depot.cert,
                          timeout=10)
    assert answer.status_code == 200


def tls_handshake(depot, version):
    """Connect to the main port speaking only TLS ``version``."""
    context = ssl.create_default_context(cafile=depot.cert)
    # Let the client offer old versions, so the refusal is the server's.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", depot.port), 5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.version()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_tls_versions_are_refused(depot):
    assert tls_handshake(depot, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert tls_handshake(depot, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises((ssl.SSLError, OSError)):
            tls_handshake(depot, version)


def test_settings_from_environment_and_flags_win(tmp_path):
    port = free_port()
    env = {"DEPOT_PORT": str(free_port()), "DEPOT_DATA_DIR": str(tmp_path / "e"),
           "DEPOT_LOG_LEVEL": "warning"}
    process = DepotProcess(tmp_path / "e", port=port, env=env)
    process.extra = ["--log-level", "info"]
    process.start()
    try:
        assert process.api("GET", "/health").status_code == 200
        assert "access" in process.log()   # info level won over warning
    finally:
        assert process.stop() == 0
    env = {"DEPOT_HOST": "127.0.0.1", "DEPOT_PORT": str(port),
           "DEPOT_DATA_DIR": str(tmp_path / "only-env"),
           "DEPOT_DB_PATH": str(tmp_path / "elsewhere" / "store.db")}
    started = subprocess.Popen([sys.executable, str(DEPOT)],
                               env={**os.environ, **env},
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                answer = requests.get(
                    "https://127.0.0.1:%d/api/v1/health" % port, timeout=2,
                    verify=str(tmp_path / "only-env" / "cert.pem"))
                break
            except (requests.ConnectionError, OSError):
                time.sleep(0.1)
        assert answer.status_code == 200
        assert (tmp_path / "elsewhere" / "store.db").exists()
    finally:
        started.send_signal(signal.SIGTERM)
        assert started.wait(30) == 0


def test_help_lists_every_setting():
    text = subprocess.run([sys.executable, str(DEPOT), "--help"],
                          capture_output=True, text=True, check=True).stdout
    for flag in ("--host", "--port", "--data-dir", "--db-path", "--cert-file",
                 "--key-file", "--log-level", "--threads", "--upload-expiry"):
        assert flag in text
    for variable in ("DEPOT_HOST", "DEPOT_PORT", "DEPOT_DATA_DIR",
                     "DEPOT_DB_PATH", "DEPOT_CERT_FILE", "DEPOT_KEY_FILE",
                     "DEPOT_LOG_LEVEL"):
        assert variable in text


def test_configured_certificate_is_used(tmp_path, fresh_depot):
    # Reuse the first Depot's generated pair as "configured" files.
    port = free_port()
    process = DepotProcess(tmp_path / "configured", port=port, extra=[
        "--cert-file", fresh_depot.cert,
        "--key-file", str(fresh_depot.data_dir / "key.pem")])
    process.cert = fresh_depot.cert
    process.start()
    try:
        assert process.api("GET", "/health").status_code == 200
        assert not (tmp_path / "configured" / "cert.pem").exists()
    finally:
        process.stop()
