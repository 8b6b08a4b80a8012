"""The seed's answers normalised into schema v1, and the answer shape training teaches
(`models.grammar.answer_text`), checked against the parser and the compiled grammar."""

from __future__ import annotations

import json
import random

import pytest

from models import grammar
from models import schema as s
from models.schema import parse_report
from training.seed_format import (
    RowError,
    message_text,
    normalise_answer,
    normalise_row,
)

# The seed's labels as its dataset writes them (BDD_instruct_train_filtered.json style).
SEED_PARAMS = {
    "road_type": "urban",
    "lane_count": 4,
    "ego_lane_position": "right",
    "traffic_light_state": "red",
    "pedestrian_on_road": True,
    "closest_vehicle_distance": "50 feet",
    "ego_vehicle_speed": "20 mph",
    "road_curvature": "straight",
    "weather": "clear",
    "visibility": "good",
    "traffic_density": "low",
    "risk_factor": "medium",
}
EXPECTED_PARAMS = {
    "road_type": "urban",
    "lane_count": 4,
    "ego_lane_position": "right",
    "traffic_light_state": "red",
    "pedestrian_on_road": True,
    "closest_vehicle_distance": "medium",
    "ego_vehicle_speed": "slow",
    "road_curvature": "straight",
    "weather": "clear",
    "visibility": "good",
    "time_of_day": "unknown",
    "traffic_density": "light",
    "risk_factor": "medium",
}
SCENE = "A yellow taxi ahead in the right lane; pedestrians cross at the crosswalk."
RISK = "The light ahead is red: slow down and stop before the crosswalk."


def seed_answer(params=None, *, headings=None, fenced=True, scene=SCENE, risk=RISK) -> str:
    headings = headings or (
        "**Scene Description:**",
        "**Driving Parameters (JSON):**",
        "**Risk Assessment:**",
    )
    block = json.dumps(SEED_PARAMS if params is None else params, indent=2)
    if fenced:
        block = f"```json\n{block}\n```"
    return f"{headings[0]}\n{scene}\n\n{headings[1]}\n{block}\n\n{headings[2]}\n{risk}"


def with_value(name, value) -> dict:
    return normalise_answer(seed_answer({**SEED_PARAMS, name: value}))["driving_parameters"]


def valid_report() -> dict:
    return {
        "schema_version": 1,
        "scene_description": "A white van ahead in the right lane; a pedestrian at a crossing.",
        "driving_parameters": dict(EXPECTED_PARAMS, time_of_day="night"),
        "hazards": [{"kind": "pedestrian", "description": "pedestrian at the kerb", "frame": 3}],
        "risk_assessment": "The pedestrian may step out; slow down and cover the brake.",
    }


# -- the three parts ----------------------------------------------------------------------


def test_a_seed_answer_becomes_a_valid_schema_v1_report():
    report = normalise_answer(seed_answer())
    assert report == {
        "schema_version": 1,
        "scene_description": SCENE,
        "driving_parameters": EXPECTED_PARAMS,
        "hazards": [],
        "risk_assessment": RISK,
    }
    assert parse_report(json.dumps(report), frames=1).valid


@pytest.mark.parametrize(
    "headings",
    [
        ("**Scene Description:**", "**Driving Parameters (JSON):**", "**Risk Assessment:**"),
        ("**Scene Description**", "**Driving Parameters**", "**Risk Assessment**"),
        ("**Scene Description**:", "**Driving Parameters**:", "**Risk Assessment**:"),
        ("Scene Description:", "Driving Parameters:", "Risk Assessment:"),
        ("1. Scene description", "2. Driving parameters (JSON)", "3. Risk assessment"),
        ("1) Scene", "2) Parameters", "3) Risk"),
        ("## Scene Description", "## Driving Parameters", "## Risk Assessment"),
        ("### 1. Scene Description", "### 2. Driving Parameters (JSON)", "### 3. Risk Assessment"),
        ("Part 1 - Scene description:", "Part 2 - Driving parameters:", "Part 3 - Risk analysis:"),
    ],
)
def test_every_heading_style_separates_the_three_parts(headings):
    report = normalise_answer(seed_answer(headings=headings))
    assert (report["scene_description"], report["risk_assessment"]) == (SCENE, RISK)
    assert report["driving_parameters"] == EXPECTED_PARAMS


def test_text_may_follow_a_heading_on_its_line_and_sections_may_come_in_any_order():
    block = json.dumps(SEED_PARAMS)
    answer = f"Risk Assessment: {RISK}\nScene description: {SCENE}\nDriving parameters: {block}"
    report = normalise_answer(answer)
    assert (report["scene_description"], report["risk_assessment"]) == (SCENE, RISK)


def test_without_headings_the_scene_comes_before_the_json_and_the_risk_after():
    report = normalise_answer(f"{SCENE}\n{json.dumps(SEED_PARAMS)}\n{RISK}")
    assert (report["scene_description"], report["risk_assessment"]) == (SCENE, RISK)
    assert report["driving_parameters"] == EXPECTED_PARAMS


def test_chatter_before_a_scene_heading_is_not_part_of_the_scene():
    report = normalise_answer("Sure! Here is my analysis.\n\n" + seed_answer())
    assert report["scene_description"] == SCENE


@pytest.mark.parametrize("fence", ["```json\n{}\n```", "```\n{}\n```", "```JSON {}```", "{}"])
def test_fenced_and_bare_json_blocks_are_read(fence):
    block = fence.replace("{}", json.dumps(SEED_PARAMS, indent=2))
    answer = f"Scene Description:\n{SCENE}\nDriving Parameters:\n{block}\nRisk Assessment:\n{RISK}"
    assert normalise_answer(answer)["driving_parameters"] == EXPECTED_PARAMS


def test_markdown_bullets_and_bold_become_plain_prose():
    risk = "- **Nearby Vehicles:** a taxi ahead.\n- **Pedestrians:** two at the kerb.\n\nSlow down."
    report = normalise_answer(seed_answer(risk=risk))
    assert (
        report["risk_assessment"]
        == "Nearby Vehicles: a taxi ahead. Pedestrians: two at the kerb. Slow down."
    )


def test_a_long_section_is_cut_after_a_whole_sentence_within_the_grammar_bound():
    sentence = "The ego vehicle keeps its lane behind the taxi at a steady gap. "
    report = normalise_answer(seed_answer(risk=sentence * 20, scene=sentence * 30))
    for key, bound in (
        ("risk_assessment", grammar.RISK_CHARS),
        ("scene_description", grammar.SCENE_CHARS),
    ):
        text = report[key]
        assert bound - len(sentence) < len(text) <= bound
        assert text.endswith("steady gap.") and (sentence * 30).startswith(text)


def test_a_schema_v1_answer_is_kept_as_it_is():
    report = valid_report()
    assert normalise_answer(json.dumps(report)) == report
    assert normalise_answer("```json\n" + json.dumps(report, indent=2) + "\n```") == report


# -- loose values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        # weather
        ("weather", "sunny", "clear"),
        ("weather", "Clear skies", "clear"),
        ("weather", "Clear Night Sky, No Rain", "clear"),
        ("weather", "overcast", "cloudy"),
        ("weather", "Partly Cloudy", "cloudy"),
        ("weather", "overcast with possible rain", "cloudy"),
        ("weather", "rainy", "rain"),
        ("weather", "Snowing", "snow"),
        ("weather", "Cold and snowy", "snow"),
        ("weather", "foggy", "fog"),
        # road type
        ("road_type", "city", "urban"),
        ("road_type", "urban road", "urban"),
        ("road_type", "Urban Street", "urban"),
        ("road_type", "multi-lane urban road", "urban"),
        ("road_type", "freeway", "highway"),
        ("road_type", "Motorway", "highway"),
        ("road_type", "multi-lane divided highway", "highway"),
        ("road_type", "Suburban Street", "residential"),
        ("road_type", "airport parking lot", "parking"),
        # speed: words and units
        ("ego_vehicle_speed", "medium", "moderate"),
        ("ego_vehicle_speed", "stationary", "stopped"),
        ("ego_vehicle_speed", "0 mph", "stopped"),
        ("ego_vehicle_speed", "15 mph", "slow"),
        ("ego_vehicle_speed", "30 km/h", "slow"),
        ("ego_vehicle_speed", "approximately 30 mph", "moderate"),
        ("ego_vehicle_speed", "60-80 km/h", "moderate"),
        ("ego_vehicle_speed", "about 60 mph", "fast"),
        ("ego_vehicle_speed", "Slow, approximately 15 mph", "slow"),
        # distance: words and units
        ("closest_vehicle_distance", "close", "near"),
        ("closest_vehicle_distance", "approximately 5 meters", "near"),
        ("closest_vehicle_distance", "Moderate", "medium"),
        ("closest_vehicle_distance", "50-100 feet", "medium"),
        ("closest_vehicle_distance", "50 meters", "far"),
        ("closest_vehicle_distance", "no vehicle", "none"),
        ("closest_vehicle_distance", "n/a", "none"),
        # density, risk
        ("traffic_density", "low", "light"),
        ("traffic_density", "Low traffic density", "light"),
        ("traffic_density", "high", "heavy"),
        ("traffic_density", "dense", "heavy"),
        ("traffic_density", "Moderate, Several Vehicles Ahead", "moderate"),
        ("risk_factor", "moderate", "medium"),
        ("risk_factor", "Low risk", "low"),
        ("risk_factor", "severe", "critical"),
        # traffic light
        ("traffic_light_state", "Red light ahead", "red"),
        ("traffic_light_state", "amber", "yellow"),
        ("traffic_light_state", "off", "none"),
        ("traffic_light_state", "n/a", "none"),
        ("traffic_light_state", "not visible", "none"),
        ("traffic_light_state", "not applicable (no traffic lights visible)", "none"),
        ("traffic_light_state", "Unknown", "unknown"),
        # lane position, curvature, visibility
        ("ego_lane_position", "Right Lane", "right"),
        ("ego_lane_position", "rightmost", "right"),
        ("ego_lane_position", "center", "middle"),
        ("ego_lane_position", "Left Turn Lane", "left"),
        ("road_curvature", "Straight ahead", "straight"),
        ("road_curvature", "Slight curve to the right", "gentle"),
        ("road_curvature", "curve ahead", "gentle"),
        ("road_curvature", "sharp right curve", "sharp"),
        ("visibility", "clear", "good"),
        ("visibility", "low", "poor"),
        ("visibility", "slightly reduced", "moderate"),
        ("visibility", "Reduced visibility due to rain", "moderate"),
    ],
)
def test_loose_enum_values_map_onto_the_schema(name, raw, expected):
    assert with_value(name, raw)[name] == expected


@pytest.mark.parametrize("raw", [4, "4", "4 lanes", "4 Lanes", "four", 4.0])
def test_lane_counts_in_any_spelling(raw):
    assert with_value("lane_count", raw)["lane_count"] == 4


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (True, True),
        ("yes", True),
        ("Yes, multiple pedestrians visible", True),
        ("crossing at crosswalk", True),
        (1, True),
        (False, False),
        ("no", False),
        ("none", False),
        ("None observed", False),
        ("false", False),
        ("No pedestrians visible", False),
        (0, False),
    ],
)
def test_pedestrian_on_road_as_yes_or_no(raw, expected):
    assert with_value("pedestrian_on_road", raw)["pedestrian_on_road"] is expected


def test_time_of_day_defaults_to_unknown_and_is_read_when_given():
    assert with_value("weather", "clear")["time_of_day"] == "unknown"
    assert with_value("time_of_day", "Daytime")["time_of_day"] == "day"
    assert with_value("time_of_day", "sunset")["time_of_day"] == "dawn_dusk"


def test_keys_are_matched_whatever_their_case_and_spacing():
    params = {k.replace("_", " ").title(): v for k, v in SEED_PARAMS.items()}
    assert normalise_answer(seed_answer(params))["driving_parameters"] == EXPECTED_PARAMS


# -- reasons, word for word -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "reason"),
    [
        (
            "weather",
            "purple",
            "driving_parameters.weather: 'purple' is not one of clear|cloudy|rain|snow|fog|unknown",
        ),
        (  # two readings: no guess
            "ego_vehicle_speed",
            "slow to moderate",
            "driving_parameters.ego_vehicle_speed: 'slow to moderate' is not one of "
            "stopped|slow|moderate|fast",
        ),
        (  # the schema has no unknown distance, and "none" would claim no vehicle
            "closest_vehicle_distance",
            "unknown",
            "driving_parameters.closest_vehicle_distance: 'unknown' is not one of "
            "near|medium|far|none",
        ),
        (
            "traffic_light_state",
            {"current_light": "red", "next_light": "green"},
            'driving_parameters.traffic_light_state: {"current_light": "red", "next_light": '
            '"green"} is not one of red|yellow|green|none|unknown',
        ),
        (
            "road_type",
            None,
            "driving_parameters.road_type: null is not one of "
            "highway|urban|residential|rural|intersection|parking|other",
        ),
        (
            "lane_count",
            "multiple",
            "driving_parameters.lane_count: 'multiple' is not a lane count 0-12",
        ),
        ("lane_count", 13, "driving_parameters.lane_count: 13 is not a lane count 0-12"),
        ("lane_count", True, "driving_parameters.lane_count: true is not a lane count 0-12"),
        (
            "pedestrian_on_road",
            "maybe",
            "driving_parameters.pedestrian_on_road: 'maybe' is not yes or no",
        ),
        ("pedestrian_on_road", 2, "driving_parameters.pedestrian_on_road: 2 is not yes or no"),
    ],
)
def test_a_value_that_maps_onto_nothing_fails_the_row_with_its_reason(name, raw, reason):
    with pytest.raises(RowError) as e:
        with_value(name, raw)
    assert str(e.value) == reason


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            seed_answer({k: v for k, v in SEED_PARAMS.items() if k != "weather"}),
            "driving_parameters.weather: missing",
        ),
        (
            f"Scene Description:\n{SCENE}\nRisk Assessment:\n{RISK}",
            "no driving-parameters JSON block",
        ),
        (
            'Scene: a road\n```json\n{\n "road_type": "urban"\n "lane_count": 2}\n```\nRisk: low',
            "driving parameters: not JSON: Expecting ',' delimiter: line 3 column 2 (char 25)",
        ),
        (
            'Scene: a road\n{"road_type": "urban", "lane_count": 2\nRisk: low',
            "driving parameters: not JSON: Expecting ',' delimiter: line 2 column 1 (char 39)",
        ),
        (seed_answer(scene=" "), "no scene description"),
        (f"Scene Description:\n{SCENE}\n{json.dumps(SEED_PARAMS)}\nRisk:\n", "no risk assessment"),
        (
            json.dumps(
                {**valid_report(), "hazards": [{"kind": "deer", "description": "x", "frame": 0}]}
            ),
            "schema v1: hazards.0.kind: Input should be 'pedestrian', 'vehicle', 'cyclist', "
            "'obstacle', 'signal', 'road', 'weather' or 'other'",
        ),
    ],
    ids=["missing-key", "no-json", "bad-json", "unclosed-json", "no-scene", "no-risk", "schema-v1"],
)
def test_an_answer_that_cannot_be_read_fails_with_its_reason(answer, reason):
    with pytest.raises(RowError) as e:
        normalise_answer(answer)
    assert str(e.value) == reason


# -- rows -----------------------------------------------------------------------------------


def test_message_text_reads_strings_parts_and_single_messages():
    parts = [
        {"type": "image", "text": None},  # as datasets stores an image part
        {"type": "text", "text": "first"},
        {"type": "image"},
        {"type": "text", "text": "second"},
    ]
    assert message_text([{"role": "user", "content": parts}]) == "first\nsecond"
    assert message_text([{"role": "assistant", "content": "plain"}]) == "plain"
    assert message_text({"role": "assistant", "content": "one dict"}) == "one dict"
    assert message_text(None) == ""


def seed_row(images=("f0", "f1", "f2", "f3"), **extra) -> dict:
    return {
        "images": list(images),
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": seed_answer()}]}],
        **extra,
    }


def test_a_seed_row_becomes_a_canonical_row_with_its_frames_unchanged():
    frames = [object() for _ in range(3)]
    row = normalise_row(seed_row(frames))
    assert row["images"] == frames and all(
        a is b for a, b in zip(row["images"], frames, strict=True)
    )
    assert row["timestamps"] == [0.0, 1.0, 2.0]
    assert row["source"] == ""
    assert json.loads(row["report"])["driving_parameters"] == EXPECTED_PARAMS
    again = normalise_row(seed_row(frames, timestamps=[0.5, 1, 2.25], source="bdd/x.mov"))
    assert (again["timestamps"], again["source"]) == ([0.5, 1.0, 2.25], "bdd/x.mov")


def test_a_canonical_row_is_validated_and_passed_through():
    text = json.dumps(valid_report())
    row = {
        "images": ["a", "b", "c", "d"],
        "timestamps": [0, 1, 2, 3],
        "report": text,
        "source": "s",
    }
    assert normalise_row(row) == {**row, "timestamps": [0.0, 1.0, 2.0, 3.0]}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (seed_row(images=[]), "no images"),
        ({"prompt": [], "completion": []}, "no images"),
        (seed_row(images=["f"] * 65), "65 frames, more than 64"),
        ({"images": ["f"], "completion": None}, "no completion"),
        ({"images": ["f"], "completion": [{"role": "assistant", "content": ""}]}, "no completion"),
        (seed_row(timestamps=[0.0, 1.0, 2.0]), "3 timestamps for 4 frames"),
        (
            seed_row(images=["f"] * 3)
            | {"completion": [{"role": "assistant", "content": json.dumps(valid_report())}]},
            "hazards.0.frame: 3 but the row has 3 frames",
        ),
        (
            {"images": ["f"] * 3, "report": json.dumps(valid_report())},
            "report: schema v1: hazards.0.frame: 3 but only 3 frames were sampled",
        ),
        ({"images": ["f"], "report": "{"}, "report: not JSON: no JSON object in the answer"),
    ],
    ids=[
        "no-images",
        "no-column",
        "too-many",
        "no-completion",
        "empty",
        "timestamps",
        "hazard",
        "canonical-hazard",
        "canonical-json",
    ],
)
def test_a_row_that_cannot_be_used_fails_with_its_reason(row, reason):
    with pytest.raises(RowError) as e:
        normalise_row(row)
    assert str(e.value) == reason


# -- the answer shape: answer_text ------------------------------------------------------------


def test_answer_text_is_compact_ordered_and_sanitised():
    report = valid_report()
    report["scene_description"] = "Café “Zebra” \\ crossing\n\tnow   ahead ⚠ "
    report["risk_assessment"] = "\n\t "
    report["driving_parameters"] = dict(reversed(report["driving_parameters"].items()))
    text = grammar.answer_text(report, 8)
    assert text.startswith(
        '{"schema_version":1,"scene_description":"Cafe \'Zebra\' / crossing now ahead",'
        '"driving_parameters":{"road_type":"urban","lane_count":4,'
    )
    assert text.endswith(
        '"hazards":[{"kind":"pedestrian","description":"pedestrian at the kerb","frame":3}],'
        '"risk_assessment":"none"}'
    )
    assert list(json.loads(text)["driving_parameters"]) == list(s.DrivingParameters.model_fields)


def test_answer_text_keeps_to_the_bounds():
    words = random.Random(1).choices(
        ["car", "pedestrian", "lane", "brakes", "intersection"], k=1200
    )
    scene = " ".join(words)
    assert len(scene) > 5000
    report = valid_report() | {"scene_description": scene, "risk_assessment": scene}
    report["hazards"] = [{"kind": "vehicle", "description": scene, "frame": 40}] * 9
    out = json.loads(grammar.answer_text(report, 4))
    for text, bound in [
        (out["scene_description"], grammar.SCENE_CHARS),
        (out["risk_assessment"], grammar.RISK_CHARS),
        (out["hazards"][0]["description"], grammar.HAZARD_CHARS),
    ]:
        assert bound - len("intersection ") <= len(text) <= bound
        assert scene.startswith(text) and scene[len(text)] == " "  # ends at a word
    assert len(out["hazards"]) == grammar.HAZARDS
    assert {h["frame"] for h in out["hazards"]} == {3}


def test_answer_text_refuses_what_the_grammar_cannot_express():
    report = valid_report()
    report["driving_parameters"]["weather"] = "sunny"
    with pytest.raises(ValueError, match="weather"):
        grammar.answer_text(report, 8)


def _random_report(rng: random.Random) -> dict:
    # ASCII the grammar refuses ('"', '\\', controls) and non-ASCII, beside plain text
    pool = (
        "abcXYZ 019 .,;:!?'\"\\/-()[]{}\n\t\0\x7f"
        + "\u00e9\u00fc\u00df\u201c\u201d\u2013\u00a0\u4e2d"
    )

    def text(longest: int) -> str:
        return "".join(rng.choice(pool) for _ in range(rng.randint(0, longest)))

    params = {}
    for name, field in s.DrivingParameters.model_fields.items():
        if field.annotation is bool:
            params[name] = rng.random() < 0.5
        elif field.annotation is int:
            params[name] = rng.randint(0, s.MAX_LANES)
        else:
            params[name] = rng.choice([m.value for m in field.annotation])
    return {
        "schema_version": 1,
        "scene_description": text(900),
        "driving_parameters": params,
        "hazards": [
            {
                "kind": rng.choice([k.value for k in s.HazardKind]),
                "description": text(200),
                "frame": rng.randint(0, 12),
            }
            for _ in range(rng.randint(0, 7))
        ],
        "risk_assessment": text(700),
    }


@pytest.fixture(scope="module")
def tiny_grammar(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    from models.decoding import ReportGrammar

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    vocab = AutoConfig.from_pretrained(tiny_model).get_text_config().vocab_size
    return tokenizer, ReportGrammar(tokenizer, vocab)


def _accepted(tiny_grammar, text: str, frames: int) -> bool:
    """`text` fed to the grammar's matcher token by token, as the model would write it,
    then the stop token: accepted and terminated."""
    import xgrammar as xgr

    tokenizer, compiled = tiny_grammar
    matcher = xgr.GrammarMatcher(compiled.compiled(frames))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    return (
        all(matcher.accept_token(i) for i in ids)
        and not matcher.is_terminated()
        and matcher.accept_token(matcher.stop_token_ids[0])
        and matcher.is_terminated()
    )


def test_answer_text_is_what_the_compiled_grammar_accepts_token_by_token(tiny_grammar):
    rng = random.Random(7)
    for _ in range(40):
        frames = rng.randint(1, 8)
        text = grammar.answer_text(_random_report(rng), frames)
        assert parse_report(text, frames=frames).error is None
        assert _accepted(tiny_grammar, text, frames), text


def test_the_grammar_refuses_what_answer_text_cleans_up(tiny_grammar):
    # The reference: the raw report (a quote, a newline, a frame out of range) is refused.
    raw = valid_report() | {"scene_description": 'a "quoted"\nscene'}
    raw["hazards"] = [{"kind": "vehicle", "description": "van", "frame": 5}]
    assert not _accepted(tiny_grammar, json.dumps(raw, separators=(",", ":")), 4)
    assert _accepted(tiny_grammar, grammar.answer_text(raw, 4), 4)


def test_a_normalised_seed_answer_is_accepted_by_the_grammar(tiny_grammar):
    text = grammar.answer_text(normalise_answer(seed_answer()), 4)
    assert _accepted(tiny_grammar, text, 4)
