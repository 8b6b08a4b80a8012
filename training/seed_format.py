"""The seed's training rows, normalised into fleetscribe's: schema-v1 reports.

The seed (SEED.md; HF dataset `SarveshBTelang/SFT_VLA_Dataset_1.0`) answers in three
parts: a scene description, a "driving parameters" JSON block (often in a ```json fence)
and a risk assessment, under headings in varying styles, with loosely typed values
(lane_count 4, "4" or "4 lanes"; pedestrian_on_road true, "yes" or "none"; "50 feet",
"20 mph", "Slight curve to the right"). Each value is mapped onto the schema's one type
here, through synonyms, units and the words it contains; a value that maps onto nothing,
or onto two different things ("slow to moderate"), fails its row with a one-line reason
(RowError), so nothing is guessed and nothing is dropped silently.

Texts are made what the describe grammar admits (`models.grammar.answer_text`): the
seed's long risk sections are cut at a word boundary, as the grammar would cut them.
Pure Python: no torch, no datasets.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from models import grammar
from models import schema as s


class RowError(ValueError):
    """A training row that cannot be used; its str is the one-line reason."""


# -- values ---------------------------------------------------------------------------

# Loose spellings (lower case, words separated by single spaces) -> schema values. A
# value is looked up whole first, then by the words it contains (see _enum).
_SYNONYMS: dict[str, dict[str, str]] = {
    "road_type": {
        "city": "urban",
        "urban road": "urban",
        "urban street": "urban",
        "city street": "urban",
        "downtown": "urban",
        "freeway": "highway",
        "motorway": "highway",
        "expressway": "highway",
        "interstate": "highway",
        "suburban": "residential",
        "residential street": "residential",
        "country road": "rural",
        "countryside": "rural",
        "junction": "intersection",
        "crossroads": "intersection",
        "roundabout": "intersection",
        "parking lot": "parking",
        "car park": "parking",
        "parking garage": "parking",
        "tunnel": "other",
        "bridge": "other",
    },
    "ego_lane_position": {
        "leftmost": "left",
        "rightmost": "right",
        "center": "middle",
        "centre": "middle",
        "central": "middle",
        "only": "single",
        "single lane": "single",
        "only lane": "single",
        "unclear": "unknown",
        "not visible": "unknown",
    },
    "traffic_light_state": {
        "amber": "yellow",
        "orange": "yellow",
        "off": "none",
        "no": "none",
        "no light": "none",
        "no traffic light": "none",
        "no traffic lights": "none",
        "n a": "none",
        "na": "none",
        "not applicable": "none",
        "not present": "none",
        "not visible": "none",  # none seen in the frames
        "absent": "none",
        "unclear": "unknown",
        "flashing": "unknown",
    },
    "closest_vehicle_distance": {
        "close": "near",
        "very close": "near",
        "nearby": "near",
        "moderate": "medium",
        "mid": "medium",
        "distant": "far",
        "no vehicle": "none",
        "no vehicles": "none",
        "n a": "none",
        "na": "none",
        "not applicable": "none",
    },
    "ego_vehicle_speed": {
        "medium": "moderate",
        "normal": "moderate",
        "steady": "moderate",
        "stationary": "stopped",
        "stopping": "stopped",
        "stop": "stopped",
        "standing": "stopped",
        "idle": "stopped",
        "zero": "stopped",
        "parked": "stopped",
        "low": "slow",
        "crawling": "slow",
        "high": "fast",
        "rapid": "fast",
    },
    "road_curvature": {
        "straight ahead": "straight",
        "slight": "gentle",
        "slightly curved": "gentle",
        "mild": "gentle",
        "sharp curve": "sharp",
        "sharp turn": "sharp",
        "sharp bend": "sharp",
        "winding": "sharp",
        "tight": "sharp",
        "hairpin": "sharp",
    },
    "weather": {
        "sunny": "clear",
        "fair": "clear",
        "clear skies": "clear",
        "clear sky": "clear",
        "overcast": "cloudy",
        "partly cloudy": "cloudy",
        "cloud": "cloudy",
        "clouds": "cloudy",
        "rainy": "rain",
        "raining": "rain",
        "drizzle": "rain",
        "showers": "rain",
        "wet": "rain",
        "snowy": "snow",
        "snowing": "snow",
        "snowfall": "snow",
        "foggy": "fog",
        "mist": "fog",
        "misty": "fog",
        "haze": "fog",
        "hazy": "fog",
        "unclear": "unknown",
    },
    "visibility": {
        "clear": "good",
        "high": "good",
        "excellent": "good",
        "fair": "moderate",
        "medium": "moderate",
        "reduced": "moderate",
        "slightly reduced": "moderate",
        "limited": "moderate",
        "low": "poor",
        "bad": "poor",
        "very low": "poor",
    },
    "time_of_day": {
        "daytime": "day",
        "daylight": "day",
        "morning": "day",
        "afternoon": "day",
        "noon": "day",
        "dawn": "dawn_dusk",
        "dusk": "dawn_dusk",
        "sunrise": "dawn_dusk",
        "sunset": "dawn_dusk",
        "twilight": "dawn_dusk",
        "dawn dusk": "dawn_dusk",
        "evening": "dawn_dusk",
        "nighttime": "night",
        "night time": "night",
    },
    "traffic_density": {
        "low": "light",
        "sparse": "light",
        "minimal": "light",
        "high": "heavy",
        "dense": "heavy",
        "congested": "heavy",
        "congestion": "heavy",
        "medium": "moderate",
        "no traffic": "none",
        "empty": "none",
    },
    "risk_factor": {
        "moderate": "medium",
        "severe": "critical",
        "extreme": "critical",
        "very high": "critical",
        "minimal": "low",
    },
}

# Words that name a value only when nothing more telling is said: "Suburban Street" is
# residential, "street" alone urban; "sharp right curve" is sharp, "curve ahead" gentle.
_WEAK: dict[str, dict[str, str]] = {
    "road_type": {"street": "urban"},
    "road_curvature": {
        "curve": "gentle",
        "curved": "gentle",
        "curving": "gentle",
        "bend": "gentle",
    },
}

_ENUMS: dict[str, type] = {
    name: field.annotation
    for name, field in s.DrivingParameters.model_fields.items()
    if field.annotation not in (bool, int)
}
_DEFAULTS = {"time_of_day": "unknown"}  # the seed's labels have no time of day

_YES = {"yes", "y", "true", "1", "present", "visible", "crossing", "several", "multiple"}
_NO = {"no", "n", "false", "0", "none", "not", "nobody", "absent"}
_NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}

# Metres per unit, and km/h per unit.
_LENGTH = {"m": 1.0, "meter": 1.0, "meters": 1.0, "metre": 1.0, "metres": 1.0}
_LENGTH |= {"ft": 0.3048, "foot": 0.3048, "feet": 0.3048, "yard": 0.9144, "yards": 0.9144}
_SPEED = {"mph": 1.609, "kmh": 1.0, "kph": 1.0, "kmph": 1.0}
# "50 feet", "about 5 to 10 m", "60-80 km/h" (as _words leaves them: "60 80 km h").
_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(?:(?: to | )(\d+(?:\.\d+)?))? ?([a-z]+)?")


def _words(value: str) -> str:
    """Lower case, no punctuation but decimal points, one space between words: the form
    synonyms are written in."""
    text = re.sub(r"[^a-z0-9.]+|(?<!\d)\.|\.(?!\d)", " ", value.lower())
    return " ".join(text.split())


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _enum(name: str, value: Any) -> str:
    choices = [m.value for m in _ENUMS[name]]
    table = {c: c for c in choices} | {c.replace("_", " "): c for c in choices}
    table |= _SYNONYMS.get(name, {})
    if isinstance(value, str):
        text = _words(value)
        head = _words(re.split(r"[,;(]| with | due to ", value.lower())[0])
        for candidate in (text, head):
            if candidate in table:
                return table[candidate]
        quantity = _quantity(name, text)
        if quantity is not None:
            return quantity
        for candidate in (head, text):
            found = _found(candidate, table) or _found(candidate, _WEAK.get(name, {}))
            if len(found) == 1:
                return found.pop()
    raise RowError(f"driving_parameters.{name}: {_show(value)} is not one of {'|'.join(choices)}")


def _found(text: str, table: dict[str, str]) -> set[str]:
    """The schema values of the phrases in `text`, longest phrases first."""
    found = set()
    for phrase in sorted(table, key=len, reverse=True):
        pattern = rf"(?<![a-z0-9]){re.escape(phrase)}(?![a-z0-9])"
        if re.search(pattern, text):
            found.add(table[phrase])
            text = re.sub(pattern, " ", text)
    return found


def _quantity(name: str, text: str) -> str | None:
    """A distance in metres or feet, or a speed in mph or km/h, as its schema band."""
    if name not in ("closest_vehicle_distance", "ego_vehicle_speed"):
        return None
    match = _QUANTITY.search(re.sub(r"\bkm (?:per )?h(?:our)?\b", "kmh", text))
    if match is None:
        return None
    low, high, unit = match.groups()
    amount = (float(low) + float(high or low)) / 2
    if name == "closest_vehicle_distance":
        if unit not in _LENGTH:
            return None
        metres = amount * _LENGTH[unit]
        return "near" if metres < 10 else "medium" if metres < 30 else "far"
    if amount == 0:
        return "stopped"  # in any unit
    if unit not in _SPEED:
        return None
    kmh = amount * _SPEED[unit]
    return "slow" if kmh < 35 else "moderate" if kmh < 75 else "fast"


def _lane_count(value: Any) -> int:
    count = value
    if isinstance(value, bool):
        count = None  # not a count, whatever Python says
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"(\d+|[a-z]+)(?: lanes?)?", _words(value))
        word = match.group(1) if match else ""
        count = int(word) if word.isdigit() else _NUMBERS.get(word)
    if isinstance(count, int) and 0 <= count <= s.MAX_LANES:
        return count
    raise RowError(
        f"driving_parameters.lane_count: {_show(value)} is not a lane count 0-{s.MAX_LANES}"
    )


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and _words(value):
        first = _words(value).split()[0]
        if first in _YES:
            return True
        if first in _NO:
            return False
    raise RowError(f"driving_parameters.{name}: {_show(value)} is not yes or no")


def normalise_parameters(raw: dict) -> dict:
    """The seed's driving-parameters object as schema-v1 `driving_parameters`."""
    given = {_words(str(k)).replace(" ", "_"): v for k, v in raw.items()}
    out = {}
    for name, field in s.DrivingParameters.model_fields.items():
        if name not in given:
            if name in _DEFAULTS:
                out[name] = _DEFAULTS[name]
                continue
            raise RowError(f"driving_parameters.{name}: missing")
        value = given[name]
        if field.annotation is bool:
            out[name] = _boolean(name, value)
        elif field.annotation is int:
            out[name] = _lane_count(value)
        else:
            out[name] = _enum(name, value)
    return out


# -- answers --------------------------------------------------------------------------

_SECTIONS = {
    "scene": "scene",
    "scene description": "scene",
    "scene summary": "scene",
    "scene understanding": "scene",
    "description": "scene",
    "driving parameters": "params",
    "driving parameter": "params",
    "parameters": "params",
    "risk assessment": "risk",
    "risk analysis": "risk",
    "risk": "risk",
    "risks": "risk",
    "safety assessment": "risk",
}
_NAMES = "|".join(sorted((re.escape(n).replace(r"\ ", r"\s+") for n in _SECTIONS), key=len)[::-1])
# A heading on its own line, in any of the seed's styles: "Scene Description:",
# "**Scene Description:**", "**Scene Description**:", "1. Scene description",
# "## Risk Assessment", "Part 3 - Risk assessment (JSON)"; text may follow a colon.
_HEADING = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:[*_]{1,2}[ \t]*)?"
    r"(?:(?:part|step|section)?[ \t]*\d+[ \t]*[.):\-][ \t]*)?(?:[*_]{1,2}[ \t]*)?"
    rf"(?P<name>{_NAMES})[ \t]*(?:\((?:json|in json)\)[ \t]*)?(?:[*_]{{1,2}}[ \t]*)?"
    r"(?::[ \t]*(?:[*_]{1,2})?|[ \t]*$)",
    re.IGNORECASE | re.MULTILINE,
)
_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+", re.MULTILINE)


def _json_block(text: str) -> tuple[int, int, str]:
    """(start, end, body) of the driving-parameters block: the first fence holding an
    object, else the first balanced {...}."""
    for fence in _FENCE.finditer(text):
        if fence.group(1).strip().startswith("{"):
            return fence.start(), fence.end(), fence.group(1).strip()
    start = text.find("{")
    if start < 0:
        raise RowError("no driving-parameters JSON block")
    depth, quoted, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif quoted:
            escaped, quoted = c == "\\", c != '"'
        elif c == '"':
            quoted = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return start, i + 1, text[start : i + 1]
    return start, len(text), text[start:]  # unclosed: json.loads says where


def _clean(text: str) -> str:
    """A section's markdown as one line of prose."""
    text = _BULLET.sub("", text)
    text = re.sub(r"[*_]{2}|`+|^#+\s*", "", text, flags=re.MULTILINE)
    return " ".join(text.split())


def _sentences(text: str, bound: int) -> str:
    """`text` cut after its last whole sentence within `bound` characters, when that keeps
    at least half of it (the grammar itself would cut at a word)."""
    if len(text) <= bound:
        return text
    end = max(text.rfind(". ", 0, bound), text.rfind("! ", 0, bound), text.rfind("? ", 0, bound))
    return text[: end + 1] if end + 1 >= bound // 2 else text


def _sections(text: str, block: tuple[int, int]) -> dict[str, str]:
    """The text under each heading; with no such heading, the scene is what comes before
    the JSON block and the risk assessment what comes after it."""
    marks = [
        (m.start(), m.end(), _SECTIONS[" ".join(m.group("name").lower().split())])
        for m in _HEADING.finditer(text)
        if not block[0] <= m.start() < block[1]
    ]
    marks.append((block[0], block[1], "json"))
    marks.sort()
    headed = {label for _, _, label in marks}
    parts: dict[str, list[str]] = {"scene": [], "params": [], "risk": []}
    bounds = [(0, 0, None), *marks, (len(text), len(text), None)]
    for (_, end, label), (start, _, _) in itertools.pairwise(bounds):
        if label is None:
            label = "scene" if "scene" not in headed else None
        elif label == "json":
            label = "risk" if "risk" not in headed else None
        if label in parts:
            parts[label].append(text[end:start])
    return {label: _clean(" ".join(chunks)) for label, chunks in parts.items()}


def normalise_answer(text: str) -> dict:
    """A seed answer (three parts) as a schema-v1 report dict; an answer that already is
    a schema-v1 JSON object is validated and kept as it is. Raises RowError."""
    start, end, body = _json_block(text)
    try:
        raw = json.loads(body)
    except ValueError as e:
        raise RowError(f"driving parameters: not JSON: {e}") from None
    if "schema_version" in raw:
        parsed = s.parse_report(body, frames=grammar.MAX_FRAMES)
        if not parsed.valid:
            raise RowError(parsed.error)
        return parsed.report
    if list(raw) == ["driving_parameters"] and isinstance(raw["driving_parameters"], dict):
        raw = raw["driving_parameters"]
    params = normalise_parameters(raw)
    sections = _sections(text, (start, end))
    if not sections["scene"]:
        raise RowError("no scene description")
    if not sections["risk"]:
        raise RowError("no risk assessment")
    report = {
        "schema_version": s.SCHEMA_VERSION,
        "scene_description": _sentences(sections["scene"], grammar.SCENE_CHARS),
        "driving_parameters": params,
        "hazards": [],  # the seed names none
        "risk_assessment": _sentences(sections["risk"], grammar.RISK_CHARS),
    }
    # The grammar's shape (bounds, characters) is the one training teaches.
    return json.loads(grammar.answer_text(report, grammar.MAX_FRAMES))


# -- rows -----------------------------------------------------------------------------


def message_text(messages: Any) -> str:
    """The text of chat messages: a [{role, content}] list (or one such dict, or a plain
    string), each content a string or a list of {"type": "text", "text": ...} and
    {"type": "image"} parts."""
    if messages is None:
        return ""
    if isinstance(messages, str):
        return messages
    if isinstance(messages, dict):
        messages = [messages]
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [
                part["text"]
                for part in content
                if isinstance(part, dict)
                and part.get("type", "text") == "text"
                and isinstance(part.get("text"), str)
            ]
    return "\n".join(texts)


def normalise_row(row: dict) -> dict:
    """A training row, in the seed's format (images, prompt, completion) or already in
    fleetscribe's (images, timestamps, report, source), as fleetscribe's canonical row.
    Raises RowError."""
    images = row.get("images")
    if not images:
        raise RowError("no images")
    if not isinstance(images, list | tuple):
        raise RowError(f"images: a list of frames expected, not {type(images).__name__}")
    if len(images) > grammar.MAX_FRAMES:
        raise RowError(f"{len(images)} frames, more than {grammar.MAX_FRAMES}")
    if row.get("report") is not None:
        text = row["report"] if isinstance(row["report"], str) else json.dumps(row["report"])
        parsed = s.parse_report(text, frames=len(images))
        if not parsed.valid:
            raise RowError(f"report: {parsed.error}")
        try:  # what training will write for it (training/collate.py)
            grammar.answer_text(parsed.report, len(images))
        except ValueError as e:
            raise RowError(f"report: {e}") from None
        report = text
    else:
        answer = message_text(row.get("completion"))
        if not answer.strip():
            raise RowError("no completion")
        report = normalise_answer(answer)
        for i, hazard in enumerate(report["hazards"]):
            if hazard["frame"] >= len(images):
                raise RowError(
                    f"hazards.{i}.frame: {hazard['frame']} but the row has {len(images)} frames"
                )
        report = json.dumps(report)
    timestamps = row.get("timestamps")
    if timestamps is None:
        timestamps = [float(i) for i in range(len(images))]
    elif len(timestamps) != len(images):
        raise RowError(f"{len(timestamps)} timestamps for {len(images)} frames")
    else:
        timestamps = [float(t) for t in timestamps]
    return {
        "images": list(images),
        "timestamps": timestamps,
        "report": report,
        "source": row.get("source") or "",
    }
