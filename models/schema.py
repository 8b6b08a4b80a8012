"""Report schema v1: the typed form of the seed's three-part answer, and its parser."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1

# Bounds keep one report from running to max_new_tokens and keep SQL rows sane.
MAX_SCENE_CHARS = 1200
MAX_RISK_CHARS = 800
MAX_HAZARD_CHARS = 300
MAX_HAZARDS = 8
MAX_LANES = 12


class RoadType(StrEnum):
    HIGHWAY = "highway"
    URBAN = "urban"
    RESIDENTIAL = "residential"
    RURAL = "rural"
    INTERSECTION = "intersection"
    PARKING = "parking"
    OTHER = "other"


class LanePosition(StrEnum):
    LEFT = "left"
    MIDDLE = "middle"
    RIGHT = "right"
    SINGLE = "single"
    UNKNOWN = "unknown"


class TrafficLight(StrEnum):
    RED = "red"
    YELLOW = "yellow"
    GREEN = "green"
    NONE = "none"
    UNKNOWN = "unknown"


class Distance(StrEnum):
    NEAR = "near"
    MEDIUM = "medium"
    FAR = "far"
    NONE = "none"


class Speed(StrEnum):
    STOPPED = "stopped"
    SLOW = "slow"
    MODERATE = "moderate"
    FAST = "fast"


class Curvature(StrEnum):
    STRAIGHT = "straight"
    GENTLE = "gentle"
    SHARP = "sharp"


class Weather(StrEnum):
    CLEAR = "clear"
    CLOUDY = "cloudy"
    RAIN = "rain"
    SNOW = "snow"
    FOG = "fog"
    UNKNOWN = "unknown"


class Visibility(StrEnum):
    GOOD = "good"
    MODERATE = "moderate"
    POOR = "poor"


class TimeOfDay(StrEnum):
    DAY = "day"
    DAWN_DUSK = "dawn_dusk"
    NIGHT = "night"
    UNKNOWN = "unknown"


class Density(StrEnum):
    NONE = "none"
    LIGHT = "light"
    MODERATE = "moderate"
    HEAVY = "heavy"


class Risk(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class HazardKind(StrEnum):
    PEDESTRIAN = "pedestrian"
    VEHICLE = "vehicle"
    CYCLIST = "cyclist"
    OBSTACLE = "obstacle"
    SIGNAL = "signal"
    ROAD = "road"
    WEATHER = "weather"
    OTHER = "other"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class DrivingParameters(_Strict):
    """The seed's driving-parameter keys, each with one type."""

    road_type: RoadType
    lane_count: int = Field(ge=0, le=MAX_LANES)
    ego_lane_position: LanePosition
    traffic_light_state: TrafficLight
    pedestrian_on_road: bool
    closest_vehicle_distance: Distance
    ego_vehicle_speed: Speed
    road_curvature: Curvature
    weather: Weather
    visibility: Visibility
    time_of_day: TimeOfDay
    traffic_density: Density
    risk_factor: Risk


class Hazard(_Strict):
    kind: HazardKind
    description: str = Field(min_length=1, max_length=MAX_HAZARD_CHARS)
    frame: int = Field(ge=0, le=63, description="index of the sampled frame it is seen in")


class Report(_Strict):
    """One video's report, schema v1."""

    schema_version: Literal[1]
    scene_description: str = Field(min_length=1, max_length=MAX_SCENE_CHARS)
    driving_parameters: DrivingParameters
    hazards: list[Hazard] = Field(max_length=MAX_HAZARDS)
    risk_assessment: str = Field(min_length=1, max_length=MAX_RISK_CHARS)


def json_schema() -> dict[str, Any]:
    """The report's JSON Schema (what `python -m models schema` prints)."""
    schema = Report.model_json_schema()
    schema["$id"] = f"https://fleetscribe.invalid/schema/report-v{SCHEMA_VERSION}.json"
    schema["title"] = f"fleetscribe report v{SCHEMA_VERSION}"
    return schema


@dataclass
class Parsed:
    """A model answer checked against the schema: `report` set, or `error` says why not."""

    report: dict[str, Any] | None
    error: str | None

    @property
    def valid(self) -> bool:
        return self.report is not None


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)


def _json_object(text: str) -> str:
    """The outermost {...} of an answer, without code fences or chatter around it."""
    stripped = _FENCE.sub("", text.strip())
    start, end = stripped.find("{"), stripped.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the answer")
    return stripped[start : end + 1]


def parse_report(text: str, *, frames: int) -> Parsed:
    """Validate a model answer; never raises. `frames` bounds each hazard's frame index."""
    try:
        body = _json_object(text)
        json.loads(body)  # a syntax error gets json's message, with its position
    except ValueError as e:  # JSONDecodeError is a ValueError
        return Parsed(None, f"not JSON: {e}")
    try:
        # strict: "4" is not a lane count and "yes" is not a boolean, as the schema says
        report = Report.model_validate_json(body, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "report"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        return Parsed(None, f"schema v{SCHEMA_VERSION}: {where}: {first['msg']}{more}")
    for i, hazard in enumerate(report.hazards):
        if hazard.frame >= frames:
            return Parsed(
                None,
                f"schema v{SCHEMA_VERSION}: hazards.{i}.frame: {hazard.frame} but only "
                f"{frames} frames were sampled",
            )
    return Parsed(report.model_dump(mode="json"), None)
