"""The docker compose stack (compose/) checked against the code, without a Docker engine.

`docker-compose config` resolves the stack with every profile on a copy of compose/ whose
secrets are throwaway files written by compose/make-secrets, with no secret and no
FLEETSCRIBE_* variable in the environment. The resolved services are then held to the
code: each fleetscribe service runs an entry point whose command line its click CLI
accepts, on the image meant for it; its FLEETSCRIBE_* variables and secret files are all
settings, and every setting is passed (or listed below with why not); the defaults compose
passes are the code's; Prometheus scrapes the ports FLEETSCRIBE_METRICS_PORT opens.
Each check is a function returning its problems, shown to fail on a mutated config too.

docker-compose 1.29 (Debian's) does not know the Compose-spec top-level `name:` key that
Compose v2, the documented runtime, reads; with it, the check removes that one line and
passes the same project name with `-p`. A `docker compose` v2 plugin is used when present.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml
from helpers import system_tool

from config.settings import SECRETS_DIR_VARIABLE, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
PROJECT = "fleetscribe"
PROFILES = ("training", "tools")
ENTRY_MODULES = ("worker", "producer", "db", "training")
PREFIX = "FLEETSCRIBE_"
SECRETS_MOUNT = "/run/secrets"

# Settings compose sets itself rather than taking from .env (.env.example names them in a
# comment, and they are not listed there as lines of their own).
BUILT_BY_COMPOSE = {
    "home": "a path inside the containers (/var/lib/fleetscribe, the fleetscribe-data volume)",
    "video_roots": "the archive is mounted at /videos in every container",
    "training_dir": "on the fleetscribe-data volume the trainer and workers share",
    "metrics_port": "per service, the ports prometheus/prometheus.yml scrapes",
    "broker_url": "a secret file (fleetscribe_broker_url), written by make-secrets",
    "database_url": "a secret file (fleetscribe_database_url), written by make-secrets",
    "flower_basic_auth": "a secret file (fleetscribe_flower_basic_auth), written by make-secrets",
}
# Settings compose never passes, with the reason. A setting the code reads that is neither
# passed nor listed here fails the test; so does one listed here that compose passes.
NOT_PASSED: dict[str, str] = {}
# The secrets each fleetscribe service needs, as settings.
NEEDS = {
    "migrate": {"database_url"},
    "worker": {"broker_url", "database_url"},
    "trainer": {"broker_url", "database_url"},
    "producer": {"broker_url", "database_url"},
    "flower": {"broker_url", "flower_basic_auth"},
}
SERVICES = {
    "redis", "postgres", "migrate", "worker", "trainer", "flower", "prometheus", "grafana",
    "producer",
}  # fmt: skip


def _tool(name: str, package: str) -> str:
    return system_tool(name, package)


@functools.cache
def _compose_v2() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    done = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    return done.returncode == 0


def _clean_env() -> dict[str, str]:
    """The environment with no secret, no FLEETSCRIBE_*, no compose variable in it."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "DOCKER_CONFIG")
    return {k: os.environ[k] for k in keep if k in os.environ}


def _copy_stack(dest: Path, *, env_file: str | None = None) -> Path:
    """compose/ copied to dest/compose (dest stands for the repository root, the build
    context), without any real secret, .env or override; .env from .env.example."""
    folder = dest / "compose"
    shutil.copytree(
        COMPOSE,
        folder,
        ignore=shutil.ignore_patterns("secrets", ".env", "docker-compose.override.yml"),
    )
    text = (COMPOSE / ".env.example").read_text() if env_file is None else env_file
    (folder / ".env").write_text(text)
    if not _compose_v2():
        compose_file = folder / "docker-compose.yml"
        source = compose_file.read_text()
        line = re.compile(rf"(?m)^name: {PROJECT}\n")
        assert len(line.findall(source)) == 1, f"docker-compose.yml: one 'name: {PROJECT}'"
        compose_file.write_text(line.sub("", source))
    return folder


def _compose_config(folder: Path) -> subprocess.CompletedProcess:
    if _compose_v2():
        argv = [shutil.which("docker"), "compose"]
    else:
        argv = [_tool("docker-compose", "docker-compose"), "-p", PROJECT]
    for profile in PROFILES:
        argv += ["--profile", profile]
    return subprocess.run(
        [*argv, "config"], cwd=folder, env=_clean_env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def _make_secrets(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(folder / "make-secrets")], env=_clean_env(), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


@dataclass
class Stack:
    folder: Path  # the copy of compose/
    config: dict  # `docker-compose config`, parsed
    output: str  # its text

    @property
    def secrets(self) -> Path:
        return self.folder / "secrets"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    if not _compose_v2():
        _tool("docker-compose", "docker-compose")
    folder = _copy_stack(tmp_path_factory.mktemp("stack"))
    made = _make_secrets(folder)
    assert made.returncode == 0, made.stdout + made.stderr
    done = _compose_config(folder)
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return Stack(folder, yaml.safe_load(done.stdout), done.stdout)


# --- Reading the resolved config --------------------------------------------------------


def _unescape(value):
    """Compose writes a literal $ as $$ in its output."""
    return value.replace("$$", "$") if isinstance(value, str) else value


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [_unescape(str(v)) for v in value]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: _unescape(v) for k, v in env.items()}


def _secret_names(service: dict) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets") or []}


def _mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume; a named volume's source is its name."""
    found = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            found.append((str(volume.get("source", "")), volume["target"]))
        else:
            parts = volume.split(":")
            found.append((parts[0], parts[1]))
    return found


def _named_volume_at(service: dict, config: dict, path: str) -> str | None:
    """The named volume mounted at `path` or above it, if any."""
    best = None
    for source, target in _mounts(service):
        inside = path == target or path.startswith(target.rstrip("/") + "/")
        named = source in (config.get("volumes") or {})
        if inside and named and (best is None or len(target) > len(best[1])):
            best = (source, target)
    return best[0] if best else None


def _wants_gpus(service: dict) -> bool:
    devices = (
        ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    ).get("devices") or []
    return any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def _dockerfile_instruction(dockerfile: Path, name: str) -> list[str] | None:
    """The last ENTRYPOINT or CMD of a Dockerfile (exec form), None if it has none."""
    found = None
    for line in dockerfile.read_text().splitlines():
        if line.startswith(name + " "):
            found = json.loads(line[len(name) + 1 :])
    return found


def _images(config: dict, compose_dir: Path) -> dict[str, Path]:
    """Image name -> the Dockerfile that builds it (from the services with `build`)."""
    images = {}
    for service in config["services"].values():
        build = service.get("build")
        if build:
            context = Path(build["context"])
            images[service["image"]] = (context / build.get("dockerfile", "Dockerfile")).resolve()
    assert {p.name for p in images.values()} == {"Dockerfile.app", "Dockerfile.worker"}
    # the Dockerfiles of the copy are compose/'s own
    return {image: COMPOSE / path.name for image, path in images.items()}


def _argv(service: dict, dockerfile: Path) -> list[str]:
    """What the container runs: entrypoint + command, as Docker combines them."""
    if "entrypoint" in service:
        entrypoint = _as_list(service["entrypoint"])
        command = _as_list(service.get("command"))  # an entrypoint set here drops CMD
    else:
        entrypoint = _dockerfile_instruction(dockerfile, "ENTRYPOINT") or []
        if "command" in service:
            command = _as_list(service["command"])
        else:
            command = _dockerfile_instruction(dockerfile, "CMD") or []
    return [*entrypoint, *command]


@dataclass
class Parsed:
    module: str
    commands: list[str]  # the subcommands, e.g. ["worker"] for python -m training worker
    command: click.Command  # the last one
    params: dict

    def option(self, flag: str):
        """The value of the option spelt `flag` (e.g. --db), defaults included."""
        (name,) = [p.name for p in self.command.params if flag in p.opts]
        return self.params[name]


def _protected(ctx: click.Context) -> list[str]:
    """The subcommand click set aside (ctx.protected_args, private since click 8.2)."""
    if hasattr(ctx, "_protected_args"):
        return list(ctx._protected_args)
    return list(ctx.protected_args)


def parse_entry_point(argv: list[str]) -> Parsed:
    """`python -m MODULE ARGS` parsed by the module's click CLI without running it (option
    callbacks run, command bodies do not); a click.UsageError if the CLI refuses it."""
    if argv[:2] != ["python", "-m"] or len(argv) < 3 or argv[2] not in ENTRY_MODULES:
        raise ValueError(f"not a fleetscribe entry point (python -m {ENTRY_MODULES}): {argv}")
    module, args = argv[2], argv[3:]
    assert importlib.util.find_spec(f"{module}.__main__"), f"no {module}/__main__.py"
    command = importlib.import_module(f"{module}.__main__").cli
    ctx = command.make_context(f"python -m {module}", list(args))
    commands = []
    while isinstance(command, click.Group):
        rest = [*_protected(ctx), *ctx.args]
        if not rest:
            break
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
        commands.append(name)
    return Parsed(module, commands, command, ctx.params)


def _fleetscribe_services(config: dict, compose_dir: Path) -> dict[str, tuple[dict, Path]]:
    images = _images(config, compose_dir)
    return {
        name: (service, images[service["image"]])
        for name, service in config["services"].items()
        if service.get("image") in images
    }


# --- The checks -------------------------------------------------------------------------


def entry_point_problems(config: dict, compose_dir: Path) -> list[str]:
    problems = []
    for name, (service, dockerfile) in _fleetscribe_services(config, compose_dir).items():
        argv = _argv(service, dockerfile)
        try:
            parsed = parse_entry_point(argv)
        except (ValueError, click.ClickException) as e:
            problems.append(f"{name}: {' '.join(argv)}: {e}")
            continue
        gpu_job = parsed.module == "worker" and not parsed.commands  # the describe worker
        gpu_job |= parsed.module == "training" and parsed.commands == ["worker"]
        want = "Dockerfile.worker" if gpu_job else "Dockerfile.app"
        if dockerfile.name != want:
            problems.append(f"{name}: runs {' '.join(argv)} on the {dockerfile.name} image")
        if _wants_gpus(service) != gpu_job:
            problems.append(f"{name}: GPU reservation {_wants_gpus(service)}, GPU job {gpu_job}")
    return problems


def settings_problems(config: dict, compose_dir: Path) -> list[str]:
    """Every FLEETSCRIBE_* variable and fleetscribe_* secret a service gets is a setting;
    every setting is passed somewhere or in NOT_PASSED; each service has what it needs."""
    fields = set(Settings.model_fields)
    problems, passed = [], set()
    for name, (service, _dockerfile) in _fleetscribe_services(config, compose_dir).items():
        env = _env(service)
        given = set()
        for variable in env:
            if not variable.startswith(PREFIX) or variable == SECRETS_DIR_VARIABLE:
                continue
            field = variable[len(PREFIX) :].lower()
            if field not in fields or variable != variable.upper():
                problems.append(f"{name}: {variable} is not a fleetscribe setting")
            elif field in BUILT_BY_COMPOSE and BUILT_BY_COMPOSE[field].startswith("a secret"):
                problems.append(f"{name}: {variable} in the environment (a secret file's)")
            given.add(field)
        for secret in _secret_names(service):
            if not secret.startswith(PREFIX.lower()):
                continue
            field = secret[len(PREFIX) :]
            if field not in fields:
                problems.append(f"{name}: secret {secret} is no setting's file")
            if env.get(SECRETS_DIR_VARIABLE) != SECRETS_MOUNT:
                problems.append(f"{name}: secret {secret} without {SECRETS_DIR_VARIABLE}")
            given.add(field)
        for field in sorted(NEEDS.get(name, set()) - given):
            problems.append(f"{name}: needs {PREFIX}{field.upper()}")
        passed |= given
    for field in sorted(fields - passed - set(NOT_PASSED)):
        problems.append(f"{PREFIX}{field.upper()}: a setting that compose never passes")
    for field in sorted(set(NOT_PASSED) & passed):
        problems.append(f"{PREFIX}{field.upper()}: in NOT_PASSED, but compose passes it")
    return problems


def _service_settings(service: dict, secrets: Path, view: Path, monkeypatch) -> Settings:
    """Settings as the service's process reads them: its environment, and a secrets folder
    holding the secret files it mounts (and only those)."""
    view.mkdir(parents=True)
    for secret in _secret_names(service):
        shutil.copy(secrets / secret, view / secret)
    for variable in list(os.environ):
        if variable.upper().startswith(PREFIX):
            monkeypatch.delenv(variable)
    for variable, value in _env(service).items():
        if variable.startswith(PREFIX):
            monkeypatch.setenv(variable, str(view) if variable == SECRETS_DIR_VARIABLE else value)
    return Settings()


def default_problems(config, compose_dir, secrets: Path, tmp_path, monkeypatch) -> list[str]:
    """The values compose passes when .env sets nothing are the code's defaults."""
    for variable in list(os.environ):
        if variable.upper().startswith(PREFIX):
            monkeypatch.delenv(variable)
    defaults = Settings()
    problems = []
    for name, (service, _df) in _fleetscribe_services(config, compose_dir).items():
        with monkeypatch.context() as m:
            got = _service_settings(service, secrets, tmp_path / name, m)
        for field in Settings.model_fields:
            if field not in BUILT_BY_COMPOSE and getattr(got, field) != getattr(defaults, field):
                problems.append(
                    f"{name}: {PREFIX}{field.upper()} is {getattr(got, field)!r} by default, "
                    f"the code's default is {getattr(defaults, field)!r}"
                )
    return problems


def _metrics_ports(config: dict, compose_dir: Path) -> set[tuple[str, int]]:
    """(service, port) of every worker process that serves /metrics."""
    found = set()
    for name, (service, dockerfile) in _fleetscribe_services(config, compose_dir).items():
        port = int(_env(service).get(PREFIX + "METRICS_PORT") or 0)
        if not port:
            continue
        parsed = parse_entry_point(_argv(service, dockerfile))
        processes = len(parsed.params.get("gpus") or [None]) if parsed.module == "worker" else 1
        found |= {(name, port + i) for i in range(processes)}
    return found


def _scraped(prometheus: dict) -> set[tuple[str, int]]:
    found = set()
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            found |= {(host, int(sd["port"])) for host in sd["names"]}
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                found.add((host, int(port)))
    return found


def scrape_problems(config: dict, compose_dir: Path, prometheus: dict) -> list[str]:
    missing = _metrics_ports(config, compose_dir) - _scraped(prometheus)
    return [
        f"{name}:{port} serves /metrics; prometheus.yml does not scrape it"
        for name, port in sorted(missing)
    ]


def _prometheus_config() -> dict:
    return yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())


# --- Tests ------------------------------------------------------------------------------


def test_compose_config_resolves_every_service_with_throwaway_secrets(stack):
    assert set(stack.config["services"]) == SERVICES
    # nothing secret was written into the resolved config: secrets stay files
    for secret in stack.secrets.iterdir():
        value = secret.read_text().strip()
        password = value.rsplit(":", 1)[-1] if ":" in value and "//" not in value else value
        assert password not in stack.output, secret.name
    for service in stack.config["services"].values():
        assert not {v for v in _env(service) if "PASSWORD" in v and not v.endswith("_FILE")}


def test_compose_config_fails_without_a_required_value(tmp_path):
    if not _compose_v2():
        _tool("docker-compose", "docker-compose")
    example = (COMPOSE / ".env.example").read_text()
    folder = _copy_stack(tmp_path, env_file=re.sub(r"(?m)^VIDEO_ARCHIVE=.*\n", "", example))
    assert _make_secrets(folder).returncode == 0
    done = _compose_config(folder)
    assert done.returncode != 0 and "VIDEO_ARCHIVE" in done.stderr, done.stderr


def test_the_raw_file_names_the_project():
    raw = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert raw["name"] == PROJECT  # Compose v2 reads it; the volumes are fleetscribe_*


def test_make_secrets_writes_consistent_files_that_git_ignores_and_settings_read(
    stack, tmp_path, monkeypatch
):
    s = {p.name: p.read_text() for p in stack.secrets.iterdir()}
    declared = {name: Path(spec["file"]) for name, spec in stack.config.get("secrets", {}).items()}
    assert set(s) == set(declared)  # make-secrets writes exactly the files compose mounts
    for name, path in declared.items():
        assert path.parent.resolve() == stack.secrets.resolve(), name
    redis_pw, pg_pw = s["redis_password"], s["postgres_password"]
    assert re.fullmatch(r"[0-9a-f]{48}", redis_pw) and re.fullmatch(r"[0-9a-f]{48}", pg_pw)
    assert s["fleetscribe_broker_url"] == f"redis://:{redis_pw}@redis:6379/0"
    assert s["fleetscribe_database_url"] == (
        f"postgresql+psycopg://fleetscribe:{pg_pw}@postgres:5432/fleetscribe"
    )
    assert re.fullmatch(r"admin:[0-9a-f]{48}", s["fleetscribe_flower_basic_auth"])
    assert stack.secrets.stat().st_mode & 0o077 == 0  # the folder: the operator's alone

    # run again: every file kept as it was
    again = _make_secrets(stack.folder)
    assert again.returncode == 0 and "wrote" not in again.stdout
    assert {p.name: p.read_text() for p in stack.secrets.iterdir()} == s

    # the settings read them through FLEETSCRIBE_SECRETS_DIR, as the containers do
    for variable in list(os.environ):
        if variable.upper().startswith(PREFIX):
            monkeypatch.delenv(variable)
    monkeypatch.setenv(SECRETS_DIR_VARIABLE, str(stack.secrets))
    settings = Settings()
    assert settings.broker_url == s["fleetscribe_broker_url"]
    assert settings.database_url == s["fleetscribe_database_url"]
    assert settings.flower_basic_auth.get_secret_value() == s["fleetscribe_flower_basic_auth"]

    # the real folder is git-ignored, and no password variable is left in .env.example
    if shutil.which("git") and (ROOT / ".git").exists():
        probe = [f"compose/secrets/{name}" for name in declared]
        done = subprocess.run(
            ["git", "check-ignore", "--no-index", *probe], cwd=ROOT, capture_output=True,
            text=True,
        )  # fmt: skip
        assert sorted(done.stdout.split()) == sorted(probe), done.stdout + done.stderr
    example = (COMPOSE / ".env.example").read_text()
    assert not re.findall(r"(?m)^#?\s*\w*(PASSWORD|SECRET)\w*=", example)
    assert not re.findall(r"\$\{\w*PASSWORD", (COMPOSE / "docker-compose.yml").read_text())


def test_make_secrets_builds_a_worker_machines_urls_from_the_main_machines_passwords(tmp_path):
    folder = tmp_path / "compose"
    folder.mkdir()
    shutil.copy(COMPOSE / "make-secrets", folder)
    (folder / "secrets").mkdir()
    (folder / "secrets" / "redis_password").write_text("aa11\n")
    (folder / "secrets" / "postgres_password").write_text("bb22")
    (folder / ".env").write_text(
        'REDIS_HOST=10.0.0.5\nPOSTGRES_HOST="db.lan"\nPOSTGRES_USER=scribe # who\n'
    )
    done = _make_secrets(folder)
    assert done.returncode == 0, done.stderr
    secrets = folder / "secrets"
    assert (secrets / "redis_password").read_text() == "aa11\n"  # kept as it was
    assert (secrets / "fleetscribe_broker_url").read_text() == "redis://:aa11@10.0.0.5:6379/0"
    assert (secrets / "fleetscribe_database_url").read_text() == (
        "postgresql+psycopg://scribe:bb22@db.lan:5432/fleetscribe"
    )
    # a password file changed afterwards: the URL is not rewritten, but the mismatch is said
    (secrets / "postgres_password").write_text("cc33")
    stale = _make_secrets(folder)
    assert stale.returncode == 1 and "fleetscribe_database_url does not match" in stale.stderr
    (secrets / "redis_password").write_text("p@ss")
    assert "URL-safe" in _make_secrets(folder).stderr


def test_every_fleetscribe_service_runs_an_entry_point_its_cli_accepts(stack):
    assert entry_point_problems(stack.config, stack.folder) == []
    services = _fleetscribe_services(stack.config, stack.folder)
    assert set(services) == set(NEEDS)
    gpu = {name for name, (service, _df) in services.items() if _wants_gpus(service)}
    assert gpu == {"worker", "trainer"}

    # the same check refuses a slip: an option the CLI does not have, a wrong image
    broken = copy.deepcopy(stack.config)
    broken["services"]["worker"]["command"] = ["--gpu", "0"]
    broken["services"]["producer"]["image"] = broken["services"]["worker"]["image"]
    broken["services"]["migrate"]["command"] = ["python", "-m", "db", "upgrad"]
    problems = entry_point_problems(broken, stack.folder)
    assert any(p.startswith("worker:") and "--gpu" in p for p in problems), problems
    assert any(p.startswith("producer:") for p in problems), problems
    assert any(p.startswith("migrate:") and "upgrad" in p for p in problems), problems


def test_compose_passes_only_settings_and_every_setting(stack):
    assert settings_problems(stack.config, stack.folder) == []
    assert not set(NOT_PASSED) & set(BUILT_BY_COMPOSE)

    broken = copy.deepcopy(stack.config)
    worker = broken["services"]["worker"]["environment"]
    worker["FLEETSCRIBE_QAUNT"] = worker.pop("FLEETSCRIBE_QUANT")
    broken["services"]["flower"]["secrets"] = [{"source": "fleetscribe_broker_url"}]
    broken["services"]["producer"]["environment"]["FLEETSCRIBE_DATABASE_URL"] = "sqlite://"
    problems = settings_problems(broken, stack.folder)
    assert "worker: FLEETSCRIBE_QAUNT is not a fleetscribe setting" in problems
    assert "flower: needs FLEETSCRIBE_FLOWER_BASIC_AUTH" in problems
    assert "producer: FLEETSCRIBE_DATABASE_URL in the environment (a secret file's)" in problems
    for service in broken["services"].values():
        (service.get("environment") or {}).pop("FLEETSCRIBE_QUANT", None)
    assert "FLEETSCRIBE_QUANT: a setting that compose never passes" in settings_problems(
        broken, stack.folder
    )


def test_compose_defaults_are_the_codes_and_the_built_settings_are_right(
    stack, tmp_path, monkeypatch
):
    args = (stack.config, stack.folder, stack.secrets)
    assert default_problems(*args, tmp_path / "real", monkeypatch) == []
    services = _fleetscribe_services(stack.config, stack.folder)
    for name, (service, _df) in services.items():
        with monkeypatch.context() as m:
            got = _service_settings(service, stack.secrets, tmp_path / f"view-{name}", m)
        assert got.home == Path("/var/lib/fleetscribe"), name
        if name != "flower":
            assert got.video_roots == [Path("/videos")], name
            assert got.train_root == Path("/var/lib/fleetscribe/training"), name
        if name in ("worker", "trainer"):  # the runs and adapters are on the shared volume
            assert _named_volume_at(service, stack.config, str(got.train_root)) == (
                "fleetscribe-data"
            )
        assert got.metrics_port == {"worker": 9400, "trainer": 9500}.get(name, 0), name
        assert (got.flower_basic_auth is not None) == (name == "flower")
        assert got.broker_url.startswith("redis://") == ("broker_url" in NEEDS[name])
        assert got.database_url.startswith("postgresql") == ("database_url" in NEEDS[name])

    broken = copy.deepcopy(stack.config)
    broken["services"]["trainer"]["environment"]["FLEETSCRIBE_FRAMES"] = "9"
    problems = default_problems(broken, *args[1:], tmp_path / "broken", monkeypatch)
    assert problems == ["trainer: FLEETSCRIBE_FRAMES is 9 by default, the code's default is 8"], (
        problems
    )


def test_env_example_lists_every_setting_with_its_default_and_meaning(stack):
    example = (COMPOSE / ".env.example").read_text()
    lines = example.splitlines()
    compose_text = (COMPOSE / "docker-compose.yml").read_text()
    fields = set(Settings.model_fields)
    for field in sorted(fields - set(BUILT_BY_COMPOSE) - set(NOT_PASSED)):
        variable = PREFIX + field.upper()
        at = [i for i, line in enumerate(lines) if re.match(rf"#{variable}=", line)]
        assert len(at) == 1, f"{variable}: one '#{variable}=DEFAULT' line in .env.example"
        value = lines[at[0]].split("=", 1)[1]
        assert lines[at[0] - 1].startswith("# "), f"{variable}: a comment says what it means"
        passed = re.search(rf"\$\{{{variable}:-([^}}]*)\}}", compose_text)
        assert passed, f"{variable}: docker-compose.yml passes ${{{variable}:-DEFAULT}}"
        default = passed.group(1)
        assert default == value, f"{variable}: .env.example {value!r}, compose {default!r}"
    for field in BUILT_BY_COMPOSE:  # named in the comment, never as a line to set
        variable = PREFIX + field.upper()
        assert re.search(rf"(?m)^#.*\b{variable}\b", example), variable
        assert not re.search(rf"(?m)^#?{variable}=", example), variable
    # every FLEETSCRIBE_* line is a setting, and every variable compose reads is listed
    for variable in re.findall(r"(?m)^#?(FLEETSCRIBE_\w+)=", example):
        assert variable[len(PREFIX) :].lower() in fields, variable
    listed = set(re.findall(r"(?m)^#?([A-Z][A-Z0-9_]*)=", example))
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose_text))
    assert read <= listed, f"not in .env.example: {sorted(read - listed)}"
    # and the hosts and names make-secrets reads
    script = (COMPOSE / "make-secrets").read_text()
    assert set(re.findall(r"\$\(setting (\w+) ", script)) <= listed


def test_services_keep_their_data_auth_and_health(stack):
    services = stack.config["services"]
    volumes = set(stack.config.get("volumes") or {})

    redis = services["redis"]
    command = " ".join(_as_list(redis["command"]))
    assert "--appendonly yes" in command
    assert '--requirepass "$(cat /run/secrets/redis_password)"' in command
    assert "docker-entrypoint.sh redis-server" in command  # still drops to the redis user
    assert "redis_password" in " ".join(_as_list(redis["healthcheck"]["test"]))
    assert _named_volume_at(redis, stack.config, "/data") == "redis-data"

    postgres = services["postgres"]
    assert _env(postgres)["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "pg_isready" in " ".join(_as_list(postgres["healthcheck"]["test"]))
    assert _named_volume_at(postgres, stack.config, "/var/lib/postgresql/data") == "postgres-data"

    # every /run/secrets/NAME a service reads is a secret it mounts
    for name, service in services.items():
        text = json.dumps({k: service.get(k) for k in ("command", "environment", "healthcheck")})
        for secret in re.findall(r"/run/secrets/(\w+)", text):
            assert secret in _secret_names(service), f"{name} reads {secret} it does not mount"

    # workers and the producer start only after the schema is migrated
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "trainer", "producer"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
    assert services["migrate"].get("restart", "no") == "no"

    # GPU workers: NVIDIA devices, one shared model cache, nothing that stops --scale
    for name in ("worker", "trainer"):
        service = services[name]
        assert _wants_gpus(service), name
        assert _named_volume_at(service, stack.config, "/var/cache/huggingface") == "hf-cache"
        assert "container_name" not in service, name
    assert "ports" not in services["worker"]  # replicas would fight over a host port
    assert re.fullmatch(r"\d+", _env(services["trainer"])["CUDA_VISIBLE_DEVICES"])

    # Flower: authenticated (the secret file), its state in a volume
    flower = services["flower"]
    parsed = parse_entry_point(_as_list(flower["command"]))
    assert parsed.commands == ["flower"] and not parsed.option("--unauthenticated")
    assert "fleetscribe_flower_basic_auth" in _secret_names(flower)
    assert parsed.option("--address") == "0.0.0.0"  # its port is published
    home = _env(flower)["FLEETSCRIBE_HOME"]
    db = str(parsed.option("--db") or f"{home}/flower/flower.db")
    assert _named_volume_at(flower, stack.config, db) == "flower-data", db
    published = {  # short form HOST:PUBLISHED:TARGET/PROTO (1.29) or long form (v2)
        str(p["target"]) if isinstance(p, dict) else str(p).rsplit(":", 1)[-1].split("/")[0]
        for p in flower["ports"]
    }
    assert str(parsed.option("--port")) in published

    # Grafana: admin password from its secret file; Prometheus and Grafana keep their data
    grafana = services["grafana"]
    assert _env(grafana)["GF_SECURITY_ADMIN_PASSWORD__FILE"] == (
        "/run/secrets/grafana_admin_password"
    )
    assert "GF_SECURITY_ADMIN_PASSWORD" not in _env(grafana)
    assert _named_volume_at(grafana, stack.config, "/var/lib/grafana") == "grafana-data"
    prometheus = services["prometheus"]
    assert _named_volume_at(prometheus, stack.config, "/prometheus") == "prometheus-data"
    assert "--config.file=/etc/prometheus/prometheus.yml" in _as_list(prometheus["command"])
    mounted = {target: Path(source).name for source, target in _mounts(prometheus)}
    assert mounted["/etc/prometheus"] == "prometheus"

    # third-party images are pinned; every named volume declared is used
    for name in ("redis", "postgres", "prometheus", "grafana"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image
    used = {s for svc in services.values() for s, _t in _mounts(svc) if s in volumes}
    assert used == volumes


def test_prometheus_scrapes_every_port_the_workers_metrics_port_opens(stack):
    prometheus = _prometheus_config()
    assert prometheus["global"]["scrape_interval"] == "15s"
    for job in prometheus["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
    assert _metrics_ports(stack.config, stack.folder) == {("worker", 9400), ("trainer", 9500)}
    assert scrape_problems(stack.config, stack.folder, prometheus) == []
    # other machines: a file_sd job reads compose/prometheus/targets/*.yml
    files = [f for job in prometheus["scrape_configs"] for sd in job.get("file_sd_configs", [])
             for f in sd["files"]]  # fmt: skip
    assert "targets/*.yml" in files

    # the check sees a port that is served and not scraped: two GPUs in one container
    broken = copy.deepcopy(stack.config)
    broken["services"]["worker"]["command"] = ["--gpus", "0,1"]
    assert scrape_problems(broken, stack.folder, prometheus) == [
        "worker:9401 serves /metrics; prometheus.yml does not scrape it"
    ]


def test_promtool_accepts_the_prometheus_config_and_the_targets_format(tmp_path):
    promtool = _tool("promtool", "prometheus")
    check = [promtool, "check", "config"]
    config = COMPOSE / "prometheus" / "prometheus.yml"
    done = subprocess.run([*check, config], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

    copy_dir = tmp_path / "prometheus"
    shutil.copytree(COMPOSE / "prometheus", copy_dir)
    # the documented targets file format, as an operator would copy it
    shutil.copy(copy_dir / "targets" / "example.yml.sample", copy_dir / "targets" / "box.yml")
    done = subprocess.run([*check, copy_dir / "prometheus.yml"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "box.yml" not in done.stdout + done.stderr
    # and promtool is no rubber stamp: a misspelt key in a targets file fails
    (copy_dir / "targets" / "bad.yml").write_text('- target: ["10.0.0.9:9400"]\n')
    done = subprocess.run([*check, copy_dir / "prometheus.yml"], capture_output=True, text=True)
    assert done.returncode != 0


def test_the_images_install_every_package():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in patterns}
    assert {"config", "worker", "metrics"} <= packages
    for name in ("Dockerfile.app", "Dockerfile.worker"):
        text = (COMPOSE / name).read_text()
        copied = set(re.findall(r"(?m)^COPY (\w+)/ \1/$", text))
        assert copied == packages, (
            f"{name} copies {sorted(copied)}, pyproject has {sorted(packages)}"
        )
        kept = set(re.findall(r"(?m)^!(\w+)$", (COMPOSE / f"{name}.dockerignore").read_text()))
        assert packages <= kept, f"{name}.dockerignore leaves out {sorted(packages - kept)}"
    for package in packages:
        assert (ROOT / package / "__init__.py").exists(), package
