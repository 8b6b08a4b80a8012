"""Reading video files, shared by the producer (probing) and the describe worker (frames).

- `files`: path checks before anything opens a file (roots, regular, readable).
- `media`: PyAV: `probe` a file, `sample_frames` by timestamp (uniform or event-aware).
- `events`: where a clip changes most, from packet sizes (no decoding): the frames that
  event-aware sampling adds to a uniform skeleton.
- `processes`: killable child processes that run the two (`KillablePool`, `FrameSampler`).

Imports numpy and PyAV, never torch.
"""
