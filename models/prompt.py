"""The describe prompt. Bump PROMPT_VERSION on any change: it is stored on every report."""

from __future__ import annotations

from enum import StrEnum

from models import schema as s

PROMPT_VERSION = 1

SYSTEM = (
    "You are a driving-scene analyst for a fleet of vehicles. You look at frames from a "
    "forward-facing dash camera and report what matters for safety, precisely and briefly."
)


def _choices(enum: type[StrEnum]) -> str:
    return "|".join(m.value for m in enum)


def instruction(frames: int) -> str:
    """The request that follows the frames; its key list is generated from schema v1."""
    return (
        f"The {frames} images above are frames 0 to {frames - 1} of one dash-camera video, "
        "in time order. Answer with one JSON object and nothing else, with exactly these keys:\n"
        f'"schema_version": {s.SCHEMA_VERSION},\n'
        '"scene_description": the vehicles, pedestrians and obstacles and what they are doing; '
        f"signs, traffic lights and lane markings (at most {s.MAX_SCENE_CHARS} characters),\n"
        '"driving_parameters": {'
        f'"road_type": {_choices(s.RoadType)}, '
        f'"lane_count": integer 0-{s.MAX_LANES}, '
        f'"ego_lane_position": {_choices(s.LanePosition)}, '
        f'"traffic_light_state": {_choices(s.TrafficLight)}, '
        '"pedestrian_on_road": true|false, '
        f'"closest_vehicle_distance": {_choices(s.Distance)}, '
        f'"ego_vehicle_speed": {_choices(s.Speed)}, '
        f'"road_curvature": {_choices(s.Curvature)}, '
        f'"weather": {_choices(s.Weather)}, '
        f'"visibility": {_choices(s.Visibility)}, '
        f'"time_of_day": {_choices(s.TimeOfDay)}, '
        f'"traffic_density": {_choices(s.Density)}, '
        f'"risk_factor": {_choices(s.Risk)}}},\n'
        f'"hazards": a list of at most {s.MAX_HAZARDS} objects '
        f'{{"kind": {_choices(s.HazardKind)}, "description": text, '
        f'"frame": index 0-{frames - 1} of the frame it is seen in}}, [] if there are none,\n'
        '"risk_assessment": what could go wrong in the next seconds and what the ego vehicle '
        f"should do (at most {s.MAX_RISK_CHARS} characters)."
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
