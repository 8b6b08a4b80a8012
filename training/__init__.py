"""Entry point `python -m training` (to come): QLoRA SFT jobs on the `train` queue.

An entry point like `producer` and `worker`: it may import `config`, `video`, `broker`,
`models` and `db`, never `producer` or `worker`, and never shares a process with a
describe worker.
"""
