"""Training sets through `datasets`: each source format, rows skipped with their reasons,
a deterministic split, one-line errors, and the synthetic seed-format set."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from config.errors import ExpectedError
from models.schema import parse_report
from training.data import (
    FEATURES,
    DataError,
    Skipped,
    generate_seed_dataset,
    load_rows,
    prepare_dataset,
)

ANSWER = """**Scene Description:**
A white van ahead in the right lane; a cyclist on the shoulder.

**Driving Parameters (JSON):**
```json
{"road_type": "city", "lane_count": "2 lanes", "ego_lane_position": "Right Lane",
 "traffic_light_state": "n/a", "pedestrian_on_road": "no", "closest_vehicle_distance": "close",
 "ego_vehicle_speed": "20 km/h", "road_curvature": "straight", "weather": "overcast",
 "visibility": "good", "traffic_density": "low", "risk_factor": "moderate"}
```

**Risk Assessment:**
The van may brake; keep the gap and watch the cyclist."""


def _png(path: Path, colour: tuple[int, int, int], size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _seed_row(images: list, answer: str = ANSWER) -> dict:
    return {
        "images": images,
        "prompt": [{"role": "user", "content": "Describe the frames."}],
        "completion": [{"role": "assistant", "content": answer}],
    }


def _report(row: dict) -> dict:
    return json.loads(row["report"])


def test_from_list_builds_image_rows_with_this_datasets_version():
    # KNOWN TRAP: datasets 5.0.1 to 5.2.0 fail right here, at Dataset.from_list, with
    # "PicklingError: Can't pickle <class 'MonthDayNano'>" while fingerprinting the table
    # (their pickler for pa.Table; seen with pyarrow 24 and 25, not with 26.0.1). 5.0.0 and
    # 4.8 work; pyproject.toml excludes the bad ones. An upgrade into that range fails here.
    frames = [Image.new("RGB", (8, 6), (i * 40, 0, 0)) for i in range(3)]
    rows = [
        {"images": frames, "timestamps": [0.0, 0.5, 1.0], "report": "{}", "source": "a"},
        {"images": frames[:1], "timestamps": [2.0], "report": "{}", "source": "b"},
    ]
    dataset = datasets.Dataset.from_list(rows, features=FEATURES)
    assert len(dataset) == 2 and dataset.features == FEATURES
    back = dataset[0]["images"]
    assert [np.asarray(im)[0, 0, 0] for im in back] == [0, 40, 80]
    assert dataset[1]["timestamps"] == [2.0]


def test_a_save_to_disk_folder_and_a_dataset_dict_are_loaded(tmp_path):
    folder = generate_seed_dataset(tmp_path / "seed", 6, seed=1)
    rows = load_rows(folder)
    assert len(rows) == 6 and {"images", "prompt", "completion"} <= set(rows.column_names)
    assert isinstance(rows[0]["images"][0], Image.Image)

    whole = datasets.load_from_disk(str(folder))
    split = datasets.DatasetDict(
        {"train": whole.select(range(4)), "heldout": whole.select(range(4, 6))}
    )
    split.save_to_disk(str(tmp_path / "dict"))
    joined = load_rows(tmp_path / "dict")
    assert joined["completion"] == whole["completion"]

    files = sorted(p.name for p in folder.iterdir())
    assert len(prepare_dataset(folder).train) == 5
    assert sorted(p.name for p in folder.iterdir()) == files  # no cache file beside the source


def test_jsonl_rows_with_image_paths_relative_to_the_file(tmp_path):
    red = _png(tmp_path / "frames" / "red.png", (255, 0, 0))
    _png(tmp_path / "frames" / "blue.png", (0, 0, 255))
    rows = [
        _seed_row(["frames/red.png", "frames/blue.png"]),
        _seed_row([str(red)]),  # absolute paths stay as they are
        _seed_row(["frames/red.png", "frames/gone.png"]),
        _seed_row([]),
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    prepared = prepare_dataset(path, heldout_fraction=0)
    assert prepared.skipped == [
        Skipped(2, f"image 1: no such file: {tmp_path / 'frames' / 'gone.png'}"),
        Skipped(3, "no images"),
    ]
    assert len(prepared.train) == 2 and len(prepared.heldout) == 0
    first = prepared.train[0]
    colours = [im.convert("RGB").getpixel((0, 0)) for im in first["images"]]
    assert colours == [(255, 0, 0), (0, 0, 255)]
    assert first["timestamps"] == [0.0, 1.0]
    assert _report(first)["driving_parameters"] == {
        "road_type": "urban",
        "lane_count": 2,
        "ego_lane_position": "right",
        "traffic_light_state": "none",
        "pedestrian_on_road": False,
        "closest_vehicle_distance": "near",
        "ego_vehicle_speed": "slow",
        "road_curvature": "straight",
        "weather": "cloudy",
        "visibility": "good",
        "time_of_day": "unknown",
        "traffic_density": "light",
        "risk_factor": "medium",
    }


def test_a_json_list_of_rows_is_loaded_like_jsonl(tmp_path):
    _png(tmp_path / "a.png", (0, 255, 0))
    path = tmp_path / "set.json"
    path.write_text(json.dumps([_seed_row(["a.png"]), _seed_row(["a.png", "a.png"])]))
    prepared = prepare_dataset(path)
    assert (len(prepared.train), len(prepared.heldout), prepared.skipped) == (1, 1, [])


def test_parquet_with_embedded_frames_and_with_relative_paths(tmp_path):
    folder = generate_seed_dataset(tmp_path / "seed", 8, seed=2)
    datasets.load_from_disk(str(folder)).to_parquet(str(tmp_path / "embedded.parquet"))
    from_dir = prepare_dataset(folder, seed=5)
    from_parquet = prepare_dataset(tmp_path / "embedded.parquet", seed=5)
    assert from_parquet.split == from_dir.split
    assert from_parquet.train["report"] == from_dir.train["report"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    _png(tmp_path / "pq" / "frames" / "f.png", (9, 9, 9))
    # Written by plain pyarrow: frames as paths, the completion as the answer's text.
    table = pa.Table.from_pylist([{"images": ["frames/f.png"], "completion": ANSWER}])
    pq.write_table(table, tmp_path / "pq" / "paths.parquet")
    prepared = prepare_dataset(tmp_path / "pq" / "paths.parquet")
    assert prepared.skipped == []
    assert prepared.train[0]["images"][0].getpixel((0, 0)) == (9, 9, 9)


def test_a_canonical_set_passes_through_with_its_frames_bytes_unchanged(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (1, 2, 3)).save(buf, format="JPEG", quality=70)
    jpeg = buf.getvalue()
    report = json.dumps(
        {
            "schema_version": 1,
            "scene_description": "An empty road.",
            "driving_parameters": {
                "road_type": "rural",
                "lane_count": 1,
                "ego_lane_position": "single",
                "traffic_light_state": "none",
                "pedestrian_on_road": False,
                "closest_vehicle_distance": "none",
                "ego_vehicle_speed": "fast",
                "road_curvature": "gentle",
                "weather": "fog",
                "visibility": "poor",
                "time_of_day": "night",
                "traffic_density": "none",
                "risk_factor": "high",
            },
            "hazards": [{"kind": "weather", "description": "thick fog", "frame": 1}],
            "risk_assessment": "Fog hides the bend; slow down.",
        }
    )
    rows = [
        {"images": [{"bytes": jpeg, "path": None}] * 2, "timestamps": [3.5, 7.25]}
        | {"report": report, "source": "video 7"},
        {"images": [{"bytes": jpeg, "path": None}], "timestamps": [1.0]}
        | {"report": report, "source": "video 8"},  # hazard frame 1 of 1 frame
    ]
    datasets.Dataset.from_list(rows, features=FEATURES).save_to_disk(str(tmp_path / "c"))
    prepared = prepare_dataset(tmp_path / "c")
    assert prepared.skipped == [
        Skipped(1, "report: schema v1: hazards.0.frame: 1 but only 1 frames were sampled")
    ]
    row = prepared.train.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))[0]
    assert [im["bytes"] for im in row["images"]] == [jpeg, jpeg]  # not re-encoded
    assert (row["timestamps"], row["report"], row["source"]) == ([3.5, 7.25], report, "video 7")


def test_the_split_is_deterministic_by_seed_and_recorded(tmp_path):
    folder = generate_seed_dataset(tmp_path / "seed", 30, seed=4, bad_rows=2)
    a = prepare_dataset(folder, heldout_fraction=0.2, seed=11)
    b = prepare_dataset(folder, heldout_fraction=0.2, seed=11)
    c = prepare_dataset(folder, heldout_fraction=0.2, seed=12)
    assert a.split == b.split and a.train["report"] == b.train["report"]
    assert a.split["heldout_rows"] != c.split["heldout_rows"]
    skipped = [s.row for s in a.skipped]
    assert a.split == json.loads(json.dumps(a.split))
    assert a.split == {
        "rows": 30,
        "train": 22,
        "heldout": 6,  # round(28 * 0.2)
        "skipped": 2,
        "seed": 11,
        "heldout_fraction": 0.2,
        "heldout_rows": a.split["heldout_rows"],
    }
    held = a.split["heldout_rows"]
    assert len(held) == 6 and not set(held) & set(skipped)
    # The recorded row indices are the rows that were held out, in source order.
    source = prepare_dataset(folder, heldout_fraction=0, seed=11)
    usable = [i for i in range(30) if i not in skipped]
    by_row = dict(zip(usable, source.train["report"], strict=True))
    assert a.heldout["report"] == [by_row[i] for i in held]
    assert a.train["report"] == [by_row[i] for i in usable if i not in held]
    assert a.train.features == FEATURES and a.heldout.features == FEATURES


@pytest.mark.parametrize(("usable", "held"), [(1, 0), (2, 1), (3, 1), (40, 4)])
def test_at_least_one_row_is_held_out_when_two_are_usable(tmp_path, usable, held):
    folder = generate_seed_dataset(tmp_path / "seed", usable, frames=1, seed=0)
    prepared = prepare_dataset(folder)
    assert (len(prepared.train), len(prepared.heldout)) == (usable - held, held)


def test_the_generated_seed_set_round_trips_with_exactly_its_bad_rows_skipped(tmp_path):
    folder = generate_seed_dataset(tmp_path / "seed", 40, frames=3, seed=9, bad_rows=6)
    expected = [json.loads(e) for e in datasets.load_from_disk(str(folder))["expected"]]
    prepared = prepare_dataset(folder, heldout_fraction=0)
    assert prepared.skipped == [
        Skipped(i, e["error"]) for i, e in enumerate(expected) if "error" in e
    ]
    assert len(prepared.skipped) == 6
    assert {s.reason.split(":")[0] for s in prepared.skipped} == {
        "no driving-parameters JSON block",
        "driving_parameters.weather",
        "no images",
    }
    good = [e["driving_parameters"] for e in expected if "error" not in e]
    reports = [_report(row) for row in prepared.train]
    assert [r["driving_parameters"] for r in reports] == good
    assert all(parse_report(row["report"], frames=3).valid for row in prepared.train)
    assert all(len(row["images"]) == 3 for row in prepared.train)


def test_the_generated_seed_set_is_deterministic_by_seed_and_varied(tmp_path):
    def rows(name, seed):
        folder = generate_seed_dataset(tmp_path / name, 12, seed=seed, bad_rows=3)
        plain = datasets.load_from_disk(str(folder)).cast_column(
            "images", datasets.Sequence(datasets.Image(decode=False))
        )
        return [(r["completion"], [im["bytes"] for im in r["images"]]) for r in plain]

    first, again, other = rows("a", 3), rows("b", 3), rows("c", 4)
    assert first == again and first != other
    answers = [c[0]["content"][0]["text"] for c, _ in first]
    assert any("```json" in a for a in answers) and any("```" not in a for a in answers)
    assert len({a.split("\n")[0] for a in answers}) > 1  # heading styles vary
    frames = [Image.open(io.BytesIO(b)) for b in first[0][1]]
    assert frames[0].size == (64, 48)
    assert np.asarray(frames[0]).std() > 10  # a visible pattern, not a flat frame
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[1]))  # it moves


def test_data_errors_are_one_line_expected_errors(tmp_path):
    assert issubclass(DataError, ExpectedError)
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jsonl").write_text('{"images": []}\n{"images": \n')
    (tmp_path / "object.json").write_text('{"rows": []}')
    (tmp_path / "nothing.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"images": [], "completion": "x"})
        + "\n"
        + json.dumps({"images": ["a.png"], "completion": "y"})
        + "\n"
    )
    (tmp_path / "mixed.jsonl").write_text(
        json.dumps({"images": ["a.png"], "completion": "text"})
        + "\n"
        + json.dumps({"images": ["a.png"], "completion": [{"role": "assistant"}]})
        + "\n"
    )
    cases = {
        tmp_path / "missing": f"no such dataset: {tmp_path / 'missing'}",
        tmp_path / "notes.csv": f"{tmp_path / 'notes.csv'}: unknown dataset format "
        "(a save_to_disk folder, .jsonl, .json or .parquet)",
        tmp_path / "empty": f"{tmp_path / 'empty'}: not a folder written by save_to_disk",
        tmp_path / "broken.jsonl": f"{tmp_path / 'broken.jsonl'}: line 2: not JSON: "
        "Expecting value at column 12",
        tmp_path / "object.json": f"{tmp_path / 'object.json'}: a list of JSON objects (rows) "
        "expected",
        tmp_path
        / "nothing.jsonl": f"no usable rows in {tmp_path / 'nothing.jsonl'}: it has no rows",
        tmp_path / "bad.jsonl": f"no usable rows in {tmp_path / 'bad.jsonl'}: 2 skipped; first: "
        "row 0: no images",
    }
    for path, message in cases.items():
        with pytest.raises(DataError) as e:
            prepare_dataset(path)
        assert str(e.value) == message
    with pytest.raises(DataError, match=r"mixed\.jsonl: rows of different shapes: ") as e:
        load_rows(tmp_path / "mixed.jsonl")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError) as e:
        prepare_dataset(tmp_path / "bad.jsonl", heldout_fraction=1)
    assert str(e.value) == "heldout_fraction must be at least 0 and below 1, not 1"
