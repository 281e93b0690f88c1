"""schemathesis against a live API process (``mesh up --services api,health``): the REST
operations from the OpenAPI document, and /v1/graphql from its SDL (docs/graphql.sdl).

Every operation of the document gets a bounded number of generated requests,
schema-valid ones and schema-invalid ones, with an admin key: no answer may be a 5xx, and every
answer must conform to the document (status, content type, headers, body schema).
Keys are made with ``mesh apikey create`` (the CLI path, too).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.broker import free_port
from mesh.config import Settings
from tests.conftest import env_for

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_EXAMPLES = int(os.environ.get("MESH_TEST_SCHEMA_EXAMPLES", "6"))


def takes_expressions(doc: dict[str, object], operation: object) -> bool:
    """Whether the operation's body has a filter or transform field (expression syntax)."""
    op = doc["paths"][operation.path][operation.method.lower()]  # type: ignore[attr-defined,index]
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    names = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(body)))
    schemas = doc["components"]["schemas"]  # type: ignore[index]
    return any({"filter", "transform"} & set(schemas[n].get("properties", {})) for n in names)


def takes_cursor(doc: dict[str, object], operation: object) -> bool:
    """Whether the operation is a list with a cursor (only a server-made one is valid)."""
    op = doc["paths"][operation.path][operation.method.lower()]  # type: ignore[attr-defined,index]
    return any(p["name"] == "cursor" for p in op.get("parameters", []))


@pytest.fixture
def live_api(settings: Settings) -> Iterator[tuple[str, str]]:
    """(base URL, admin key) of an API process with a health service beside it."""
    port = free_port()
    env = {**env_for(settings), "MESH_API_PORT": str(port), "MESH_LOG_LEVEL": "warning"}
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "apikey",
            "create",
            "--name",
            "fuzz",
            "--scope",
            "admin",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("mk_") and key not in made.stderr
    log = (settings.home / "api.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "up", "--services", "api,health"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (settings.home / "api.log").read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the API did not start listening"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", key
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    text = (settings.home / "api.log").read_text()
    assert "Traceback" not in text, text[-3000:]
    assert key not in text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_operation_conforms_and_never_5xx(live_api: tuple[str, str]) -> None:
    base, key = live_api
    with urllib.request.urlopen(base + "/v1/openapi.json", timeout=10) as resp:
        served = json.load(resp)
    assert served == json.loads((ROOT / "docs" / "openapi.json").read_text())
    schema = schemathesis.openapi.from_dict(served)
    auth = {"Authorization": f"Bearer {key}"}
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.append(operation.label)
        excluded = []
        if (
            operation.label == "POST /v1/propagations"
            or takes_cursor(served, operation)
            or takes_expressions(served, operation)
        ):
            # Rules JSON Schema cannot state make some schema-valid requests a 422: a source
            # never propagates to itself; a filter or transform must parse (CESQL,
            # JMESPath); a list's cursor must be one the server made. Every other check
            # applies to these operations too.
            excluded.append(positive_data_acceptance)

        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @hsettings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: object) -> None:
                case.call_and_validate(  # type: ignore[attr-defined]
                    base_url=base,
                    headers=auth,
                    excluded_checks=excluded,  # noqa: B023
                )

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid: an operation without parameters or body.
                assert mode is GenerationMode.NEGATIVE and operation.method == "get"
    assert len(seen) == sum(len(ops) for ops in served["paths"].values())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_graphql_fuzz_never_5xx_nor_a_traceback(live_api: tuple[str, str]) -> None:
    """schemathesis's GraphQL generator (hypothesis-graphql) over the served schema:
    every root field with generated arguments and selections, valid and invalid."""
    base, key = live_api
    url = base + "/v1/graphql"
    schema = schemathesis.graphql.from_path(ROOT / "docs" / "graphql.sdl")
    auth = {"Authorization": f"Bearer {key}"}
    seen: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @hsettings(
                max_examples=MAX_EXAMPLES * 2,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: object) -> None:
                response = case.call(url=url, headers=auth)  # type: ignore[attr-defined]
                body = response.text
                assert response.status_code < 500, (case.body, body[:500])  # type: ignore[attr-defined]
                assert "Traceback" not in body and 'File "' not in body, body[:500]
                if response.status_code == 200:
                    doc = response.json()
                    assert "data" in doc or "errors" in doc, body[:500]
                    for err in doc.get("errors") or []:
                        assert set(err) <= {"message", "locations", "path", "extensions"}, err

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE
    assert {"Query.targets", "Query.events", "Query.deliveries"} <= set(seen), seen
