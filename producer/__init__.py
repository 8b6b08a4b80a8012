"""Entry point `python -m producer`: discover, probe, hash, dedupe and enqueue videos;
status, requeue, reap; synthetic clips to try things on.

Runs on machines without a GPU stack: it imports `config`, `video`, `broker`, `db` and the
torch-free parts of `models` (the prompt version), never `worker` or `training`.
"""
