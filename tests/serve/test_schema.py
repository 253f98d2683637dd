"""The OpenAPI document tells the truth: its statuses, bodies and content types, checked by
hand and by schemathesis (``--checks all``, positive and negative data) against the app on
the fake engine over real HTTP."""

import json
import subprocess
import sys

import httpx
import pytest

from optkit.serve import BackgroundServer, CharCodec, FakeEngine, Limits, Scheduler, create_app

pytest.importorskip("schemathesis")

ERROR_REF = "#/components/schemas/ErrorResponse"
POSTS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]


@pytest.fixture(scope="module")
def srv():
    sched = Scheduler(FakeEngine(max_slots=4, max_len=256), CharCodec(), Limits(max_queue=64))
    with BackgroundServer(create_app(sched, sched.codec, "fake", max_n=16)) as s:
        yield s


@pytest.fixture(scope="module")
def doc(srv):
    return httpx.get(srv.url + "/openapi.json").json()


def test_document_lists_the_servers_statuses_bodies_and_content_types(doc):
    paths = doc["paths"]
    assert "422" not in json.dumps(doc) and "HTTPValidationError" not in json.dumps(doc)
    for path in POSTS:
        responses = paths[path]["post"]["responses"]
        for status in ("400", "404", "413", "500"):
            body = responses[status]["content"]["application/json"]["schema"]
            assert body == {"$ref": ERROR_REF}, (path, status)
        assert "401" not in responses  # keys are off on this server
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[path]["post"]["responses"]
        assert {"429", "503"} <= set(responses)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(paths["/"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    error = doc["components"]["schemas"]["ErrorDetail"]["properties"]
    assert error["code"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    prompt = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    text, texts, ids, batch = prompt["oneOf"]
    assert text["minLength"] == 1 and texts["minItems"] == texts["items"]["minLength"] == 1
    assert ids["minItems"] == 1 and ids["items"]["maximum"] == 127  # the fake's vocabulary
    assert batch["minItems"] == batch["items"]["minItems"] == 1


def test_document_with_keys_names_401_and_the_bearer_scheme():
    sched = Scheduler(FakeEngine(), CharCodec(), Limits())
    doc = create_app(sched, sched.codec, "fake", api_keys={"k": 1.0}).openapi()
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http",
                                                               "scheme": "bearer"}}
    for path in [*POSTS, "/v1/models"]:
        op = next(iter(doc["paths"][path].values()))
        assert "401" in op["responses"] and op["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/health"]["get"]


def schemathesis(location, tmp_path, *args, examples=40):
    """Run the schemathesis CLI (deterministic data, one worker) -> (exit code, its JSON
    report, its output)."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", str(location), "--workers", "1",
           "--max-examples", str(examples), "--generation-deterministic", "--no-color",
           "--phases", "examples,coverage,fuzzing", "--mode", "all",
           "--report", "json",
           "--report-json-path", str(tmp_path / "report.json"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert (tmp_path / "report.json").exists(), p.stdout + p.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    return p.returncode, report, p.stdout + p.stderr


def pin_model(doc, name):
    """``doc`` with every request's ``model`` limited to ``name`` (null where it may be)."""
    doc = json.loads(json.dumps(doc))
    for schema in doc["components"]["schemas"].values():
        props = schema.get("properties", {})
        if "model" in props:
            nullable = {"type": "null"} in props["model"].get("anyOf", [])
            props["model"] = ({"anyOf": [{"const": name}, {"type": "null"}]} if nullable
                              else {"const": name})
    return doc


def test_schemathesis_finds_no_failure(srv, doc, tmp_path):
    """Three runs of every check: (1) the document as served (any ``model`` string: every
    field's schema against the validators, which run before the model is looked up);
    (2) ``model`` pinned to the served one, so requests reach the planner and the engine
    (every check but positive-data acceptance: a schema cannot state cross-field limits
    such as prompt + max_tokens <= the context, which are 400s); (3) a server with API
    keys (its 401s and bearer scheme; requests without the key must be refused)."""
    served, pinned, keyed = tmp_path / "served", tmp_path / "pinned", tmp_path / "keyed"
    for d in (served, pinned, keyed):
        d.mkdir()
    runs = [schemathesis(srv.url + "/openapi.json", served, "--checks", "all")]
    (pinned / "openapi.json").write_text(json.dumps(pin_model(doc, "fake")))
    runs.append(schemathesis(pinned / "openapi.json", pinned, "--url", srv.url,
                             "--checks", "all", "--exclude-checks",
                             "positive_data_acceptance"))
    sched = Scheduler(FakeEngine(), CharCodec(), Limits(), weights={"sk-1": 1.0})
    with BackgroundServer(create_app(sched, sched.codec, "fake",
                                     api_keys={"sk-1": 1.0})) as with_keys:
        runs.append(schemathesis(with_keys.url + "/openapi.json", keyed, "--checks", "all",
                                 "-H", "Authorization: Bearer sk-1", examples=20))
    total = 0
    for code, report, out in runs:
        cases = report["test_cases"]
        print(f"schemathesis: {cases['generated']} requests, {cases['with_failures']} "
              f"failing, {cases['errored']} errors; operations {report['operations']}")
        assert code == 0 and report["failures"] == [] and cases["errored"] == 0, out[-4000:]
        assert report["operations"]["tested"] == len(doc["paths"])
        total += cases["generated"]
    assert total >= 1000


def test_schemathesis_catches_an_undocumented_status(srv, doc, tmp_path):
    """The harness can fail: without its 400 in the document, /tokenize's answers to
    invalid bodies are undocumented statuses (ST103)."""
    broken = json.loads(json.dumps(doc))
    del broken["paths"]["/tokenize"]["post"]["responses"]["400"]
    (tmp_path / "openapi.json").write_text(json.dumps(broken))
    code, report, _ = schemathesis(tmp_path / "openapi.json", tmp_path, "--url", srv.url,
                                   "--checks", "status_code_conformance", "--include-path",
                                   "/tokenize", examples=10)
    assert code != 0
    assert [f["code"] for f in report["failures"]] == ["ST103"]
