"""The describe prompt. Bump PROMPT_VERSION on any change: it is stored on every report."""

from __future__ import annotations

from enum import StrEnum

from models import grammar as g
from models import schema as s

# 2: the three parts spelled out, bounds of the decoding grammar
# 3: frames need not be evenly spaced (event-aware sampling): the model is told to read
#    each frame's time from its label
PROMPT_VERSION = 3

SYSTEM = (
    "You review dash-camera footage for a vehicle fleet's safety team. You describe only "
    "what the frames show, in plain English, and you never guess beyond them."
)


def _choices(enum: type[StrEnum]) -> str:
    return "|".join(m.value for m in enum)


def instruction(frames: int) -> str:
    """The request that follows the frames; keys and choices come from the report schema."""
    return (
        f"These {frames} frames (0 to {frames - 1}) come from one video, oldest first; "
        "each is labelled with its time in the video, and they need not be evenly spaced. "
        "Write one compact JSON object with these keys, in this order, and nothing else.\n"
        f'"schema_version": {s.SCHEMA_VERSION}\n'
        '"scene_description": part 1, the scene: road users and obstacles and what each '
        "is doing, then signs, signals and lane markings "
        f"(up to {g.SCENE_CHARS} characters).\n"
        '"driving_parameters": part 2, one value per key: '
        f'"road_type" {_choices(s.RoadType)}; '
        f'"lane_count" 0-{s.MAX_LANES}; '
        f'"ego_lane_position" {_choices(s.LanePosition)}; '
        f'"traffic_light_state" {_choices(s.TrafficLight)}; '
        '"pedestrian_on_road" true|false; '
        f'"closest_vehicle_distance" {_choices(s.Distance)}; '
        f'"ego_vehicle_speed" {_choices(s.Speed)}; '
        f'"road_curvature" {_choices(s.Curvature)}; '
        f'"weather" {_choices(s.Weather)}; '
        f'"visibility" {_choices(s.Visibility)}; '
        f'"time_of_day" {_choices(s.TimeOfDay)}; '
        f'"traffic_density" {_choices(s.Density)}; '
        f'"risk_factor" {_choices(s.Risk)}.\n'
        f'"hazards": up to {g.HAZARDS} objects {{"kind": {_choices(s.HazardKind)}, '
        f'"description": up to {g.HAZARD_CHARS} characters, "frame": 0-{frames - 1}, the frame '
        "where it is clearest}, or [] when nothing threatens the vehicle.\n"
        '"risk_assessment": part 3, what could go wrong in the next few seconds and what '
        f"the driver should do about it (up to {g.RISK_CHARS} characters).\n"
        "Text uses plain ASCII without double quotes or backslashes."
    )


def build_messages(timestamps: list[float]) -> list[dict]:
    """Chat messages for one video: each frame labelled with its index and time, then the ask."""
    content: list[dict] = []
    for i, t in enumerate(timestamps):
        content.append({"type": "text", "text": f"Frame {i} (t={t:.1f} s):"})
        content.append({"type": "image"})
    content.append({"type": "text", "text": instruction(len(timestamps))})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": content},
    ]
