"""One seam between the mesh and nats.py (issue #24), checked on the source with ``ast``:

- only ``mesh/_nats/`` imports ``nats`` (in ``mesh/`` and ``services/``; tests and
  benchmarks play raw clients and may);
- nats.py's private ``_api_request`` is used in ``mesh/_nats/api.py`` only;
- nothing outside ``mesh/_nats/`` and ``mesh/client.py`` reaches for a ``.js`` or
  ``.nc`` (nats.py's JetStream context and connection): services and operator modules
  use ``client.port``;
- one function derives an event id (``envelope.event_id_of``), and the ``ce-*`` header
  names are spelled in ``mesh/envelope.py`` only;
- ``envelope.encode`` leaves its event as it was;
- ``mesh.__all__`` is what it is (as httpx's ``test_exported_members.py``);
- ``MeshClient`` keeps the user API only: the services' plumbing (pull, decode, the route
  check, records, dead letters, depths) is ``mesh.delivery.Deliveries``, handed to them,
  and nothing in ``mesh/`` or ``services/`` calls it on a client.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

import mesh
from mesh import envelope
from mesh.client import MeshClient
from mesh.delivery import Deliveries, MessageHeaders
from mesh.envelope import Event

ROOT = Path(__file__).resolve().parent.parent
SEAM = "mesh/_nats/"
# Modules outside the seam that may hold nats.py's context or connection, and why.
JS_NC_ALLOWED = {
    "mesh/client.py": "composes the port; keeps client.js and client.nc for tests' raw use",
}
HEADER_NAME = re.compile(r"^ce-[a-z]+$")
# What MeshClient once carried for services; now mesh.delivery.Deliveries' (issue #24).
SERVICE_ONLY = frozenset(
    {
        "admit",
        "_admit",
        "check_event",
        "dead_letter",
        "decode",
        "dlq_depths",
        "pull",
        "queue_depth",
        "record",
        "route_event",
    }
)


@functools.cache
def sources() -> list[tuple[str, ast.Module]]:
    found = []
    for pkg in ("mesh", "services"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT).as_posix()
            found.append((rel, ast.parse(path.read_text(encoding="utf-8"), rel)))
    return found


def nats_imports(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name == "nats" or a.name.startswith("nats.") for a in node.names):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and (node.module == "nats" or (node.module or "").startswith("nats."))
        ):
            lines.append(node.lineno)
    return lines


def test_only_the_seam_imports_nats() -> None:
    found = [
        f"{rel}:{line}"
        for rel, tree in sources()
        if not rel.startswith(SEAM)
        for line in nats_imports(tree)
    ]
    assert not found, "import nats outside mesh/_nats/ (use mesh._nats.types):\n" + "\n".join(found)


def test_the_seam_really_imports_nats() -> None:
    # the check above sees what it must: the seam's own imports are found
    seam = [rel for rel, tree in sources() if rel.startswith(SEAM) and nats_imports(tree)]
    assert "mesh/_nats/types.py" in seam and "mesh/_nats/port.py" in seam


def test_api_request_only_in_the_seam() -> None:
    found = [
        f"{rel}:{node.lineno}"
        for rel, tree in sources()
        if rel != "mesh/_nats/api.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "_api_request"
    ]
    assert not found, "_api_request outside mesh/_nats/api.py:\n" + "\n".join(found)


def test_no_js_or_nc_outside_the_seam() -> None:
    found = [
        f"{rel}:{node.lineno} .{node.attr}"
        for rel, tree in sources()
        if not rel.startswith(SEAM) and rel not in JS_NC_ALLOWED
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ("js", "nc")
    ]
    assert not found, "nats.py's js/nc outside mesh/_nats/ (use client.port):\n" + "\n".join(found)


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(
            node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
        ) and (body := getattr(node, "body", None)):
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_header_names_only_in_envelope() -> None:
    found = []
    for rel, tree in sources():
        if rel == "mesh/envelope.py":
            continue
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) not in docs and HEADER_NAME.match(node.value):
                    found.append(f"{rel}:{node.lineno} {node.value!r}")
            elif isinstance(node, ast.JoinedStr) and node.values:
                head = node.values[0]
                if isinstance(head, ast.Constant) and str(head.value).startswith("ce-"):
                    found.append(f"{rel}:{node.lineno} f'ce-...'")
    assert not found, "ce-* names outside mesh/envelope.py (use its H_* constants):\n" + "\n".join(
        found
    )


def test_one_function_derives_an_event_id() -> None:
    """``seq-<n>`` ids are made in one place, and the fallback chain is that function's."""
    found = []
    for rel, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and node.values:
                head = node.values[0]
                if isinstance(head, ast.Constant) and str(head.value) == "seq-":
                    found.append(rel)
    assert found == ["mesh/envelope.py"]
    assert envelope.event_id_of({"ce-id": "a", "Nats-Msg-Id": "b"}, 3) == "a"
    assert envelope.event_id_of({"Nats-Msg-Id": "b"}, 3) == "b"
    assert envelope.event_id_of({}, 3) == "seq-3"
    assert envelope.event_id_of({}, None, "letter-1") == "letter-1"
    assert len(envelope.event_id_of({})) == 32  # a new id, never "seq-None"
    view = MessageHeaders({"ce-id": "x", "ce-meshhops": "two", "ce-meshorigin": "crm"})
    assert (view.event_id(), view.hops, view.origin, view.is_cloudevent) == ("x", 0, "crm", True)


def test_encode_leaves_the_event_as_it_was() -> None:
    event = Event(source="shop", type="blob.stored", data=b"\x00\x01")
    before = event.datacontenttype
    headers, _ = envelope.encode(event)
    assert headers[envelope.H_DATACONTENTTYPE] == envelope.OCTETS
    assert event.datacontenttype == before == envelope.MSGPACK


def test_the_error_tree_draws_every_error() -> None:
    """Every MeshError subclass defined in mesh/ or services/ is in errors.py's tree."""
    from mesh import errors

    drawn = set(re.findall(r"[├└]── (\w+)", errors.__doc__ or ""))
    defined = set()
    for _rel, tree in sources():
        classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for name, node in classes.items():
            bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
            if bases & (drawn | {"MeshError"}):
                defined.add(name)
    assert defined - drawn == set()


def test_exported_members() -> None:
    assert sorted(mesh.__all__) == [
        "BrokerError",
        "BrokerUnavailable",
        "ConfigError",
        "Conflict",
        "DecodeError",
        "Delivery",
        "Event",
        "ExpressionError",
        "InvalidName",
        "KeyFileError",
        "MeshClient",
        "MeshError",
        "NotFound",
        "PayloadTooLarge",
        "PortInUse",
        "Propagation",
        "PropagationMode",
        "Reply",
        "RequestError",
        "RequestTimeout",
        "RetryPolicy",
        "Settings",
        "StorageError",
        "Target",
        "TargetKind",
        "ValidationError",
        "__version__",
        "load_settings",
    ]
    exported = {name for name in dir(mesh) if not name.startswith("_")} | {"__version__"}
    assert set(mesh.__all__) <= exported


def test_every_package_is_a_regular_one() -> None:
    """setuptools' find_packages skips a directory without ``__init__.py``: an installed
    mesh would miss it (mesh/_nats/ once did)."""
    missing = sorted(
        d.relative_to(ROOT).as_posix()
        for pkg in ("mesh", "services")
        for d in [ROOT / pkg, *(ROOT / pkg).rglob("*")]
        if d.is_dir()
        and "__pycache__" not in d.parts
        and any(d.glob("*.py"))
        and not (d / "__init__.py").is_file()
    )
    assert missing == []


async def test_one_awaited_publish_path_answers_as_nats_py_would(client: MeshClient) -> None:
    """``port.publish`` rides the same acked publisher as ``publish_acked`` and keeps
    nats.py's answers: a PubAck (duplicates told), no stream, a refused expectation."""
    import nats.js.errors as js_errors

    subject = client.subjects.delivery("seam")
    first = await client.port.publish(subject, b"{}", headers={"Nats-Msg-Id": "seam-1"})
    again = await client.port.publish(subject, b"{}", headers={"Nats-Msg-Id": "seam-1"})
    assert first.stream == client.names.sys and not first.duplicate
    assert again.duplicate and again.seq == first.seq
    with pytest.raises(js_errors.NoStreamResponseError):
        await client.port.publish("nowhere.at.all", b"{}", timeout=2)
    with pytest.raises(js_errors.APIError) as refused:
        await client.port.publish(subject, b"{}", stream="NOT_THIS_ONE")
    assert "expected stream" in (refused.value.description or "").lower()


def test_mesh_client_keeps_the_user_api() -> None:
    """The public members of ``MeshClient`` (methods and properties; instance attributes
    such as ``port``, ``deliveries`` and ``subjects`` are set in ``__init__``)."""
    assert sorted(n for n in vars(MeshClient) if not n.startswith("_")) == [
        "add_propagation",
        "add_target",
        "build",
        "close",
        "connect",
        "consume",
        "decode_request",
        "init",
        "js",
        "keyring",
        "keyring_or_none",
        "provisioner",
        "publish",
        "publish_event",
        "publish_many",
        "registry",
        "remove_propagation",
        "remove_target",
        "reply",
        "request",
        "serve_requests",
        "target_or_error",
    ]
    assert not SERVICE_ONLY & set(dir(MeshClient))
    assert SERVICE_ONLY - {"_admit"} <= set(dir(Deliveries))


def _on_a_client(node: ast.expr) -> bool:
    """Whether an expression names a client: ``client``, ``c``, or ``<anything>.client``."""
    if isinstance(node, ast.Name):
        return node.id in ("client", "c")
    return isinstance(node, ast.Attribute) and node.attr == "client"


def _plumbing_on_clients(tree: ast.Module) -> list[tuple[int, str]]:
    return [
        (node.lineno, node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in SERVICE_ONLY
        and _on_a_client(node.value)
    ]


def test_nothing_calls_the_plumbing_on_a_client() -> None:
    found = [
        f"{rel}:{line} .{name}"
        for rel, tree in sources()
        for line, name in _plumbing_on_clients(tree)
    ]
    assert not found, "delivery plumbing on a client (use .deliveries):\n" + "\n".join(found)
    # the check sees what it must
    old = ast.parse("self.client.record(r)\nc.queue_depth(t)\nawait call.api.audit.record(x)")
    assert _plumbing_on_clients(old) == [(1, "record"), (2, "queue_depth")]
