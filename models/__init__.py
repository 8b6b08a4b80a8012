"""The model, below the entry points: everything that turns frames into an answer.

- `loader`: load the base model (NF4 / fp16 / bf16 / fp32) + processor + LoRA adapter.
- `prompt`, `schema`, `grammar`: the prompt, the report schema v1, the grammar of answers.
- `decoding`: constrained decoding (xgrammar masks every row to the grammar).
- `runner`: `ModelRunner`, batched generation on one device; `build_runner(settings)`.
- `compat`: explicit, documented patches of the libraries underneath.
- `tiny`: the tiny random Qwen3-VL built offline for the demo and tests.

Imports only `config`; knows no queue, no SQL and no video files. torch and transformers
are imported inside functions, so `prompt`, `schema` and `grammar` cost nothing to import.
"""
