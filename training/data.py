"""Training sets: loaded through `datasets`, normalised row by row into fleetscribe's
canonical rows (`training.seed_format`), split deterministically into train and held-out.

Sources: a folder written by `Dataset.save_to_disk` (a DatasetDict's splits are joined),
a `.jsonl` or `.json` file of rows (image entries are paths, relative to the file), or a
`.parquet` file. Every row either becomes a canonical row or is listed in `skipped` with
its one-line reason; none is dropped silently.

KNOWN TRAP: datasets 5.0.1 to 5.2.0 fail at `Dataset.from_list` (a PicklingError on
pyarrow's MonthDayNano type while fingerprinting the table; seen with pyarrow 24 and 25,
not 26.0.1); pyproject.toml excludes them and tests/test_training_data.py builds image
rows through `from_list`, so a bad upgrade fails there first.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from config.errors import ExpectedError
from models import schema as s
from training import seed_format
from training.seed_format import RowError


class DataError(ExpectedError):
    """A training set that cannot be used at all (missing, unreadable, no usable row)."""


FEATURES = datasets.Features(
    {
        "images": datasets.Sequence(datasets.Image()),
        "timestamps": datasets.Sequence(datasets.Value("float64")),
        "report": datasets.Value("string"),
        "source": datasets.Value("string"),
    }
)


@dataclass
class Skipped:
    """A row of the source that was not used, and why."""

    row: int
    reason: str


@dataclass
class Prepared:
    """A training set ready for the trainer: canonical rows, split, and what was left out."""

    train: datasets.Dataset
    heldout: datasets.Dataset
    skipped: list[Skipped] = field(default_factory=list)
    split: dict = field(default_factory=dict)


def _line(error: BaseException) -> str:
    return " ".join(str(error).split())


def load_rows(path: str | Path) -> datasets.Dataset:
    """The rows of a training set, as stored (seed or canonical format). Raises DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such dataset: {path}")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path}: not a folder written by save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            return datasets.concatenate_datasets(list(loaded.values()))
        return loaded
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _from_json(path)
    if suffix == ".parquet":
        return _from_parquet(path)
    raise DataError(
        f"{path}: unknown dataset format (a save_to_disk folder, .jsonl, .json or .parquet)"
    )


def _from_parquet(path: Path) -> datasets.Dataset:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, memory_map=True)
    except Exception as e:  # pyarrow's errors for a damaged file vary
        raise DataError(f"{path}: not a readable parquet file: {_line(e)}") from None
    rows = datasets.Dataset(table)  # features from the file's metadata, when it has them
    if "images" in rows.column_names and _is_path_list(rows.features["images"]):
        paths = [[_resolve(path.parent, p) for p in v or []] for v in table["images"].to_pylist()]
        column = table.schema.get_field_index("images")
        table = table.set_column(column, "images", pa.array(paths, pa.list_(pa.string())))
        rows = datasets.Dataset(table).cast_column("images", datasets.Sequence(datasets.Image()))
    return rows


def _from_json(path: Path) -> datasets.Dataset:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not readable: {_line(e)}") from None
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON: {e}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: line {number}: not JSON: {e.msg} at column {e.colno}"
                ) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: a list of JSON objects (rows) expected")
    for row in rows:
        if isinstance(row.get("images"), list):
            row["images"] = [_resolve(path.parent, x) for x in row["images"]]
    try:
        dataset = datasets.Dataset.from_list(rows)
        if "images" in dataset.column_names and _is_path_list(dataset.features["images"]):
            dataset = dataset.cast_column("images", datasets.Sequence(datasets.Image()))
    except (ValueError, TypeError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: rows of different shapes: {_line(e)}") from None
    return dataset


def _resolve(folder: Path, entry: Any) -> Any:
    """An image path relative to the dataset file, made absolute."""
    if isinstance(entry, str):
        return str(folder / entry) if not Path(entry).is_absolute() else entry
    if isinstance(entry, dict) and isinstance(entry.get("path"), str) and not entry.get("bytes"):
        return {**entry, "path": _resolve(folder, entry["path"])}
    return entry


def _is_path_list(feature) -> bool:
    inner = getattr(feature, "feature", None)
    return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")


def _as_stored(rows: datasets.Dataset):
    """Each row as plain Python with its frames as stored ({"bytes", "path"}): nothing
    decoded or re-encoded, and no cache file written beside the source."""
    for batch in rows.with_format("arrow").iter(batch_size=64):
        yield from batch.to_pylist()


def _check_images(images: list) -> None:
    """Each frame readable as an image (its header: cheap), as a RowError otherwise."""
    import PIL.Image

    for i, image in enumerate(images):
        if isinstance(image, PIL.Image.Image):
            continue
        entry = image if isinstance(image, dict) else {"path": image, "bytes": None}
        if not entry.get("bytes") and not entry.get("path"):
            raise RowError(f"image {i}: empty")
        try:
            source = io.BytesIO(entry["bytes"]) if entry.get("bytes") else entry["path"]
            with PIL.Image.open(source) as opened:
                opened.size  # noqa: B018 - reads the header
        except FileNotFoundError:
            raise RowError(f"image {i}: no such file: {entry.get('path')}") from None
        except (OSError, ValueError, TypeError) as e:
            raise RowError(f"image {i}: not an image: {_line(e)}") from None


def prepare_dataset(path: str | Path, *, heldout_fraction: float = 0.1, seed: int = 0) -> Prepared:
    """Load `path`, normalise every row, split by `seed`: at least one held-out row when
    two or more rows are usable (none with `heldout_fraction=0`). Raises DataError."""
    if not 0 <= heldout_fraction < 1:
        raise DataError(f"heldout_fraction must be at least 0 and below 1, not {heldout_fraction}")
    rows = load_rows(path)
    usable: list[tuple[int, dict]] = []
    skipped: list[Skipped] = []
    for i, row in enumerate(_as_stored(rows)):
        try:
            canonical = seed_format.normalise_row(row)
            _check_images(canonical["images"])
        except RowError as e:
            skipped.append(Skipped(i, str(e)))
        else:
            usable.append((i, canonical))
    if not skipped and not usable:
        raise DataError(f"no usable rows in {path}: it has no rows")
    if not usable:
        first = skipped[0]
        raise DataError(
            f"no usable rows in {path}: {len(skipped)} skipped; first: row {first.row}: "
            f"{first.reason}"
        )

    n = len(usable)
    held = 0 if n < 2 or heldout_fraction == 0 else min(n - 1, max(1, round(n * heldout_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_positions = set(order[:held])
    train = [row for k, (_, row) in enumerate(usable) if k not in held_positions]
    heldout = [row for k, (_, row) in enumerate(usable) if k in held_positions]
    return Prepared(
        train=_canonical(train),
        heldout=_canonical(heldout),
        skipped=skipped,
        split={
            "rows": len(rows),
            "train": len(train),
            "heldout": len(heldout),
            "skipped": len(skipped),
            "seed": seed,
            "heldout_fraction": heldout_fraction,
            "heldout_rows": [usable[k][0] for k in sorted(held_positions)],
        },
    )


def _canonical(rows: list[dict]) -> datasets.Dataset:
    if not rows:  # from_list cannot type an empty list, even with features
        return datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    return datasets.Dataset.from_list(rows, features=FEATURES)


# -- a synthetic seed-format training set (tests, the demo) -----------------------------

# Each schema value with spellings the seed's labels use for it.
_LOOSE: dict[str, dict[Any, list]] = {
    "road_type": {
        "urban": ["urban", "Urban", "city", "Urban Street"],
        "highway": ["highway", "freeway", "Motorway"],
        "residential": ["residential", "Suburban"],
        "rural": ["rural", "country road"],
        "intersection": ["intersection", "junction"],
    },
    "ego_lane_position": {
        "left": ["left", "Left Lane", "leftmost"],
        "middle": ["middle", "center", "Middle lane"],
        "right": ["right", "Right Lane", "rightmost"],
    },
    "traffic_light_state": {
        "red": ["red", "Red", "Red light ahead"],
        "green": ["green", "Green"],
        "yellow": ["yellow", "amber"],
        "none": ["none", "off", "not applicable", "n/a"],
    },
    "pedestrian_on_road": {True: [True, "yes", "Yes", 1], False: [False, "no", "none", 0]},
    "closest_vehicle_distance": {
        "near": ["close", "near", "approximately 5 meters"],
        "medium": ["50 feet", "medium", "Moderate"],
        "far": ["far", "approximately 50 meters", "300 feet"],
        "none": ["none", "no vehicle", "n/a"],
    },
    "ego_vehicle_speed": {
        "stopped": ["0 mph", "stationary", "stopped"],
        "slow": ["slow", "15 mph", "20 km/h"],
        "moderate": ["moderate", "30 mph", "medium"],
        "fast": ["fast", "60 mph", "approximately 100 km/h"],
    },
    "road_curvature": {
        "straight": ["straight", "Straight", "straight ahead"],
        "gentle": ["gentle", "Slight curve to the right", "slight"],
        "sharp": ["sharp", "sharp curve"],
    },
    "weather": {
        "clear": ["clear", "sunny", "Clear skies"],
        "cloudy": ["cloudy", "overcast", "partly cloudy"],
        "rain": ["rain", "rainy", "Rainy"],
        "snow": ["snow", "snowy"],
        "fog": ["fog", "foggy"],
    },
    "visibility": {
        "good": ["good", "Good", "clear"],
        "moderate": ["moderate", "slightly reduced"],
        "poor": ["poor", "low"],
    },
    "traffic_density": {
        "none": ["none", "no traffic"],
        "light": ["light", "low", "Low"],
        "moderate": ["moderate", "Moderate"],
        "heavy": ["heavy", "high", "dense"],
    },
    "risk_factor": {
        "low": ["low", "Low"],
        "medium": ["medium", "moderate", "Medium"],
        "high": ["high", "High"],
        "critical": ["critical", "severe"],
    },
}
_HEADINGS = [
    ("**Scene Description:**", "**Driving Parameters (JSON):**", "**Risk Assessment:**"),
    ("Scene Description:", "Driving Parameters:", "Risk Assessment:"),
    ("1. Scene description", "2. Driving parameters (JSON)", "3. Risk assessment"),
    ("## Scene Description", "## Driving Parameters", "## Risk Assessment"),
    ("**Scene Description**:", "**Driving Parameters**:", "**Risk Assessment**:"),
]
_PROMPT = (
    "You are an ADAS driving assistant. Analyze the scene from a driving and safety "
    "perspective, and produce Scene Description, Driving Parameters and Risk Assessment."
)
_VEHICLES = ["white van", "black sedan", "yellow taxi", "red pickup", "bus", "grey SUV"]


def _frames(rng, count: int, size: tuple[int, int], car: tuple[int, int, int]) -> list:
    """Road-like frames: sky, road, dashed lane marks moving frame by frame, a car growing."""
    import numpy as np
    import PIL.Image

    width, height = size
    horizon = height // 3
    sky = rng.integers(90, 200, 3)
    frames = []
    for f in range(count):
        a = np.zeros((height, width, 3), dtype=np.uint8)
        a[:horizon] = sky
        a[horizon:] = (70, 70, 72)
        for y in range(horizon, height, 6):  # dashes, shifted by two rows per frame
            if ((y + 2 * f) // 6) % 2 == 0:
                a[y : y + 3, width // 2 - 1 : width // 2 + 1] = (240, 240, 240)
        w = max(4, width // 8 + 2 * f)
        x = width // 2 + (f * 3) % max(1, width // 4) - w // 2
        y = horizon + 4 + f
        a[y : y + w // 2, max(0, x) : x + w] = car
        frames.append(PIL.Image.fromarray(a))
    return frames


def _answer(rng, params: dict, loose: dict, *, fenced: bool, headings: tuple) -> str:
    vehicle = rng.choice(_VEHICLES)
    road, lanes = params["road_type"], params["lane_count"]
    scene = (
        f"{'An' if road[0] in 'aeiou' else 'A'} {road} road with {lanes} "
        f"lane{'s' if lanes > 1 else ''}; the ego vehicle is "
        f"in the {params['ego_lane_position']} lane. A {vehicle} is ahead "
        f"({params['closest_vehicle_distance']} distance) and the traffic light is "
        f"{params['traffic_light_state']}. "
        + ("A pedestrian is crossing the road. " if params["pedestrian_on_road"] else "")
        + f"The weather is {params['weather']} with {params['visibility']} visibility."
    )
    risk = (
        f"- **Nearby Vehicles:** keep a safe gap to the {vehicle}.\n"
        f"- **Traffic Density:** {params['traffic_density']} traffic.\n"
        f"Overall, the risk factor is {params['risk_factor']}; the ego vehicle should stay "
        "alert and ready to brake."
    )
    block = json.dumps(loose, indent=2)
    if fenced:
        block = f"```json\n{block}\n```"
    return f"{headings[0]}\n{scene}\n\n{headings[1]}\n{block}\n\n{headings[2]}\n{risk}"


def generate_seed_dataset(
    folder: Path,
    rows: int,
    *,
    frames: int = 4,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
    bad_rows: int = 0,
) -> Path:
    """Write a small synthetic training set in the seed's format (save_to_disk) to
    `folder` and return it: loose labels, varied headings, fenced and bare JSON, and
    `bad_rows` rows broken in different ways (no JSON block, an unknown enum value, no
    images). Deterministic by `seed`. Each row's `expected` column holds what a correct
    normaliser reads (its driving parameters, or the reason it must be skipped)."""
    import numpy as np

    if not 0 <= bad_rows <= rows:
        raise ValueError(f"bad_rows must be between 0 and rows ({rows}), not {bad_rows}")
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    bad = dict(zip(sorted(rng.sample(range(rows), bad_rows)), range(bad_rows), strict=True))
    records = []
    for i in range(rows):
        params, loose = {}, {}
        for name in s.DrivingParameters.model_fields:
            if name == "lane_count":
                count = rng.randint(1, 4)
                params[name] = count
                loose[name] = rng.choice([count, str(count), f"{count} lanes"])
            elif name in _LOOSE:
                params[name] = rng.choice(list(_LOOSE[name]))
                loose[name] = rng.choice(_LOOSE[name][params[name]])
        params["time_of_day"] = "unknown"
        car = tuple(int(c) for c in pixels.integers(0, 256, 3))
        images = _frames(pixels, frames, size, car)
        answer = _answer(
            rng, params, loose, fenced=rng.random() < 0.7, headings=rng.choice(_HEADINGS)
        )
        expected: dict = {"driving_parameters": params}
        kind = bad[i] % 3 if i in bad else None
        if kind == 0:
            answer = answer.split("{")[0] + "Values as in the description above."
            expected = {"error": "no driving-parameters JSON block"}
        elif kind == 1:
            loose["weather"] = "purple"
            answer = _answer(rng, params, loose, fenced=True, headings=_HEADINGS[0])
            choices = "|".join(w.value for w in s.Weather)
            expected = {"error": f"driving_parameters.weather: 'purple' is not one of {choices}"}
        elif kind == 2:
            images = []
            expected = {"error": "no images"}
        content = [{"type": "image", "text": None}] * len(images)
        records.append(
            {
                "images": images,
                "prompt": [
                    {"role": "user", "content": [*content, {"type": "text", "text": _PROMPT}]}
                ],
                "completion": [
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}
                ],
                "expected": json.dumps(expected),
            }
        )
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = {"role": datasets.Value("string"), "content": [part]}
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "prompt": [message],
            "completion": [message],
            "expected": datasets.Value("string"),
        }
    )
    folder = Path(folder)
    datasets.Dataset.from_list(records, features=features).save_to_disk(str(folder))
    return folder
