"""The deployment files agree with the app: ports, probes, user, entrypoint, config keys, shutdown.

No container engine or cluster runs here: the Dockerfile, the compose file, the load balancer's
config and the Kubernetes manifests are parsed and checked against the real ``Config`` (every
setting they pass is loaded through it), CLI parser, route table and server settings. The one
live test runs the health-check commands against a gateway on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import re
import shlex
import socket
import sys
import tempfile
import tomllib
import typing
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from gateway.app import create_app
from gateway.config import CarriersConfig, Config, ConfigError
from gateway.server import build_server
from pipeline.providers import PROVIDERS
from tests.conftest import running_gateway

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# After the drain's own deadlines and uvicorn's graceful shutdown, the lifespan finalises what is
# left and closes the recording uploader and the transcript writer: time to flush, in seconds.
FLUSH_MARGIN_S = 10.0


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


def image_uid() -> int:
    user = runtime().last("USER").split(":")[0]
    uid = int(user) if user.isdigit() else None
    if uid is None:   # a name: find the uid it was created with
        for run in runtime().all("RUN"):
            m = re.search(rf"useradd\b[^&;]*--uid[ =](\d+)[^&;]*\s{re.escape(user)}\b", run)
            uid = int(m.group(1)) if m else uid
    assert uid is not None, f"cannot tell the uid of USER {user}"
    return uid


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


def pod_spec() -> dict[str, Any]:
    return deployment()["spec"]["template"]["spec"]


def pod_labels() -> dict[str, str]:
    return deployment()["spec"]["template"]["metadata"]["labels"]


def gateway_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1, "the Deployment should run exactly the gateway container"
    return containers[0]


def container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in gateway_container()["ports"]}


def container_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in gateway_container().get("env", []) if "value" in e}


def resolve_port(port: int | str) -> int:
    """A probe/Service port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    ports = container_ports()
    assert port in ports, f"port name {port!r} is not one of the container's ports {ports}"
    return ports[port]


def prestop_sleep_s() -> int:
    command = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def secret_values() -> dict[str, str]:
    secret = manifest("secret.example.yaml", "Secret")
    return {**secret.get("data", {}), **secret.get("stringData", {})}


def configmap_json() -> dict[str, Any]:
    data = manifest("configmap.yaml", "ConfigMap")["data"]
    assert set(data) == {"config.json"}, f"the ConfigMap should hold only config.json, found {sorted(data)}"
    assert isinstance(data["config.json"], str)
    raw = json.loads(data["config.json"])
    assert isinstance(raw, dict)
    return raw


def k8s_config() -> Config:
    """What a pod loads: config.json (VOXRAY_CONFIG), then the container's env and the Secret."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(configmap_json()))
        return Config.load(path, {**container_env(), **secret_values()})


# compose -------------------------------------------------------------------------------------

class MissingVariable(Exception):
    """Compose's ``${VAR:?message}``/``${VAR?message}`` with VAR unset: compose refuses to start."""


def interpolate(value: str, host_env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``, ``${VAR?err}``,
    ``$VAR`` and ``$$`` against ``host_env``."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name") or m.group("bare"), m.group("op"), m.group("arg") or ""
        if op == ":-":
            return host_env.get(name) or arg
        if op == "-":
            return host_env.get(name, arg)
        if op == ":?" and not host_env.get(name) or op == "?" and name not in host_env:
            raise MissingVariable(f"{name}: {arg}")
        return host_env.get(name, "")
    pattern = r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)"
    return re.sub(pattern, sub, value)


@cache
def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "compose.yaml")


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def gateway_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if re.fullmatch(r"gateway-\d+", name)}


def lb_service() -> dict[str, Any]:
    [lb] = [s for s in services().values() if str(s.get("image", "")).startswith("haproxy:")]
    return lb


def example_env() -> dict[str, str]:
    """deploy/.env.example as compose would read it (KEY=VALUE lines)."""
    env = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and "#" not in value, f".env.example: keep comments on their own lines: {line!r}"
            env[key.strip()] = value.strip()
    return env


def service_env(service: dict[str, Any], host_env: dict[str, str]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form for environment"
    return {k: interpolate(str(v), host_env) for k, v in env.items()}


def gateway_config(name: str, host_env: dict[str, str] | None = None) -> Config:
    env = service_env(gateway_services()[name], example_env() if host_env is None else host_env)
    return Config.load(None, env)


def duration_s(text: str | int) -> float:
    """A compose duration: ``90s``, ``1m30s``, ``500ms``, ``1h``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a compose duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (named volume or ./path) of a service's short-form volumes."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        mounts[target] = source
    return mounts


def under(path: str, parent: str) -> bool:
    return PurePosixPath(parent) in PurePosixPath(path).parents or path == parent


# HAProxy -------------------------------------------------------------------------------------

@cache
def haproxy() -> dict[str, tuple[tuple[str, ...], ...]]:
    """``"backend gateways"`` -> its lines as word tuples (comments dropped)."""
    sections: dict[str, list[tuple[str, ...]]] = {}
    current: list[tuple[str, ...]] | None = None
    for raw in (DEPLOY / "haproxy.cfg").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        words = tuple(line.split())
        if not raw[0].isspace():
            current = sections.setdefault(" ".join(words), [])
        else:
            assert current is not None, f"haproxy.cfg: a setting outside any section: {raw!r}"
            current.append(words)
    return {name: tuple(lines) for name, lines in sections.items()}


def haproxy_lines(section: str, keyword: str) -> list[tuple[str, ...]]:
    return [w for w in haproxy()[section] if w[0] == keyword]


def haproxy_seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", text)
    assert m, f"not an HAProxy time: {text!r}"
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 0.001}[m.group(2)]


# app -----------------------------------------------------------------------------------------

def app_paths() -> set[str]:
    app = create_app(Config.from_mapping({}))   # building the app does not start it
    return {route.path for route in app.routes}


def shutdown_budget_s(config: Config) -> float:
    """SIGTERM to exit: the drain (gateway/drain.py: calls run for drain_timeout_secs, then hear the
    goodbye for up to goodbye_timeout_secs, then hang up within hangup_timeout_secs + 1), uvicorn's
    graceful shutdown, then the lifespan's flush."""
    server = build_server(create_app(config), config, handle_signals=False)
    graceful = server.config.timeout_graceful_shutdown or 0
    return (config.drain_timeout_secs + config.goodbye_timeout_secs + config.hangup_timeout_secs + 1.0
            + graceful + FLUSH_MARGIN_S)


def allowed_env_names() -> set[str]:
    """``VOXRAY_<KEY>`` / ``VOXRAY_<SECTION>_<KEY>`` for real Config fields, plus the documented
    variables read outside Config's keys: VOXRAY_CONFIG, the carrier credentials, providers'
    keys/URLs and the standard AWS variables (recordings)."""
    hints = typing.get_type_hints(Config)
    names = {"VOXRAY_CONFIG", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN",
             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"}
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
    return {
        "k8s/deployment.yaml": container_env(),
        "k8s/secret.example.yaml": secret_values(),
        **{f"compose.yaml {name}": s["environment"] for name, s in gateway_services().items()},
    }


SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|DSN|CREDENTIAL", re.IGNORECASE)
REAL_LOOKING = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                # AWS access key id
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),         # OpenAI-style key
    re.compile(r"\bAC[0-9a-f]{32}\b"),              # Twilio account SID
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY"),
    # any long run mixing digits, upper and lower case (base64/hex-like keys and tokens)
    re.compile(r"(?=[\w/+=-]*\d)(?=[\w/+=-]*[A-Z])(?=[\w/+=-]*[a-z])[\w/+=-]{24,}"),
]


def real_looking(value: str) -> list[str]:
    return [m.group(0) for p in REAL_LOOKING for m in p.finditer(value)]


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


def test_dockerfile_entrypoint_is_the_declared_console_script_under_an_init() -> None:
    """tini is PID 1: it forwards SIGTERM to voxray (the drain) and reaps orphans, which a Python PID 1 does not."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = exec_form(runtime().last("ENTRYPOINT"))
    assert entrypoint == ["/usr/bin/tini", "--", "voxray"], entrypoint
    assert scripts.get("voxray") == "gateway.__main__:main", scripts
    assert any(re.search(r"apt-get install [^&]*\btini\b", run) for run in runtime().all("RUN")), \
        "the runtime stage should install tini (Debian's package) for its ENTRYPOINT"


def test_dockerfile_cmd_port_is_exposed_and_is_the_app_default() -> None:
    from gateway.__main__ import _parser

    entrypoint = exec_form(runtime().last("ENTRYPOINT"))
    args = _parser().parse_args(entrypoint[entrypoint.index("voxray") + 1:] + exec_form(runtime().last("CMD")))
    assert args.command == "serve"
    assert args.host == "0.0.0.0", "inside a container the server must listen on all interfaces"
    default_port = Config.from_mapping({}).port
    assert args.port == default_port == 8000
    assert exposed_ports() == {args.port}, f"EXPOSE {exposed_ports()} but CMD serves on {args.port}"


def test_dockerfile_runs_as_the_non_root_voxray_user() -> None:
    user = runtime().last("USER").split(":")[0]
    uid = image_uid()
    assert uid != 0 and user != "root"
    assert any(re.search(rf"useradd\b.*--uid[ =]{uid}\b.*\svoxray\b", run) for run in runtime().all("RUN")), \
        f"the runtime stage should create the user voxray with uid {uid}"
    pod = pod_spec()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid == 10001


def test_dockerfile_stops_with_sigterm_so_the_gateway_drains() -> None:
    assert runtime().last("STOPSIGNAL") == "SIGTERM"
    for name, service in gateway_services().items():
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM", f"compose {name}: stop_signal"


def test_dockerfile_bakes_in_no_secret() -> None:
    for stage in dockerfile():
        for keyword in ("ENV", "ARG"):
            for args in stage.all(keyword):
                names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
                secret = [n for n in names if SECRET_NAME.search(n)]
                assert not secret, f"{keyword} {args!r} bakes a secret-named variable {secret} into the image"
        for args in stage.all("COPY") + stage.all("ADD"):
            sources = [s for s in args.split()[:-1] if not s.startswith("--")]
            bad = [s for s in sources if s in (".", "./") or re.search(r"(^|/)\.env|\.pem$|\.key$", s)]
            assert not bad, f"COPY/ADD {args!r} may copy secrets (or the whole context) into the image"


def test_dockerfile_healthcheck_hits_health_on_the_exposed_port() -> None:
    url = urlparse(url_in(healthcheck_command(runtime().last("HEALTHCHECK"))))
    assert url.hostname in ("127.0.0.1", "localhost")
    assert url.port in exposed_ports()
    assert url.path == "/health" and url.path in app_paths()
    assert healthcheck_command(runtime().last("HEALTHCHECK"))[0] in ("python", "python3"), \
        "python:3.11-slim has no curl/wget; use python"


def test_dockerfile_creates_the_spool_directories_for_its_user() -> None:
    """Named volumes (compose) copy the image directory's owner; the uid must be able to write."""
    spools = {c.recording.spool_dir for c in map(gateway_config, gateway_services())} | \
             {c.transcripts.spool_dir for c in map(gateway_config, gateway_services())} | \
             {k8s_config().recording.spool_dir, k8s_config().transcripts.spool_dir}
    assert "" not in spools, "set recording.spool_dir and transcripts.spool_dir (default: the container's /tmp)"
    runs = " && ".join(runtime().all("RUN"))
    for spool in spools:
        assert re.search(rf"mkdir -p [^&]*{re.escape(spool)}\b", runs), f"the image does not create {spool}"
        assert any(re.search(rf"chown -R {image_uid()}(:\d+)? {re.escape(parent)}\b", runs)
                   for parent in [spool, *map(str, PurePosixPath(spool).parents)]), \
            f"{spool} is not owned by uid {image_uid()} in the image"


def _healthchecks() -> dict[str, list[str]]:
    checks = {"Dockerfile": healthcheck_command(runtime().last("HEALTHCHECK"))}
    for name, service in gateway_services().items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", f"compose {name} healthcheck: use the [\"CMD\", ...] exec form"
        checks[f"compose.yaml {name}"] = test[1:]
    return checks


@pytest.mark.asyncio
@pytest.mark.parametrize("source", ["Dockerfile", "compose.yaml gateway-1", "compose.yaml gateway-2"])
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
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True


def test_deployment_mounts_the_configmap_as_its_config_and_reads_the_secret() -> None:
    spec = deployment()["spec"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels().items()
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    config_path = PurePosixPath(container_env()["VOXRAY_CONFIG"])
    [mount] = [m for m in gateway_container()["volumeMounts"] if PurePosixPath(m["mountPath"]) == config_path.parent]
    assert mount.get("readOnly") is True
    source = volumes[mount["name"]]["configMap"]
    assert source["name"] == manifest("configmap.yaml", "ConfigMap")["metadata"]["name"]
    keys = {item["path"]: item["key"] for item in source.get("items", [])} or {"config.json": "config.json"}
    assert keys.get(config_path.name) == "config.json", f"{config_path} is not the ConfigMap's config.json"
    refs = [ref["secretRef"]["name"] for ref in gateway_container()["envFrom"] if "secretRef" in ref]
    assert refs == [manifest("secret.example.yaml", "Secret")["metadata"]["name"]]


def test_service_targets_the_named_container_port() -> None:
    service = manifest("service.yaml", "Service")
    assert service["spec"]["type"] == "ClusterIP"
    [port] = service["spec"]["ports"]
    assert port["port"] == 80
    assert isinstance(port["targetPort"], str), "target the container's port by name, not number"
    assert resolve_port(port["targetPort"]) == container_ports()["http"] == Config.from_mapping({}).port
    assert service["spec"]["selector"].items() <= pod_labels().items(), "the Service selects no gateway pod"
    assert service["spec"].get("sessionAffinity", "None") == "None", "sessions are in Redis: no affinity needed"


def test_termination_grace_outlasts_prestop_and_the_drain() -> None:
    prestop = prestop_sleep_s()
    assert prestop >= 5, "the preStop sleep should let endpoints/load balancers stop routing first"
    config = k8s_config()
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > prestop + config.drain_timeout_secs, \
        f"terminationGracePeriodSeconds {grace} <= preStop {prestop} + drain_timeout_secs {config.drain_timeout_secs}"
    budget = prestop + shutdown_budget_s(config)
    assert grace >= budget, (f"terminationGracePeriodSeconds {grace} < {budget:.0f} s: preStop, drain, goodbye, "
                             "hang-up, server shutdown and flush; pods would be killed mid-drain")


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    resources = load_yaml(K8S / "kustomization.yaml")["resources"]
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == manifests - {"secret.example.yaml"}


def test_replicas_share_one_session_store() -> None:
    """More than one replica requires Redis sessions: a webhook and its media socket may land on
    different pods."""
    replicas = deployment()["spec"]["replicas"]
    hpa_min = manifest("hpa.yaml", "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    config = k8s_config()
    assert replicas >= 2 and hpa_min >= 2, "run at least two gateways"
    for count in (replicas, hpa_min):
        assert count == 1 or config.session_store == "redis", \
            f"{count} replicas with session_store {config.session_store!r}: a media socket may reach a pod " \
            "without its session"


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa = manifest("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": deployment()["apiVersion"], "kind": "Deployment",
                      "name": deployment()["metadata"]["name"]}
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert "cpu" in gateway_container()["resources"]["requests"], "CPU utilisation is measured against the request"


def test_pdb_covers_the_gateway_pods_and_lets_one_go() -> None:
    pdb = manifest("pdb.yaml", "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels().items()
    hpa_min = manifest("hpa.yaml", "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    if "maxUnavailable" in pdb["spec"]:
        assert int(pdb["spec"]["maxUnavailable"]) >= 1, "maxUnavailable 0 blocks every node drain"
    else:
        assert int(pdb["spec"]["minAvailable"]) < hpa_min, "minAvailable >= replicas blocks every node drain"


def test_spool_dirs_are_on_a_writable_pod_volume() -> None:
    config = k8s_config()
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert gateway_container()["securityContext"].get("readOnlyRootFilesystem") is True
    for key, spool in (("recording.spool_dir", config.recording.spool_dir),
                       ("transcripts.spool_dir", config.transcripts.spool_dir)):
        mounts = [m for m in gateway_container()["volumeMounts"] if under(spool, m["mountPath"])]
        assert mounts, f"{key} {spool!r} is on the read-only root filesystem"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        assert not mount.get("readOnly")
        assert {"emptyDir", "persistentVolumeClaim", "ephemeral"} & set(volumes[mount["name"]]), \
            f"{key} is on volume {mount['name']}, which is neither an emptyDir nor a PVC"


def test_configmap_config_json_loads_with_the_secret() -> None:
    raw = configmap_json()
    assert not {"host", "port"} & set(raw), "the image's --host/--port flags override these"
    assert "dsn" not in raw.get("transcripts", {}), "transcripts.dsn holds a password: keep it in the Secret"
    with pytest.raises(ConfigError, match=r"transcripts\.dsn"):   # without the Secret it fails fast
        Config.from_mapping(raw)
    config = k8s_config()   # unknown keys or bad values raise ConfigError naming the key
    assert config.session_store == "redis" and urlparse(config.redis_url).scheme in ("redis", "rediss")
    assert config.recording.enable and config.recording.bucket
    assert config.transcripts.enable and config.transcripts.driver == "postgres"
    assert urlparse(config.transcripts.dsn).scheme in ("postgres", "postgresql")
    assert "drain_timeout_secs" in raw, "set drain_timeout_secs explicitly: the grace period depends on it"
    assert config.public_url.startswith("https://")


def test_secret_template_holds_only_placeholders() -> None:
    values = secret_values()
    assert values, "the Secret template lists no keys"
    assert "data" not in manifest("secret.example.yaml", "Secret"), "use stringData with placeholders"
    for key, value in values.items():
        assert isinstance(value, str)
        assert value == "" or "REPLACE_ME" in value, f"{key}: use a REPLACE_ME placeholder, not a value"
        assert not real_looking(value.replace("REPLACE_ME", "")), f"{key} looks like a real secret"
    for required in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VOXRAY_TRANSCRIPTS_DSN"):
        assert required in values, f"the Secret template should list {required}"


# ---------------------------------------------------------------------------------------------- compose

def test_compose_runs_two_gateways_from_the_repo_image() -> None:
    gateways = gateway_services()
    assert len(gateways) == 2, f"expected two gateway services, found {sorted(gateways)}"
    images = set()
    for name, service in gateways.items():
        build = service["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT, f"{name} builds from {context}, the Dockerfile expects the repository root"
        assert (context / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
        assert "ports" not in service, f"{name} publishes ports: reach the gateways only through the load balancer"
        assert "deploy" not in service, f"{name}: scale by adding gateway services behind the load balancer"
        images.add(service["image"])
    assert len(images) == 1, f"the gateways run different images: {images}"


def test_compose_gateways_share_redis_s3_and_postgres() -> None:
    host_env = example_env()
    s3_args = [interpolate(a, host_env) for a in services()["s3"]["command"]]
    s3_flags = dict(a.lstrip("-").split("=", 1) for a in s3_args if a.startswith("-") and "=" in a)
    postgres_env = service_env(services()["postgres"], host_env)
    s3_env = service_env(services()["s3"], host_env)
    for name in gateway_services():
        config = gateway_config(name)   # every value passes Config's validation
        env = service_env(gateway_services()[name], host_env)
        assert config.session_store == "redis"
        assert urlparse(config.redis_url).hostname in services(), f"{name}: redis_url names no service"
        assert config.recording.enable and config.recording.bucket == s3_flags["bucket"], \
            f"{name} records to {config.recording.bucket!r}, the S3 server creates {s3_flags.get('bucket')!r}"
        endpoint = urlparse(config.recording.endpoint_url)
        assert endpoint.hostname == "s3" and endpoint.port == int(s3_flags["s3.port"])
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == \
               (s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"]), f"{name} signs with other S3 keys"
        dsn = urlparse(config.transcripts.dsn)
        assert config.transcripts.enable and config.transcripts.driver == "postgres"
        assert dsn.hostname == "postgres" and dsn.hostname in services()
        assert (dsn.username, dsn.password, dsn.path.lstrip("/")) == \
               (postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"], postgres_env["POSTGRES_DB"])
        assert "VOXRAY_DRAIN_TIMEOUT_SECS" in env


def test_compose_refuses_to_start_without_the_required_secrets() -> None:
    host_env = example_env()
    for service in services().values():
        service_env(service, host_env)   # the example covers every required variable
        for value in map(str, service.get("command", [])):
            interpolate(value, host_env)
    for required in ("POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        with pytest.raises(MissingVariable, match=required):
            for service in gateway_services().values():
                service_env(service, {k: v for k, v in host_env.items() if k != required})


def test_compose_keeps_secrets_out_of_the_file() -> None:
    for name, service in services().items():
        for key, value in service.get("environment", {}).items():
            value = str(value)
            literal = re.sub(r"\$\{[^}]*\}", "", value)
            assert not real_looking(literal), f"{name}: {key} holds a literal that looks like a secret"
            if SECRET_NAME.search(key):
                assert "${" in value, f"{name}: {key} should come from the host environment (${{{key}...}})"
                password = urlparse(value).password if "://" in value else None
                assert password is None or password.startswith("${"), f"{name}: {key} has a literal password"
    for key, value in example_env().items():
        if SECRET_NAME.search(key):
            assert value in ("", "change-me"), f".env.example: {key} should be a change-me placeholder"


def test_compose_passes_carrier_credentials_through_and_loads_without_them() -> None:
    host_env = {k: v for k, v in example_env().items()
                if k in ("POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    for name, service in gateway_services().items():
        env = service["environment"]
        for var in ("VOXRAY_PUBLIC_URL", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "OPENAI_API_KEY"):
            assert env.get(var) == f"${{{var}:-}}", f"{name}: {var} should pass through from the host as ${{{var}:-}}"
        config = gateway_config(name, host_env)
        assert config.port == 8000 and not config.public_url


def test_compose_gateway_healthcheck_hits_health_on_the_image_port() -> None:
    for name, service in gateway_services().items():
        url = urlparse(url_in(service["healthcheck"]["test"]))
        assert url.path == "/health" and url.path in app_paths(), name
        assert url.port in exposed_ports(), name


def test_compose_depends_on_healthy_stores_and_every_dependency_has_a_healthcheck() -> None:
    for name, service in gateway_services().items():
        deps = service["depends_on"]
        assert isinstance(deps, dict), f"{name}: use depends_on with conditions"
        for store in ("redis", "postgres", "s3"):
            assert deps.get(store, {}).get("condition") == "service_healthy", f"{name} should wait for {store} healthy"
    assert set(gateway_services()) <= set(lb_service()["depends_on"]), \
        "the load balancer should depend on every gateway"
    for name, service in services().items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services(), f"{name} depends on unknown service {dep}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services()[dep], f"{name} waits for {dep} healthy, but {dep} has no healthcheck"
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_compose_stop_grace_outlasts_the_drain() -> None:
    for name, service in gateway_services().items():
        config = gateway_config(name)
        grace = duration_s(service["stop_grace_period"])
        assert grace > config.drain_timeout_secs, f"{name}: stop_grace_period {grace} s <= drain_timeout_secs"
        budget = shutdown_budget_s(config)
        assert grace >= budget, f"{name}: stop_grace_period {grace} s < {budget:.0f} s (drain, goodbye, hang-up, flush)"


def test_compose_spool_dirs_are_on_a_volume_of_their_own_per_gateway() -> None:
    declared = set(compose().get("volumes") or {})
    sources = []
    for name, service in gateway_services().items():
        config = gateway_config(name)
        mounts = volume_mounts(service)
        for key, spool in (("recording.spool_dir", config.recording.spool_dir),
                           ("transcripts.spool_dir", config.transcripts.spool_dir)):
            targets = [t for t in mounts if under(spool, t)]
            assert targets, f"{name}: {key} {spool!r} is not on a volume; a restart would lose its files"
            source = mounts[max(targets, key=len)]
            assert source in declared, f"{name}: {key} is on {source!r}, not a named volume"
            sources.append((name, source))
    by_volume: dict[str, set[str]] = {}
    for name, source in sources:
        by_volume.setdefault(source, set()).add(name)
    shared = {v: n for v, n in by_volume.items() if len(n) > 1}
    assert not shared, f"gateways share a spool volume (each would retry the other's uploads): {shared}"


def test_compose_images_are_pinned() -> None:
    for name, service in services().items():
        image = str(service["image"])
        if "build" in service:
            continue
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", f"{name}: pin the image version ({image})"


# ---------------------------------------------------------------------------------------------- load balancer

def test_load_balancer_publishes_its_frontend_and_mounts_its_config() -> None:
    lb = lb_service()
    mounts = volume_mounts(lb)
    config_source = mounts.get("/usr/local/etc/haproxy/haproxy.cfg")
    assert config_source and (DEPLOY / config_source).resolve() == DEPLOY / "haproxy.cfg"
    [frontend] = [s for s in haproxy() if s.startswith("frontend ")]
    [bind] = haproxy_lines(frontend, "bind")
    bind_port = int(bind[1].rsplit(":", 1)[1])
    published = {int(str(p).split(":")[-1]) for p in lb["ports"]}
    assert all(isinstance(p, str) for p in lb["ports"]), "quote port mappings (YAML may read 8000:8080 as a number)"
    assert published == {bind_port}, f"compose publishes {published}, HAProxy listens on {bind_port}"
    monitor = urlparse(url_in(lb["healthcheck"]["test"]))
    [(_, monitor_uri)] = haproxy_lines(frontend, "monitor-uri")
    assert monitor.port == bind_port and monitor.path == monitor_uri, "the LB healthcheck misses HAProxy's monitor-uri"
    assert monitor_uri not in app_paths(), "the LB's own health URI must not shadow an app route"


def test_load_balancer_proxies_http_and_websockets_to_both_gateways() -> None:
    [frontend] = [s for s in haproxy() if s.startswith("frontend ")]
    [(_, backend_name)] = haproxy_lines(frontend, "default_backend")
    backend = f"backend {backend_name}"
    modes = [w[1] for section in ("defaults", frontend, backend) if section in haproxy()
             for w in haproxy_lines(section, "mode")]
    assert modes and set(modes) == {"http"}, f"use mode http (it forwards WebSocket upgrades), got {modes}"
    servers = {w[1]: w[2] for w in haproxy_lines(backend, "server")}
    hosts = {address.rsplit(":", 1)[0] for address in servers.values()}
    assert hosts == set(gateway_services()), \
        f"HAProxy balances over {sorted(hosts)}, compose runs {sorted(gateway_services())}"
    port = Config.from_mapping({}).port
    assert {int(a.rsplit(":", 1)[1]) for a in servers.values()} == {port} and port in exposed_ports()
    default_server = haproxy_lines(backend, "default-server")
    for words in haproxy_lines(backend, "server"):
        assert "check" in words or any("check" in w for w in default_server), \
            f"server {words[1]} is not health-checked"
    text = (DEPLOY / "haproxy.cfg").read_text()
    tampering = [line for line in text.splitlines() if not line.strip().startswith("#")
                 and re.search(r"(set|del|replace)-header\s+(Upgrade|Connection)\b", line, re.IGNORECASE)]
    assert not tampering, f"the LB must pass Upgrade/Connection through untouched: {tampering}"


def test_load_balancer_keeps_media_sockets_for_a_whole_call() -> None:
    timeouts = {w[1]: haproxy_seconds(w[2]) for w in haproxy_lines("defaults", "timeout")}
    max_call = max(gateway_config(name).max_call_secs for name in gateway_services())
    assert timeouts.get("tunnel", 0) >= max_call, \
        f"timeout tunnel {timeouts.get('tunnel')} s is shorter than max_call_secs {max_call}: calls would be cut"
    for name in ("connect", "client", "server"):
        assert name in timeouts, f"set timeout {name} (HAProxy warns and never times out without it)"


def test_load_balancer_routes_only_to_ready_gateways() -> None:
    """A draining gateway (SIGTERM) answers /ready 503 and stops getting new calls."""
    [frontend] = [s for s in haproxy() if s.startswith("frontend ")]
    [(_, backend_name)] = haproxy_lines(frontend, "default_backend")
    backend = f"backend {backend_name}"
    assert ("option", "httpchk") in haproxy()[backend]
    [send] = [w for w in haproxy_lines(backend, "http-check") if w[1] == "send"]
    uri = send[send.index("uri") + 1]
    assert uri == gateway_container()["readinessProbe"]["httpGet"]["path"] == "/ready" and uri in app_paths()
    assert ("http-check", "expect", "status", "200") in haproxy()[backend]


# ---------------------------------------------------------------------------------------------- environment

def test_every_environment_name_is_a_config_key_or_documented_variable() -> None:
    allowed = allowed_env_names()
    for source, env in environment_sources().items():
        unknown = sorted(set(env) - allowed)
        assert not unknown, f"{source} sets {unknown}: not VOXRAY_<KEY> of a Config field nor a documented variable"


def test_gateways_trust_forwarded_headers_only_from_the_load_balancer() -> None:
    assert ("option", "forwardfor") in haproxy()["defaults"], "HAProxy should add X-Forwarded-For"
    [subnet] = [ipaddress.ip_network(c["subnet"]) for c in compose()["networks"]["default"]["ipam"]["config"]]
    lb_address = ipaddress.ip_address(lb_service()["networks"]["default"]["ipv4_address"])
    assert lb_address in subnet, f"the load balancer's address {lb_address} is outside the network {subnet}"
    for name in gateway_services():
        trusted = gateway_config(name).forwarded_allow_ips
        assert [ipaddress.ip_address(a) for a in trusted] == [lb_address], \
            f"{name} trusts X-Forwarded-For from {trusted}, the load balancer is {lb_address}"
    assert k8s_config().forwarded_allow_ips, "set forwarded_allow_ips to the Ingress controller's pod addresses"
