"""The management API's OpenAPI document, and schemathesis against it.

``GET /api/v1/openapi.json`` must be a valid OpenAPI 3 document whose paths
are exactly the API's routes (``ROUTES`` below); every documented operation
must answer. Schemathesis then generates requests from the document: no
answer may be a 5xx, and every answer must conform to the document (status
code documented, body and headers matching the response schema).

Generated repository names are rewritten to start with ``st-`` (so that a
generated DELETE never hits another test's repository) and generated ports
to two ports reserved for this module, so nothing collides with the ports
of other tests; a 409 for a taken name or port is a documented answer.
"""

import copy
import re
import socket

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

#: The management API: (method, path template) of every route Depot serves
#: under /api/v1.
ROUTES = {
    ("GET", "/api/v1/health"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/repositories"),
    ("POST", "/api/v1/repositories"),
    ("GET", "/api/v1/repositories/{name}"),
    ("PATCH", "/api/v1/repositories/{name}"),
    ("DELETE", "/api/v1/repositories/{name}"),
}
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PREFIX = "st-"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def document(depot):
    answer = depot.api("GET", "/openapi.json")
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    return answer.json()


def test_document_is_valid_openapi_3(document):
    assert str(document.get("openapi", "")).startswith("3."), document.get(
        "openapi")
    assert document["info"]["title"] and document["info"]["version"]
    from openapi_spec_validator import validate
    validate(copy.deepcopy(document))
    # schemathesis refuses documents it cannot use.
    schemathesis.openapi.from_dict(copy.deepcopy(document))


def documented_operations(document):
    return {(method.upper(), path)
            for path, item in document["paths"].items()
            for method in item if method in METHODS}


def test_paths_are_exactly_the_routes(document):
    documented = documented_operations(document)
    assert documented - ROUTES == set(), "documented but not a route"
    assert ROUTES - documented == set(), "a route that is not documented"


def test_every_operation_has_unique_id_and_responses(document):
    ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            ids.append(operation["operationId"])
            assert operation["responses"], (method, path)
            for status in operation["responses"]:
                assert status == "default" or 100 <= int(status) < 600
    assert len(ids) == len(set(ids)), ids


def test_every_documented_operation_answers(depot, document):
    """Each documented operation is served (not 404/405 for the route) and
    answers with a documented status."""
    name = PREFIX + "answers"
    depot.api("DELETE", "/repositories/" + name)
    bodies = {("POST", "/api/v1/repositories"): {"name": name, "type": "raw"},
              ("PATCH", "/api/v1/repositories/{name}"): {"description": "d"}}
    order = sorted(documented_operations(document),
                   key=lambda op: ["POST", "GET", "PATCH", "DELETE"].index(
                       op[0]))
    for method, path in order:
        concrete = path.replace("{name}", name)
        answer = depot.request(method, concrete,
                               json=bodies.get((method, path)))
        documented = document["paths"][path][method.lower()]["responses"]
        assert str(answer.status_code) in documented, (method, path,
                                                       answer.status_code)
        assert answer.status_code < 400, (method, path, answer.text)


@pytest.mark.parametrize("method,path", [
    ("PUT", "/api/v1/repositories"), ("DELETE", "/api/v1/repositories"),
    ("POST", "/api/v1/health"), ("PUT", "/api/v1/repositories/x"),
    ("POST", "/api/v1/openapi.json")])
def test_undocumented_methods_are_405(depot, method, path):
    answer = depot.request(method, path)
    assert answer.status_code == 405, answer.text
    assert isinstance(answer.json()["error"], str)


@pytest.mark.parametrize("path", ["/api/v1/", "/api/v1/nothing",
                                  "/api/v1/repositories/a/b",
                                  "/api/v2/repositories"])
def test_unknown_api_paths_are_404_json(depot, path):
    answer = depot.request("GET", path)
    assert answer.status_code == 404, answer.text
    assert isinstance(answer.json()["error"], str)


# ---------------------------------------------------------------------------
# schemathesis
# ---------------------------------------------------------------------------

class Rewriter:
    """Keeps generated cases inside what this module may touch."""

    def __init__(self, ports):
        self.ports = ports

    def name(self, value):
        """A valid name that is not this module's gets the prefix (it stays
        valid); invalid ones stay as generated, so negative cases stay
        negative."""
        if not isinstance(value, str) or value.startswith(PREFIX) or \
                not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", value):
            return value
        return (PREFIX + value)[:64]

    def config(self, config):
        """Valid ports become the reserved ones (equal ones stay equal)."""
        if not isinstance(config, dict):
            return
        mapping = {}
        for key in ("http_port", "https_port"):
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) \
                    and 0 < value <= 65535:
                if value not in mapping:
                    mapping[value] = self.ports[len(mapping)]
                config[key] = mapping[value]

    def __call__(self, context, case):
        if case.path_parameters and "name" in case.path_parameters:
            case.path_parameters["name"] = self.name(
                case.path_parameters["name"])
        if isinstance(case.body, dict):
            if "name" in case.body:
                case.body["name"] = self.name(case.body["name"])
            self.config(case.body.get("config"))
        return case


@pytest.fixture(scope="module")
def api_schema(depot, document):
    schema = schemathesis.openapi.from_dict(copy.deepcopy(document))
    rewriter = Rewriter((free_port(), free_port()))

    def map_case(context, case):
        return rewriter(context, case)

    schema.hook("map_case")(map_case)
    yield schema
    for repository in depot.api("GET", "/repositories").json():
        if repository["name"].startswith(PREFIX):
            depot.api("DELETE", "/repositories/" + repository["name"])


@pytest.fixture(scope="module")
def verified_session(depot):
    session = requests.Session()
    session.verify = depot.cert
    yield session
    session.close()


schema = schemathesis.pytest.from_fixture("api_schema")


#: Whether a config is valid depends on the repository's type (a raw
#: repository takes none), which the PATCH schema cannot say; so a
#: schema-valid PATCH may rightly be refused and ``positive_data_acceptance``
#: is left out. Every other check runs, ``negative_data_rejection`` included.
EXCLUDED = [schemathesis.checks.positive_data_acceptance]


@schema.parametrize()
@settings(max_examples=40, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(case, depot, verified_session):
    case.call_and_validate(base_url=depot.url, session=verified_session,
                           verify=depot.cert, timeout=30,
                           excluded_checks=EXCLUDED)
