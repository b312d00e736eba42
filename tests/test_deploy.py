"""The deployment files agree with the app: ports, probes, user, entrypoint, environment names.

No container engine or cluster runs here: the Dockerfile, compose file and Kubernetes manifests
are parsed and checked against the real ``Config``, CLI parser, route table and server settings.
The one live test runs the image's HEALTHCHECK command against a gateway on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shlex
import socket
import sys
import tomllib
import typing
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from gateway.app import create_app
from gateway.config import CarriersConfig, Config
from gateway.server import build_server
from pipeline.providers import PROVIDERS
from tests.conftest import running_gateway

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


# ---------------------------------------------------------------------------------------------- parsing

@dataclasses.dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"the {self.name or self.image} stage of deploy/Dockerfile has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage; joins ``\\`` continuations and drops comments like Docker does."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "deploy/Dockerfile ends inside a line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(image=words[0], name=name, instructions=[]))
        elif keyword != "ARG" or stages:
            assert stages, f"instruction before FROM: {line}"
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON array) form, not the shell form: {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck_command(args: str) -> list[str]:
    match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(.+)", args, flags=re.S)
    assert match, f"HEALTHCHECK must be 'HEALTHCHECK [options] CMD [...]', got {args!r}"
    return exec_form(match.group(2))


def url_in(command: list[str]) -> str:
    urls = [u for part in command for u in re.findall(r"https?://[^\s'\"]+", part)]
    assert len(urls) == 1, f"expected exactly one URL in the health check {command}, found {urls}"
    return urls[0]


@cache
def dockerfile() -> tuple[Stage, ...]:
    return tuple(parse_dockerfile((DEPLOY / "Dockerfile").read_text()))


def runtime() -> Stage:
    return dockerfile()[-1]


def exposed_ports() -> set[int]:
    ports = set()
    for args in runtime().all("EXPOSE"):
        for word in args.split():
            ports.add(int(word.split("/")[0]))
    return ports


def load_yaml(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.relative_to(ROOT)}: expected one document, found {len(docs)}"
    return docs[0]


def manifest(name: str, kind: str) -> dict[str, Any]:
    doc = load_yaml(K8S / name)
    assert doc["kind"] == kind, f"{name} holds a {doc['kind']}, expected {kind}"
    return doc


def deployment() -> dict[str, Any]:
    return manifest("deployment.yaml", "Deployment")


def gateway_container() -> dict[str, Any]:
    containers = deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the Deployment should run exactly the gateway container"
    return containers[0]


def container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in gateway_container()["ports"]}


def resolve_port(port: int | str) -> int:
    """A probe/Service port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    ports = container_ports()
    assert port in ports, f"port name {port!r} is not one of the container's ports {ports}"
    return ports[port]


def compose_service() -> dict[str, Any]:
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    assert list(services) == ["gateway"], f"compose.yaml should define only the gateway service, got {list(services)}"
    return services["gateway"]


def interpolate(value: str, host_env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$VAR`` against ``host_env``."""
    def sub(m: re.Match[str]) -> str:
        name, op, default = m.group("name") or m.group("bare"), m.group("op"), m.group("default") or ""
        if op == ":-":
            return host_env.get(name) or default
        if op == "-":
            return host_env.get(name, default)
        return host_env.get(name, "")
    pattern = r"\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|\$(?P<bare>\w+)"
    return re.sub(pattern, sub, value)


def app_paths() -> set[str]:
    app = create_app(Config.from_mapping({}))   # building the app does not start it
    return {route.path for route in app.routes}


def allowed_env_names() -> set[str]:
    """``VOXRAY_<KEY>`` / ``VOXRAY_<SECTION>_<KEY>`` for real Config fields, plus the documented
    variables read outside Config's keys: VOXRAY_CONFIG, the carrier credentials, providers' keys/URLs."""
    hints = typing.get_type_hints(Config)
    names = {"VOXRAY_CONFIG", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"}
    for f in dataclasses.fields(Config):
        if f.metadata.get("derived"):
            continue
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if tp is not CarriersConfig:   # carrier settings are not read from VOXRAY_CARRIERS_*
                names |= {f"VOXRAY_{f.name.upper()}_{sub.name.upper()}" for sub in dataclasses.fields(tp)}
        else:
            names.add(f"VOXRAY_{f.name.upper()}")
    for spec in PROVIDERS.values():
        names |= {v for v in (spec.key_env, spec.base_url_env) if v}
    return names


def environment_sources() -> dict[str, dict[str, Any]]:
    secret = manifest("secret.example.yaml", "Secret")
    return {
        "k8s/configmap.yaml": manifest("configmap.yaml", "ConfigMap")["data"],
        "k8s/secret.example.yaml": {**secret.get("data", {}), **secret.get("stringData", {})},
        "compose.yaml": compose_service()["environment"],
    }


# ---------------------------------------------------------------------------------------------- Dockerfile

def test_dockerfile_is_multi_stage_and_copies_the_builders_venv() -> None:
    stages = dockerfile()
    assert len(stages) >= 2, "deploy/Dockerfile should have a builder and a runtime stage"
    assert {s.image for s in stages} == {"python:3.11-slim"}, [s.image for s in stages]
    builder = stages[0]
    assert builder.name, "name the builder stage (FROM ... AS builder) so the runtime can copy from it"
    copies = [a for a in runtime().all("COPY") if a.startswith(f"--from={builder.name} ")]
    assert copies, "the runtime stage should COPY the installed venv from the builder"
    venv = copies[0].split()[-1]
    assert any(a.startswith(f"PATH={venv}/bin") or f" PATH={venv}/bin" in a for a in runtime().all("ENV")), \
        f"the runtime PATH should start with {venv}/bin so the voxray script is found"


def test_dockerfile_installs_every_package_with_the_local_extra() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    builder = dockerfile()[0]
    copied = {src.rstrip("/") for args in builder.all("COPY") for src in args.split()[:-1] if not src.startswith("--")}
    missing = top_level - copied
    assert not missing, f"the builder does not COPY the packages {sorted(missing)} that pyproject installs"
    assert "pyproject.toml" in copied
    assert "local" in pyproject["project"]["optional-dependencies"]
    assert any(re.search(r"pip install [^&]*\.\[local\]", a) for a in builder.all("RUN")), \
        "the builder should pip install the project with the `local` extra (\".[local]\")"


def test_dockerfile_entrypoint_is_the_declared_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = exec_form(runtime().last("ENTRYPOINT"))
    assert entrypoint == ["voxray"], entrypoint
    assert scripts.get("voxray") == "gateway.__main__:main", scripts


def test_dockerfile_cmd_port_is_exposed_and_is_the_app_default() -> None:
    from gateway.__main__ import _parser

    entrypoint = exec_form(runtime().last("ENTRYPOINT"))
    args = _parser().parse_args(entrypoint[1:] + exec_form(runtime().last("CMD")))
    assert args.command == "serve"
    assert args.host == "0.0.0.0", "inside a container the server must listen on all interfaces"
    default_port = Config.from_mapping({}).port
    assert args.port == default_port == 8000
    assert exposed_ports() == {args.port}, f"EXPOSE {exposed_ports()} but CMD serves on {args.port}"


def test_dockerfile_runs_as_the_non_root_voxray_user() -> None:
    user = runtime().last("USER").split(":")[0]
    uid = int(user) if user.isdigit() else None
    if uid is None:   # a name: find the uid it was created with
        for run in runtime().all("RUN"):
            m = re.search(rf"useradd\b[^&;]*--uid[ =](\d+)[^&;]*\s{re.escape(user)}\b", run)
            uid = int(m.group(1)) if m else uid
    assert uid is not None, f"cannot tell the uid of USER {user}"
    assert uid != 0 and user != "root"
    assert any(re.search(rf"useradd\b.*--uid[ =]{uid}\b.*\svoxray\b", run) for run in runtime().all("RUN")), \
        f"the runtime stage should create the user voxray with uid {uid}"
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid == 10001


def test_dockerfile_healthcheck_hits_health_on_the_exposed_port() -> None:
    url = urlparse(url_in(healthcheck_command(runtime().last("HEALTHCHECK"))))
    assert url.hostname in ("127.0.0.1", "localhost")
    assert url.port in exposed_ports()
    assert url.path == "/health" and url.path in app_paths()
    assert healthcheck_command(runtime().last("HEALTHCHECK"))[0] in ("python", "python3"), \
        "python:3.11-slim has no curl/wget; use python"


def _healthchecks() -> dict[str, list[str]]:
    compose_test = compose_service()["healthcheck"]["test"]
    assert compose_test[0] == "CMD", "compose healthcheck: use the [\"CMD\", ...] exec form"
    return {"Dockerfile": healthcheck_command(runtime().last("HEALTHCHECK")), "compose.yaml": compose_test[1:]}


@pytest.mark.asyncio
@pytest.mark.parametrize("source", ["Dockerfile", "compose.yaml"])
async def test_healthcheck_command_passes_on_a_live_gateway_and_fails_without_one(source: str) -> None:
    command = _healthchecks()[source]
    url = url_in(command)
    origin = f"{urlparse(url).scheme}://{urlparse(url).netloc}"
    assert command[0] in ("python", "python3")

    async def run(base: str) -> int:
        argv = [sys.executable] + [part.replace(origin, base) for part in command[1:]]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), 20)

    async with running_gateway(Config.from_mapping({})) as base:
        assert await run(base) == 0, f"{source} health check failed against a healthy gateway: {shlex.join(command)}"
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert await run(dead) != 0, f"{source} health check passes with no server listening"


# ---------------------------------------------------------------------------------------------- Kubernetes

def test_container_port_is_the_images_port() -> None:
    ports = container_ports()
    assert ports.get("http") in exposed_ports(), f"container port http={ports.get('http')}, image EXPOSEs {exposed_ports()}"


def test_probes_hit_real_routes_on_the_container_port() -> None:
    container = gateway_container()
    paths = app_paths()
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind not in container:
            continue
        get = container[kind]["httpGet"]
        assert get["path"] in paths, f"{kind} path {get['path']} is not a route of the app ({sorted(paths)})"
        assert resolve_port(get["port"]) == container_ports()["http"], f"{kind} port {get['port']}"
    annotations = deployment()["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/path" in annotations:
        assert annotations["prometheus.io/path"] in paths
        assert int(annotations["prometheus.io/port"]) == container_ports()["http"]


def test_pod_security_context_is_non_root_and_locked_down() -> None:
    container = gateway_container()["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container.get("runAsNonRoot", True) is True
    assert container.get("runAsUser", 10001) == 10001
    assert "ALL" in container["capabilities"]["drop"]


def test_deployment_selects_its_pods_and_reads_the_configmap_and_secret() -> None:
    spec = deployment()["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    refs = {next(iter(k for k in ref if k.endswith("Ref"))): ref for ref in gateway_container()["envFrom"]}
    assert refs["configMapRef"]["configMapRef"]["name"] == manifest("configmap.yaml", "ConfigMap")["metadata"]["name"]
    assert refs["secretRef"]["secretRef"]["name"] == manifest("secret.example.yaml", "Secret")["metadata"]["name"]


def test_service_targets_the_named_container_port() -> None:
    service = manifest("service.yaml", "Service")
    assert service["spec"]["type"] == "ClusterIP"
    [port] = service["spec"]["ports"]
    assert port["port"] == 80
    assert isinstance(port["targetPort"], str), "target the container's port by name, not number"
    assert resolve_port(port["targetPort"]) == container_ports()["http"]
    pod_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items(), "the Service selects no gateway pod"


def test_termination_grace_outlasts_prestop_and_server_shutdown() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    command = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    prestop = int(command[1])
    assert prestop >= 5, "the preStop sleep should let endpoints/load balancers stop routing first"
    server = build_server(create_app(Config.from_mapping({})), Config.from_mapping({}), handle_signals=False)
    shutdown = server.config.timeout_graceful_shutdown or 0
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > prestop, f"terminationGracePeriodSeconds {grace} <= preStop sleep {prestop}"
    assert grace >= prestop + shutdown, f"no time left for the server's {shutdown} s graceful shutdown"


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    resources = load_yaml(K8S / "kustomization.yaml")["resources"]
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == manifests - {"secret.example.yaml"}


def test_replicas_share_one_session_store() -> None:
    session_store = Config.load(None, manifest("configmap.yaml", "ConfigMap")["data"]).session_store
    assert deployment()["spec"]["replicas"] == 1 or session_store != "memory"


# ---------------------------------------------------------------------------------------------- environment

def test_every_environment_name_is_a_config_key_or_documented_variable() -> None:
    allowed = allowed_env_names()
    for source, env in environment_sources().items():
        unknown = sorted(set(env) - allowed)
        assert not unknown, f"{source} sets {unknown}: not VOXRAY_<KEY> of a Config field nor a documented variable"


def test_configmap_values_are_strings_that_load() -> None:
    data = manifest("configmap.yaml", "ConfigMap")["data"]
    not_strings = {k: v for k, v in data.items() if not isinstance(v, str)}
    assert not not_strings, f"ConfigMap values must be strings (quote them): {not_strings}"
    assert not {"VOXRAY_HOST", "VOXRAY_PORT"} & set(data), "the image's --host/--port flags override these"
    secret = environment_sources()["k8s/secret.example.yaml"]
    for environ in (data, {**data, **secret}):
        config = Config.load(None, environ)
        assert config.session_store == "memory"
        assert not config.recording.enable and not config.transcripts.enable


def test_compose_publishes_the_image_port_and_checks_health() -> None:
    service = compose_service()
    build = service["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT, f"compose builds from {context}, the Dockerfile expects the repository root"
    assert (context / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    container_side = set()
    for port in service["ports"]:
        assert isinstance(port, (str, dict)), f"quote port mappings (YAML reads 8000:8000 as a number): {port!r}"
        container_side.add(int(port["target"]) if isinstance(port, dict) else int(str(port).split(":")[-1].split("/")[0]))
    assert container_side == exposed_ports()
    url = urlparse(url_in(service["healthcheck"]["test"]))
    assert url.path == "/health" and url.port in exposed_ports()
    assert "deploy" not in service or service["deploy"].get("replicas", 1) == 1, "this release runs one instance"


def test_compose_environment_defaults_to_empty_and_loads() -> None:
    env = compose_service()["environment"]
    assert isinstance(env, dict), "use the mapping form for environment"
    for name in ("VOXRAY_PUBLIC_URL", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "OPENAI_API_KEY"):
        assert env.get(name) == f"${{{name}:-}}", f"{name} should pass through from the host as ${{{name}:-}}"
    resolved = {k: interpolate(str(v), {}) for k, v in env.items()}
    config = Config.load(None, resolved)
    assert config.port == 8000 and not config.public_url
