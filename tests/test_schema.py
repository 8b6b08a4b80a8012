"""Report schema v1: parsing model answers, the published JSON Schema, and the prompt."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from enum import StrEnum
from pathlib import Path

import jsonschema  # declared in the dev extra (pyproject.toml): never skipped
import pytest

from models import grammar
from models import schema as s
from models.prompt import SYSTEM, build_messages, instruction
from models.schema import DrivingParameters, Report, json_schema, parse_report

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 8

# Every enum-typed driving parameter and the enum it must draw its values from.
PARAM_ENUMS: dict[str, type[StrEnum]] = {
    "road_type": s.RoadType,
    "ego_lane_position": s.LanePosition,
    "traffic_light_state": s.TrafficLight,
    "closest_vehicle_distance": s.Distance,
    "ego_vehicle_speed": s.Speed,
    "road_curvature": s.Curvature,
    "weather": s.Weather,
    "visibility": s.Visibility,
    "time_of_day": s.TimeOfDay,
    "traffic_density": s.Density,
    "risk_factor": s.Risk,
}


def valid_report() -> dict:
    """A complete schema-v1 report, as a model should answer it."""
    return {
        "schema_version": 1,
        "scene_description": "A white van ahead in the right lane; a pedestrian at a crossing.",
        "driving_parameters": {
            "road_type": "urban",
            "lane_count": 2,
            "ego_lane_position": "left",
            "traffic_light_state": "red",
            "pedestrian_on_road": True,
            "closest_vehicle_distance": "near",
            "ego_vehicle_speed": "slow",
            "road_curvature": "straight",
            "weather": "rain",
            "visibility": "moderate",
            "time_of_day": "night",
            "traffic_density": "light",
            "risk_factor": "high",
        },
        "hazards": [
            {"kind": "pedestrian", "description": "pedestrian stepping off the kerb", "frame": 3},
            {"kind": "vehicle", "description": "van braking", "frame": 7},
        ],
        "risk_assessment": "The pedestrian may cross; slow down and be ready to stop.",
    }


def answer(change=None) -> str:
    report = valid_report()
    if change is not None:
        change(report)
    return json.dumps(report)


def assert_one_line_error(text: str, *needles: str) -> str:
    parsed = parse_report(text, frames=FRAMES)
    assert not parsed.valid
    assert parsed.report is None
    assert parsed.error
    assert "\n" not in parsed.error, parsed.error
    for needle in needles:
        assert needle in parsed.error, parsed.error
    return parsed.error


# --- parsing ------------------------------------------------------------------------------


def test_valid_report_parses_and_round_trips():
    parsed = parse_report(answer(), frames=FRAMES)
    assert parsed.valid, parsed.error
    assert parsed.error is None
    assert parsed.report == valid_report()
    # What is stored parses again to the same thing, and is plain JSON (no enum objects).
    again = parse_report(json.dumps(parsed.report), frames=FRAMES)
    assert again.report == parsed.report
    assert json.loads(json.dumps(parsed.report)) == parsed.report
    assert type(parsed.report["driving_parameters"]["weather"]) is str
    assert Report.model_validate(parsed.report).model_dump(mode="json") == parsed.report


def test_report_without_hazards_is_valid():
    parsed = parse_report(answer(lambda r: r.update(hazards=[])), frames=FRAMES)
    assert parsed.valid, parsed.error
    assert parsed.report["hazards"] == []


@pytest.mark.parametrize(
    "wrap",
    [
        "```json\n{}\n```",
        "```\n{}\n```",
        "Here is the report:\n{}\nLet me know if you need more.",
        "Sure! ```json\n{}\n``` Hope that helps.",
        "  \n{}\n  ",
    ],
    ids=["json-fence", "bare-fence", "prose", "prose-and-fence", "whitespace"],
)
def test_prose_and_code_fences_around_the_json_still_parse(wrap):
    parsed = parse_report(wrap.format(answer()), frames=FRAMES)
    assert parsed.valid, parsed.error
    assert parsed.report == valid_report()


@pytest.mark.parametrize(
    "text",
    ["no report here, sorry", "", "[1, 2, 3]", '{"schema_version": 1, "hazards": [}'],
    ids=["prose", "empty", "array", "broken"],
)
def test_not_json_is_one_line_error(text):
    assert_one_line_error(text, "not JSON")


def _set_param(name, value):
    return lambda r: r["driving_parameters"].__setitem__(name, value)


def _del(*path):
    def change(r):
        target = r
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_set_param("weather", "sunny"), "driving_parameters.weather"),
        (_set_param("risk_factor", "extreme"), "driving_parameters.risk_factor"),
        (_set_param("road_type", "Highway"), "driving_parameters.road_type"),
        (
            lambda r: r["hazards"][1].__setitem__("kind", "dog"),
            "hazards.1.kind",
        ),
        (_set_param("lane_count", s.MAX_LANES + 1), "driving_parameters.lane_count"),
        (_set_param("lane_count", -1), "driving_parameters.lane_count"),
        (_set_param("lane_count", 2.5), "driving_parameters.lane_count"),
        (lambda r: r.update(comment="extra"), "comment"),
        (_set_param("speed_kmh", 40), "driving_parameters.speed_kmh"),
        (lambda r: r["hazards"][0].update(severity="high"), "hazards.0.severity"),
        (_del("risk_assessment"), "risk_assessment"),
        (_del("driving_parameters", "visibility"), "driving_parameters.visibility"),
        (_del("hazards", 0, "frame"), "hazards.0.frame"),
        (lambda r: r.update(schema_version=2), "schema_version"),
        (_del("schema_version"), "schema_version"),
        (
            lambda r: r.update(
                hazards=[{"kind": "other", "description": "x", "frame": 0}] * (s.MAX_HAZARDS + 1)
            ),
            "hazards",
        ),
        (
            lambda r: r.update(scene_description="x" * (s.MAX_SCENE_CHARS + 1)),
            "scene_description",
        ),
        (lambda r: r.update(scene_description=""), "scene_description"),
        (
            lambda r: r.update(risk_assessment="x" * (s.MAX_RISK_CHARS + 1)),
            "risk_assessment",
        ),
    ],
    ids=[
        "enum-weather",
        "enum-risk",
        "enum-case",
        "enum-hazard-kind",
        "lanes-too-many",
        "lanes-negative",
        "lanes-fraction",
        "extra-key-top",
        "extra-key-params",
        "extra-key-hazard",
        "missing-top",
        "missing-param",
        "missing-hazard-frame",
        "schema-version-2",
        "schema-version-missing",
        "too-many-hazards",
        "scene-too-long",
        "scene-empty",
        "risk-too-long",
    ],
)
def test_schema_violation_is_one_line_error_naming_the_field(change, field):
    error = assert_one_line_error(answer(change), "schema v1")
    # The field is named as the location of the first problem: "schema v1: <field>: ...".
    assert error.split(": ")[1] == field, error


def test_schema_version_2_is_refused_even_if_otherwise_valid():
    error = assert_one_line_error(answer(lambda r: r.update(schema_version=2)), "schema_version")
    assert "1" in error.split("schema_version")[1]


def test_max_lanes_and_max_hazards_are_accepted():
    def at_limits(r):
        r["driving_parameters"]["lane_count"] = s.MAX_LANES
        r["hazards"] = [{"kind": "road", "description": "pothole", "frame": 0}] * s.MAX_HAZARDS
        r["scene_description"] = "x" * s.MAX_SCENE_CHARS

    parsed = parse_report(answer(at_limits), frames=FRAMES)
    assert parsed.valid, parsed.error
    assert len(parsed.report["hazards"]) == s.MAX_HAZARDS


def test_hazard_frame_must_be_one_of_the_sampled_frames():
    last = answer(lambda r: r["hazards"][1].update(frame=FRAMES - 1))
    assert parse_report(last, frames=FRAMES).valid
    error = assert_one_line_error(
        answer(lambda r: r["hazards"][1].update(frame=FRAMES)), "hazards.1.frame", str(FRAMES)
    )
    assert "sampled" in error
    # The same answer is fine when more frames were sampled.
    assert parse_report(answer(lambda r: r["hazards"][1].update(frame=FRAMES)), frames=16).valid


def test_several_problems_are_still_one_line_and_counted():
    def broken(r):
        r["driving_parameters"]["weather"] = "sunny"
        r["driving_parameters"]["visibility"] = "perfect"
        r["extra"] = 1

    error = assert_one_line_error(answer(broken))
    assert "(+2 more)" in error


# --- JSON Schema --------------------------------------------------------------------------


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/$defs/"), ref
    return schema["$defs"][ref.removeprefix("#/$defs/")]


def test_json_schema_structure_matches_the_pydantic_model():
    schema = json_schema()
    json.dumps(schema)  # plain JSON
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(Report.model_fields)
    assert schema["properties"]["schema_version"]["const"] == s.SCHEMA_VERSION
    assert schema["properties"]["hazards"]["maxItems"] == s.MAX_HAZARDS
    assert schema["properties"]["scene_description"]["maxLength"] == s.MAX_SCENE_CHARS
    assert str(s.SCHEMA_VERSION) in schema["$id"]

    params = _resolve(schema, schema["properties"]["driving_parameters"])
    assert params["additionalProperties"] is False
    assert set(params["required"]) == set(DrivingParameters.model_fields)
    assert set(params["properties"]) == set(PARAM_ENUMS) | {"lane_count", "pedestrian_on_road"}
    for name, enum in PARAM_ENUMS.items():
        node = _resolve(schema, params["properties"][name])
        assert node["enum"] == [m.value for m in enum], name
    lanes = params["properties"]["lane_count"]
    assert (lanes["type"], lanes["minimum"], lanes["maximum"]) == ("integer", 0, s.MAX_LANES)
    assert params["properties"]["pedestrian_on_road"]["type"] == "boolean"

    hazard = _resolve(schema, schema["properties"]["hazards"]["items"])
    assert hazard["additionalProperties"] is False
    assert _resolve(schema, hazard["properties"]["kind"])["enum"] == [m.value for m in s.HazardKind]


def test_every_pydantic_enum_is_in_the_json_schema():
    schema = json_schema()
    enums = {json.dumps(node["enum"]) for node in schema["$defs"].values() if "enum" in node}
    for enum in [*PARAM_ENUMS.values(), s.HazardKind]:
        assert json.dumps([m.value for m in enum]) in enums, enum.__name__


def test_json_schema_is_valid_and_agrees_with_the_parser():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(valid_report()), list(validator.iter_errors(valid_report()))
    bad = {
        "weather not in the enum": answer(_set_param("weather", "sunny")),
        "too many lanes": answer(_set_param("lane_count", s.MAX_LANES + 1)),
        "an extra key": answer(lambda r: r.update(extra=1)),
        "no risk_assessment": answer(_del("risk_assessment")),
        "schema_version 2": answer(lambda r: r.update(schema_version=2)),
        "too many hazards": answer(
            lambda r: r.update(hazards=[r["hazards"][0]] * (s.MAX_HAZARDS + 1))
        ),
    }
    for why, text in bad.items():  # the JSON Schema and the parser each refuse every one
        assert not validator.is_valid(json.loads(text)), why
        assert not parse_report(text, frames=FRAMES).valid, why


def test_models_schema_cli_prints_the_json_schema():
    out = subprocess.run(
        [sys.executable, "-m", "models", "schema"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json_schema()


# --- prompt -------------------------------------------------------------------------------


def test_instruction_names_every_key_and_every_enum_value():
    text = instruction(FRAMES)
    for key in DrivingParameters.model_fields:
        assert f'"{key}" ' in text, key
    for key, enum in PARAM_ENUMS.items():
        # Each key is followed by exactly its enum's choices, in order.
        choices = "|".join(m.value for m in enum)
        assert re.search(rf'"{key}" {re.escape(choices)}[;.]', text), key
    assert f'"kind": {"|".join(m.value for m in s.HazardKind)}' in text
    for key in Report.model_fields:
        assert f'"{key}"' in text, key
    assert f'"lane_count" 0-{s.MAX_LANES}' in text
    assert f'"frame": 0-{FRAMES - 1}' in text
    # The bounds it states are the decoding grammar's.
    assert f"up to {grammar.HAZARDS} objects" in text
    assert f"up to {grammar.SCENE_CHARS} characters" in text


def test_instruction_follows_the_number_of_frames():
    assert "These 12 frames (0 to 11)" in instruction(12)
    assert '"frame": 0-11' in instruction(12)
    assert '"frame": 0-11' not in instruction(FRAMES)


@pytest.mark.parametrize("timestamps", [[0.0], [0.5, 1.5, 2.5], [i * 0.25 for i in range(12)]])
def test_build_messages_has_one_image_per_timestamp(timestamps):
    messages = build_messages(timestamps)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": SYSTEM}]
    content = messages[1]["content"]
    images = [i for i, part in enumerate(content) if part["type"] == "image"]
    assert len(images) == len(timestamps)
    # Each image is preceded by its label (index and time); the instruction comes last.
    for n, (i, t) in enumerate(zip(images, timestamps, strict=True)):
        assert content[i - 1] == {"type": "text", "text": f"Frame {n} (t={t:.1f} s):"}
    assert content[-1] == {"type": "text", "text": instruction(len(timestamps))}
    json.dumps(messages)  # plain data, safe to send to a processor or log


@pytest.mark.parametrize(
    "path, value",
    [
        (("driving_parameters", "lane_count"), "4"),
        (("driving_parameters", "pedestrian_on_road"), "yes"),
    ],
)
def test_seed_style_loose_types_are_not_schema_v1(path, value):
    """The seed's labels mix types; a v1 report must hold the one declared type."""
    data = valid_report()
    data[path[0]][path[1]] = value
    parsed = parse_report(json.dumps(data), frames=8)
    assert not parsed.valid
    assert path[1] in parsed.error
