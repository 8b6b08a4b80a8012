"""Reading video files, shared by the producer (probing) and the describe worker (frames).

- `files`: path checks before anything opens a file (roots, regular, readable).
- `media`: PyAV: `probe` a file, `sample_frames` uniformly by timestamp.
- `processes`: killable child processes that run the two (`KillablePool`, `FrameSampler`).

Imports numpy and PyAV, never torch.
"""
