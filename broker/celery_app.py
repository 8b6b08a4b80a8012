"""The Celery configuration every fleetscribe process uses, and the app built from it.

Settings that carry the no-loss promise (README, reliability):
- task_acks_late + task_reject_on_worker_lost: a message is acknowledged only after its
  report is committed; if the worker process dies mid-task the message goes back.
- worker_prefetch_multiplier=1 with the threads pool: a GPU worker reserves exactly its
  slots (2x batch_size: one batch on the GPU, one being prepared), so a dead worker
  strands little and other workers get the rest.
- visibility_timeout (Redis) above the hard time limit: an unacknowledged long task is not
  handed to a second worker while the first still runs it.
- JSON only: a pickled message is refused, never run.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

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


def make_celery(settings: Settings, cls: type[Celery] = Celery) -> Celery:
    """A Celery app configured from `settings`, with no tasks: producers send by task name,
    and the worker registers its tasks on its own (worker/app.py). Made by the caller,
    never at import time (the embedded broker's folders are made here)."""
    if settings.embedded_broker:
        (settings.broker_folder / "control").mkdir(parents=True, exist_ok=True)
    celery = cls("fleetscribe", set_as_current=False)
    celery.conf.update(celery_config(settings))
    return celery
