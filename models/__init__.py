"""The model, below the entry points: everything that turns frames into an answer.

- `loader`: load the base model (NF4 / fp16 / bf16 / fp32) + processor + LoRA adapter.
- `prompt`, `schema`, `grammar`: the prompt, the report schema v1, the grammar of answers.
- `decoding`: constrained decoding (xgrammar masks every row to the grammar).
- `runner`: `ModelRunner`, batched generation on one device; `build_runner(settings)`.
- `decode_loop`: the engine's own greedy decode loop, each step a replayed CUDA graph.
- `vision_encoder`: the vision tower run by that loop, per video, ahead of its batch.
- `vision_attention`, `decode_attention`: attention functions registered with transformers
  (the vision tower's over runs of frames; an opt-in one for decode steps).
- `fused_prefill`: the text prefill's element-wise ops compiled into fused kernels (opt-in).
- `memory`: GPU memory for batching (rows per batch, spare memory, the cap).
- `compat`: explicit, documented patches of the libraries underneath.
- `tiny`: the tiny random Qwen3-VL built offline for the demo and tests.

Imports only `config`; knows no queue, no SQL and no video files. torch and transformers
are imported inside functions, so `prompt`, `schema` and `grammar` cost nothing to import.
"""
