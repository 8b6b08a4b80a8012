"""The one settings object every fleetscribe entry point reads (env prefix ``FLEETSCRIBE_``)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, SecretStr, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)

from config.errors import SettingsError

DEFAULT_MODEL = "Qwen/Qwen3-VL-4B-Instruct"
# Docker-secrets style: a folder holding one file per setting, named like its variable in
# lower case (fleetscribe_broker_url, fleetscribe_database_url), so passwords need not sit
# in the environment. A variable that is set wins over its file.
SECRETS_DIR_VARIABLE = "FLEETSCRIBE_SECRETS_DIR"
_URL_PASSWORD = re.compile(r"(//[^/@:]*:)[^/]*@")
# Variables read by fleetscribe that are not Settings fields (the tests' servers).
_OTHER_VARIABLES = frozenset(
    {SECRETS_DIR_VARIABLE, "FLEETSCRIBE_TEST_PG", "FLEETSCRIBE_TEST_REDIS"}
)
# The transports celery_config knows how to configure (broker/celery_app.py).
BROKER_SCHEMES = ("redis", "rediss", "filesystem", "memory")
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres")
# How a worker picks a video's frames (video.media.sample_frames): evenly spread, or a
# uniform skeleton plus the moments that change most (video/events.py).
Sampling = Literal["uniform", "events"]
SAMPLING_MODES: tuple[str, ...] = get_args(Sampling)
DEFAULT_SAMPLING: Sampling = "events"  # benchmarks/sampling.py: README, Frame sampling
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9.-]*)(\+[A-Za-z0-9_]+)?://")


class Settings(BaseSettings):
    """Validated at start-up; a bad value fails with a message naming the variable."""

    model_config = SettingsConfigDict(env_prefix="FLEETSCRIBE_", extra="ignore")

    # Where the embedded defaults live: the SQLite file and the server-less broker's folders.
    home: Path = Path(".fleetscribe")
    broker_url: str = "filesystem://"
    database_url: str = ""

    model: str = DEFAULT_MODEL
    adapter: str | None = None
    # nf4: 4-bit NormalFloat + double quantisation (QLoRA, CUDA); fp32 for the CPU.
    quant: Literal["nf4", "fp16", "bf16", "fp32"] = "nf4"
    frames: int = Field(8, ge=1, le=64)
    frame_max_side: int = Field(640, ge=32, le=4096)
    # How frames are chosen when a video (or its message) names no mode: "uniform" (evenly
    # spread by time) or "events" (a uniform skeleton plus the moments that change most).
    sampling: Sampling = DEFAULT_SAMPLING
    max_new_tokens: int = Field(512, ge=1, le=8192)
    # The most videos one generate call holds; the engine goes lower when GPU memory (or
    # gpu_memory_gib) is short. A worker takes 2x this many messages so that one batch is
    # prepared on the CPU while the previous one runs on the GPU.
    batch_size: int = Field(8, ge=1, le=512)
    # How long a partial batch waits for more videos before it runs anyway.
    batch_wait_ms: int = Field(50, ge=0, le=60_000)
    # Cap on this process's GPU memory in GiB (0: the whole card), e.g. 15 on a 16 GB T4.
    gpu_memory_gib: float = Field(0.0, ge=0)
    # Hold decoding to the report grammar (models/grammar.py): every answer is valid.
    constrained: bool = True
    # Suppress the stop token until this many new tokens (benchmarks: fixed answer length).
    min_new_tokens: int = Field(0, ge=0, le=8192)
    # torch.compile the decode step: off, default (fused kernels) or reduce-overhead (and
    # CUDA graphs); the first batch of each shape compiles (minutes). true = reduce-overhead.
    compile: Literal["off", "default", "reduce-overhead"] = "off"
    # How answers are generated: auto (the engine's own loop, each step a replayed CUDA
    # graph, on a GPU; HF generate on the CPU), graph, loop (the engine's loop uncaptured)
    # or generate (HF's loop, the fallback where capture fails).
    generation: Literal["auto", "graph", "loop", "generate"] = "auto"
    # The engine's loop: the text prefill's RMSNorms, rotary embedding and SiLU as they are
    # (eager) or compiled into fused kernels (fused; models/fused_prefill.py; the first
    # batch compiles them, about a minute). Opt-in until measured on a GPU.
    prefill: Literal["eager", "fused"] = "eager"
    # The text decoder's attention in decode steps: sdpa (transformers'), matmul (two
    # batched products) or flex (FlexAttention's split-KV decoding kernel, compiled);
    # models/decode_attention.py. Opt-in until measured on a GPU.
    decode_attention: Literal["sdpa", "matmul", "flex"] = "sdpa"
    # The interpreter's switch interval in a describe worker (sys.setswitchinterval): how
    # long a thread waiting for the GIL lets a busy one run before asking for it. The GPU
    # thread takes the GIL back after every call that gave it up (a device wait, the
    # grammar's masks); beside busy threads (feeders preparing the next batch) each such
    # wait costs up to this (Python's default is 5 ms; benchmarks/grammar_host.py --switch).
    switch_interval_ms: float = Field(0.5, gt=0, le=100)
    # Prefill prompts this many tokens at a time (0: whole): the prefill's activations, about
    # half of a batch's peak memory with whole prompts, shrink, so more videos fit a batch.
    prefill_chunk: int = Field(512, ge=0)
    # Under the grammar, a batch first has room for this many answer tokens (0: for the
    # grammar's longest answer, about 2,500); answers still going then continue from where
    # they stopped with room for the longest (the engine's loop), or are described again
    # with that room (HF generate). Memory is sized for real answers.
    first_pass_tokens: int = Field(768, ge=0, le=8192)
    video_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    # How long a task waits for its video's answer from the GPU thread before the video
    # fails with that reason. (Celery's own time limits are not set: its threads pool
    # ignores them. A stuck GPU batch is bounded by gpu_stall_s instead.)
    task_soft_time_limit: int = Field(600, ge=1)
    # Redis only: seconds before an unacknowledged message is handed out again. 0 =
    # 2x task_soft_time_limit + 600, longer than any task may run. A dead worker's videos
    # do not wait for it: its lapsed heartbeat has them sent again (heartbeat_s, sweep_s).
    visibility_timeout: int = Field(0, ge=0)
    # Each describe worker renews its heartbeat in the store this often; a worker silent
    # for 3 beats is dead, and the videos running on it are sent again.
    heartbeat_s: float = Field(10.0, gt=0, le=3600)
    # Each describe worker sends again, this often, what was lost: videos running on a dead
    # worker, and queued videos whose message was never confirmed for outbox_grace_s.
    sweep_s: float = Field(15.0, gt=0, le=86_400)
    outbox_grace_s: float = Field(300.0, ge=0)
    # A GPU batch running past max(gpu_stall_s, 10x its expected time from the measured
    # step time) is stuck: the worker exits so its videos are redelivered and the
    # supervisor (compose, systemd) starts it again.
    gpu_stall_s: float = Field(600.0, gt=0)
    # Messages the broker holds for the describe queue at most; the rest of the backlog
    # waits in SQL (queued, not sent) and a feeder tops the window up: the producer while
    # it runs, every describe worker's sweep after. 0 = sized from the measured throughput:
    # QUEUE_WINDOW_MINUTES of work for the live workers, at least 2 batches per worker and
    # never under 256.
    queue_window: int = Field(0, ge=0)
    queue_window_minutes: float = Field(5.0, gt=0, le=1440)
    # What decides that two inputs are the same video: the sha256 of the whole file, or
    # the fast key (size plus a hash of sampled blocks, producer/fingerprint.py). Either
    # is recorded per video; an input whose size matches a video recorded without a fast
    # key is hashed whole, so the two keys never disagree silently.
    dedupe_key: Literal["sha256", "fast"] = "sha256"
    # Processes that hash and probe input files (0: one per CPU core).
    probe_processes: int = Field(0, ge=0)
    # The largest file the producer accepts; bigger files are rejected with a reason.
    max_video_bytes: int = Field(64 * 2**30, ge=1)
    # The producer hashes and probes each file in a child process, killed past this many
    # seconds (a stalled mount, a file whose open blocks) and tried once more in a new
    # one: a second timeout rejects the file with why (video/processes.py).
    probe_timeout_s: float = Field(300.0, gt=0)
    # Frames are decoded in child processes (video/processes.py): one whose video takes
    # longer than this is killed and the video decoded once more in a new one; a second
    # timeout fails the video, so a hung decoder frees its slot.
    decode_timeout_s: float = Field(120.0, gt=0)
    # How many decoding processes a worker keeps; 0 = one per CPU core.
    decode_processes: int = Field(0, ge=0)
    # Heap cap of each decoding process in GiB (0: none): a decompression bomb fails alone.
    decode_memory_gib: float = Field(4.0, ge=0)
    # Where training runs keep their checkpoints and adapters (default: home/training).
    # Every training worker that may resume a run, and every describe worker that loads
    # its adapter, must see this folder at the same path (a shared volume).
    training_dir: Path | None = None
    # Prometheus metrics of each worker process at http://HOST:PORT/metrics (0: off). With
    # `worker --gpus 0,1,...` the process of the i-th GPU listens on this port + i.
    metrics_port: int = Field(0, ge=0, le=65535)
    # Flower's basic auth, `user:password` (several: comma-separated); also a file
    # `fleetscribe_flower_basic_auth` in the secrets folder. `worker flower` refuses to
    # start without it unless told --unauthenticated.
    flower_basic_auth: SecretStr | None = None

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, value):
        if isinstance(value, bool):
            return "reduce-overhead" if value else "off"
        flag = str(value).strip().lower()
        return {"true": "reduce-overhead", "1": "reduce-overhead", "false": "off", "0": "off"}.get(
            flag, flag
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        folder = os.environ.get(SECRETS_DIR_VARIABLE)
        if folder:
            if not Path(folder).is_dir():
                raise SettingsError(f"{SECRETS_DIR_VARIABLE}: {folder} is not a directory")
            file_secret_settings = SecretsSettingsSource(settings_cls, secrets_dir=folder)
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    def __repr_args__(self):
        # A logged or printed settings object shows no password.
        for name, value in super().__repr_args__():
            yield name, hide_password(value) if name in _URL_FIELDS else value

    @field_validator("video_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        # FLEETSCRIBE_VIDEO_ROOTS=/data/a:/data/b (like PATH) or a JSON list.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                import json

                return json.loads(value)
            return [part for part in value.split(":") if part]
        return value

    @field_validator("flower_basic_auth", mode="before")
    @classmethod
    def _user_password(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        pairs = [p.strip() for p in str(value).strip().split(",")]
        if not all(user and password for user, _, password in (p.partition(":") for p in pairs)):
            raise PydanticCustomError(
                "bad_auth", "user:password expected (several: comma-separated), got no password"
            )
        return ",".join(pairs)

    @field_validator("adapter", mode="before")
    @classmethod
    def _empty_adapter(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        _scheme_name, driver = _scheme(value, BROKER_SCHEMES, "a broker URL")
        if driver:
            _refuse(f"{hide_password(value)!r}: a broker URL takes no +driver")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        if not value:
            return value  # the embedded default: SQLite under home
        scheme, _driver = _scheme(value, DATABASE_SCHEMES, "a database URL")
        if scheme == "postgres":  # Heroku's spelling of postgresql://
            value = "postgresql" + value[len("postgres") :]
        return value

    @property
    def redelivery_after(self) -> int:
        """Seconds after which Redis hands an unacknowledged message out again."""
        return self.visibility_timeout or self.task_soft_time_limit * 2 + 600

    @property
    def heartbeat_lapse_s(self) -> float:
        """Seconds of silence after which a describe worker counts as dead."""
        return 3 * self.heartbeat_s

    @property
    def db_url(self) -> str:
        """The database URL, defaulting to a SQLite file under ``home``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'fleetscribe.db').resolve()}"

    @property
    def train_root(self) -> Path:
        """The folder of training runs (checkpoints, adapters)."""
        return (self.training_dir or self.home / "training").resolve()

    @property
    def broker_folder(self) -> Path:
        """Message folder of the server-less (filesystem) broker."""
        return (self.home / "broker").resolve()

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem:")

    @property
    def embedded_store(self) -> bool:
        """The database is the embedded default (a SQLite file under ``home``)."""
        return not self.database_url

    @property
    def adapter_name(self) -> str:
        """The adapter as stored on reports: '' for the bare base model."""
        return self.adapter or ""


_URL_FIELDS = ("broker_url", "database_url")


def hide_password(url: str) -> str:
    """`url` with the password of its user part, if any, replaced by ***."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def _scheme(url: str, accepted: tuple[str, ...], what: str) -> tuple[str, str]:
    """(scheme, +driver) of `url`, refused unless the scheme is one of `accepted`."""
    names = ", ".join(accepted)
    match = _URL_SCHEME.match(url)
    if match is None:
        _refuse(
            f"{hide_password(url)!r} is not {what} (no SCHEME://); the scheme is one of {names}"
        )
    scheme, driver = match.group(1).lower(), match.group(2) or ""
    if scheme not in accepted:
        _refuse(f"unknown scheme {scheme!r} in {what}: the scheme is one of {names}")
    return scheme, driver


def _refuse(message: str):
    # The message as given: a custom error's text is not prefixed with "Value error, ".
    raise PydanticCustomError("bad_url", "{message}", {"message": message})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning line per FLEETSCRIBE_* variable that is no setting (a typo is otherwise
    silently ignored), naming the closest setting."""
    import difflib

    prefix = "FLEETSCRIBE_"
    fields = {prefix + name.upper() for name in Settings.model_fields}
    known = fields | _OTHER_VARIABLES
    lines = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(prefix) or name in known:
            continue
        # compare what follows the prefix, which every name shares
        close = difflib.get_close_matches(
            name[len(prefix) :], [k[len(prefix) :] for k in sorted(fields)], n=1
        )
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        lines.append(f"warning: {variable} is not a fleetscribe setting{hint}")
    return lines


def load_settings() -> Settings:
    """The settings, read from the environment (and SECRETS_DIR) now; a bad value becomes
    one readable line (SettingsError). Each entry point reads them once, at start-up."""
    import sys

    from pydantic import ValidationError

    for line in unknown_variables(os.environ):
        print(line, file=sys.stderr, flush=True)
    try:
        return Settings()
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = "FLEETSCRIBE_" + "_".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{name}: {err['msg']}" if err["loc"] else err["msg"])
        raise SettingsError("bad setting: " + "; ".join(problems)) from None
