"""The Celery app: queues, JSON-only messages, late acks, and the per-process model hook.

Settings that carry the no-loss promise (docs/reliability in README):
- task_acks_late + task_reject_on_worker_lost: a message is acknowledged only after its
  report is committed; if the worker process dies mid-task the message goes back.
- worker_prefetch_multiplier=1 with the threads pool: a GPU worker reserves exactly its
  slots (2x batch_size: one batch on the GPU, one being prepared), so a dead worker
  strands little and other workers get the rest.
- visibility_timeout (Redis) above the hard time limit: an unacknowledged long task is not
  handed to a second worker while the first still runs it.
- the threads pool never forks, so CUDA is initialised once, in the worker's own process,
  before it consumes (worker/__main__.py), and fork-after-CUDA cannot happen.
"""

from __future__ import annotations

import logging
import socket

from celery import Celery
from kombu import Exchange, Queue

from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

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
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "event_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
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


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    if settings.embedded_broker:
        (settings.broker_folder / "control").mkdir(parents=True, exist_ok=True)
    celery = Celery("fleetscribe", include=["worker.tasks"])
    celery.conf.update(celery_config(settings))
    return celery


app = make_app()


def hostname() -> str:
    return socket.gethostname()
