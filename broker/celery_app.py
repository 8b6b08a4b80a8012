"""The Celery configuration every fleetscribe process uses, and the app built from it.

Settings that carry the no-loss promise (README, reliability):
- task_acks_late + task_reject_on_worker_lost: a message is acknowledged only after its
  report is committed; if the worker process dies mid-task the message goes back.
- worker_prefetch_multiplier=1 with the threads pool: a GPU worker reserves exactly its
  slots (2x batch_size: one batch on the GPU, one being prepared), so a dead worker
  strands little and other workers get the rest.
- visibility_timeout (Redis) above the longest a task may wait for its answer: an
  unacknowledged long task is not handed to a second worker while the first still runs
  it. A dead worker's videos do not wait for it (delivery/: heartbeats and the sweep).
- no task_time_limit / task_soft_time_limit: the threads pool ignores both.
- JSON only: a pickled message is refused, never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from celery import Celery
from kombu import Exchange, Queue

from config.errors import ExpectedError
from config.settings import Settings

DESCRIBE_QUEUE = "describe"
TRAIN_QUEUE = "train"
DESCRIBE_TASK = "fleetscribe.describe"
TRAIN_TASK = "fleetscribe.train"
MAX_PRIORITY = 9


def celery_config(settings: Settings) -> dict:
    transport: dict = {}
    if settings.embedded_broker:
        folder = str(settings.broker_folder)
        transport = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "control_folder": str(settings.broker_folder / "control"),
            "store_processed": False,
            # The folder is polled; the default 1 s would cap a worker at one video a second.
            "polling_interval": 0.1,
        }
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        transport = {
            # Longer than any task may run, so a running task is never handed out twice.
            "visibility_timeout": settings.redelivery_after,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(MAX_PRIORITY + 1)),
            "sep": ":",
        }
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        # Results are ignored (task_ignore_result) except the train task's: its progress is
        # published as task state (PROGRESS), which Flower reads from here.
        "result_backend": result_backend(settings),
        "result_extended": True,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "event_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": DESCRIBE_QUEUE,
        "task_queues": [
            Queue(
                DESCRIBE_QUEUE,
                Exchange(DESCRIBE_QUEUE),
                routing_key=DESCRIBE_QUEUE,
                queue_arguments={"x-max-priority": MAX_PRIORITY},
            ),
            Queue(TRAIN_QUEUE, Exchange(TRAIN_QUEUE), routing_key=TRAIN_QUEUE),
        ],
        "task_routes": {
            DESCRIBE_TASK: {"queue": DESCRIBE_QUEUE},
            TRAIN_TASK: {"queue": TRAIN_QUEUE},
        },
        "task_default_priority": 0,
        "task_queue_max_priority": MAX_PRIORITY,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


def result_backend(settings: Settings) -> str:
    """Redis itself; beside the embedded broker, a folder; in one process, memory."""
    if settings.embedded_broker:
        return f"file://{settings.broker_folder / 'results'}"
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    return "cache+memory://"


def make_celery(settings: Settings, cls: type[Celery] = Celery) -> Celery:
    """A Celery app configured from `settings`, with no tasks: producers send by task name,
    and the worker registers its tasks on its own (worker/app.py). Made by the caller,
    never at import time (the embedded broker's folders are made here)."""
    if settings.embedded_broker:
        (settings.broker_folder / "control").mkdir(parents=True, exist_ok=True)
        (settings.broker_folder / "results").mkdir(parents=True, exist_ok=True)
    celery = cls("fleetscribe", set_as_current=False)
    celery.conf.update(celery_config(settings))
    return celery


class RuntimeApp(Celery):
    """A worker's Celery app: it knows its settings and, once its start-up step has run,
    its process's runtime (describe: worker.lifecycle; train: training.lifecycle)."""

    settings: Settings
    runtime = None
    startup_error: ExpectedError | None = None  # set by a start-up step that failed


def run_worker(
    app: RuntimeApp, *, queues: str, concurrency: int, loglevel: str, hostname: str
) -> int:
    """Run a Celery worker of `app` until it stops; its exit code. A start-up failure (the
    model or the store would not open) is raised as its one-line error."""
    argv = [
        "worker",
        f"--queues={queues}",
        f"--concurrency={concurrency}",
        # no --pool: each app sets its own worker_pool
        f"--loglevel={loglevel}",
        f"--hostname={hostname}",
        "--without-mingle",
        "--without-gossip",
    ]
    code = app.start(argv)
    if app.startup_error is not None:
        raise app.startup_error
    return code or 0


@dataclass
class QueueDepths:
    """Messages waiting in each fleetscribe queue, read from the broker itself."""

    # queue -> {the broker's own name for a part of it: messages}; parts holding none are
    # left out. Redis keeps one list per priority: `describe`, `describe:1` ... `describe:9`.
    queues: dict[str, dict[str, int]] = field(default_factory=dict)
    unacked: int | None = None  # Redis: taken by workers, not yet acknowledged (all queues)
    unknown: str | None = None  # why the broker cannot say; `queues` is empty then

    def waiting(self, queue: str) -> int | None:
        """Messages waiting in `queue`, all priorities; None when unknown."""
        return None if self.unknown else sum(self.queues.get(queue, {}).values())


def redis_lists(settings: Settings, queue: str) -> list[str]:
    """The Redis lists a queue's waiting messages are kept in: one per priority step, named
    as kombu names them (the queue itself for priority 0, then `queue{sep}{priority}`)."""
    options = celery_config(settings)["broker_transport_options"]
    sep = options["sep"]
    return [f"{queue}{sep}{p}" if p else queue for p in options["priority_steps"]]


def queue_depths(settings: Settings, *, timeout_s: float = 3.0) -> QueueDepths:
    """How many messages wait in the describe and train queues. Reads only: nothing is
    declared, consumed or made (the filesystem broker's folder is counted as it is)."""
    names = (DESCRIBE_QUEUE, TRAIN_QUEUE)
    if settings.embedded_broker:
        folder = settings.broker_folder
        files = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        # kombu names each message <time>_<uuid>.<queue>.msg
        counts = {q: sum(1 for f in files if f.partition(".")[2] == f"{q}.msg") for q in names}
        return QueueDepths({q: {q: n} if n else {} for q, n in counts.items()})
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return QueueDepths(unknown="the memory broker lives inside one process")
    import redis

    client = redis.Redis.from_url(
        settings.broker_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        keys = {q: redis_lists(settings, q) for q in names}
        with client.pipeline(transaction=False) as pipe:
            for q in names:
                for key in keys[q]:
                    pipe.llen(key)
            pipe.hlen("unacked")  # kombu's unacked_key
            sizes = iter(pipe.execute())
        queues = {q: {k: n for k in keys[q] if (n := next(sizes))} for q in names}
        return QueueDepths(queues, unacked=next(sizes))
    except (redis.RedisError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return QueueDepths(unknown=f"the broker did not answer ({reason})")
    finally:
        client.close()
