"""Entry point `python -m worker`: the describe worker (Celery, threads pool).

- `app`: the Celery app, built per process, and its start-up step `Lifecycle`.
- `lifecycle`: `WorkerRuntime`, the one object a worker process holds (settings, store
  sessions, model runner, frame sampler, batcher); opened at start-up, closed at shutdown.
- `batcher`: gathers the task threads' videos into GPU batches on one device thread.
- `pipeline`: one video through sampling, the batcher and the report; the task's body and
  `python -m worker describe` both run it.
- `tasks`: the thin Celery task.

Imports `config`, `video`, `broker`, `models` and `db`; never `producer` or `training`.
"""
