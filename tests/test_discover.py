"""Turning command-line inputs (files, folders, globs, a manifest) into absolute paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.discover import VIDEO_SUFFIXES, discover, read_manifest
from producer.errors import NoInputs


@pytest.fixture
def tree(tmp_path) -> Path:
    """A small archive: videos at several depths, with sidecar files beside them."""
    for name in [
        "top.mp4",
        "notes.txt",
        "day1/a.mp4",
        "day1/a.json",
        "day1/b.MOV",
        "day1/b.srt",
        "day1/cam2/c.mkv",
        "day1/cam2/c.gpx",
        "day2/d.webm",
        "day2/deep/er/e.avi",
        "day2/thumb.jpg",
        "empty/readme.md",
    ]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not really a video")
    return tmp_path


def rel(paths: list[str], root: Path) -> list[str]:
    return [str(Path(p).relative_to(root)) for p in paths]


def test_explicit_files_are_taken_as_given_in_order(tree):
    found = discover([str(tree / "day2/d.webm"), str(tree / "top.mp4")])
    assert found == [str(tree / "day2/d.webm"), str(tree / "top.mp4")]


def test_an_explicit_file_is_taken_whatever_its_suffix(tree):
    # Named on purpose: it is probed and rejected with a reason later, never silently dropped.
    assert discover([str(tree / "notes.txt")]) == [str(tree / "notes.txt")]


def test_relative_paths_become_absolute(tree, monkeypatch):
    monkeypatch.chdir(tree / "day1")
    found = discover(["a.mp4", "../top.mp4", "cam2"])
    assert found == [str(tree / "day1/a.mp4"), str(tree / "top.mp4"), str(tree / "day1/cam2/c.mkv")]
    assert all(Path(p).is_absolute() for p in found)


def test_directory_is_walked_recursively_for_videos_only(tree):
    found = discover([str(tree)])
    assert rel(found, tree) == [
        "top.mp4",
        "day1/a.mp4",
        "day1/b.MOV",
        "day1/cam2/c.mkv",
        "day2/d.webm",
        "day2/deep/er/e.avi",
    ]
    suffixes = {Path(p).suffix.lower() for p in found}
    assert suffixes <= VIDEO_SUFFIXES
    assert not any(p.endswith((".json", ".srt", ".gpx", ".txt", ".jpg", ".md")) for p in found)


def test_directory_walk_is_sorted_and_stable(tree):
    assert discover([str(tree / "day1")]) == discover([str(tree / "day1") + "/"])
    assert rel(discover([str(tree / "day1")]), tree) == [
        "day1/a.mp4",
        "day1/b.MOV",
        "day1/cam2/c.mkv",
    ]


def test_glob_with_double_star_recurses(tree):
    found = discover([str(tree / "**" / "*.mp4")])
    assert rel(found, tree) == ["day1/a.mp4", "top.mp4"]


def test_glob_matching_folders_walks_them(tree):
    found = discover([str(tree / "day*")])
    assert rel(found, tree) == [
        "day1/a.mp4",
        "day1/b.MOV",
        "day1/cam2/c.mkv",
        "day2/d.webm",
        "day2/deep/er/e.avi",
    ]


def test_glob_takes_what_it_names_even_if_not_a_video_suffix(tree):
    found = discover([str(tree / "day1" / "*.json")])
    assert rel(found, tree) == ["day1/a.json"]


def test_glob_matching_nothing_adds_nothing(tree):
    found = discover([str(tree / "**" / "*.flv"), str(tree / "top.mp4")])
    assert found == [str(tree / "top.mp4")]


def test_file_whose_name_has_glob_characters_is_taken_literally(tree):
    odd = tree / "clip[1].mp4"
    odd.write_bytes(b"x")
    assert discover([str(odd)]) == [str(odd)]


def test_manifest_with_comments_blank_lines_and_relative_paths(tree, tmp_path_factory, monkeypatch):
    lists = tmp_path_factory.mktemp("lists")
    manifest = lists / "batch.txt"
    manifest.write_text(
        "# night drives\n"
        "\n"
        f"{tree / 'top.mp4'}\n"
        "   # indented comment\n"
        "  local/x.mp4  \n"
        f"{tree / 'day2'}\n"
        "\n",
        encoding="utf-8",
    )
    (lists / "local").mkdir()
    (lists / "local/x.mp4").write_bytes(b"x")
    monkeypatch.chdir(tree / "day1")  # relative entries are relative to the manifest, not cwd

    assert read_manifest(manifest) == [
        str(tree / "top.mp4"),
        str(lists / "local/x.mp4"),
        str(tree / "day2"),
    ]
    found = discover(["a.mp4"], manifest=str(manifest))
    assert found == [
        str(tree / "day1/a.mp4"),
        str(tree / "top.mp4"),
        str(lists / "local/x.mp4"),
        str(tree / "day2/d.webm"),
        str(tree / "day2/deep/er/e.avi"),
    ]


def test_manifest_alone_is_enough(tree):
    manifest = tree / "list.txt"
    manifest.write_text("top.mp4\nday1/a.mp4\n", encoding="utf-8")
    assert discover([], manifest=str(manifest)) == [str(tree / "top.mp4"), str(tree / "day1/a.mp4")]


def test_missing_explicit_path_is_kept_to_be_rejected_later(tree):
    missing = tree / "typo.mp4"
    found = discover([str(missing), str(tree / "top.mp4")])
    assert found == [str(missing), str(tree / "top.mp4")]
    assert not missing.exists()


def test_missing_path_in_a_manifest_is_kept(tree):
    manifest = tree / "list.txt"
    manifest.write_text("gone/away.mp4\n", encoding="utf-8")
    assert discover([], manifest=str(manifest)) == [str(tree / "gone/away.mp4")]


def test_the_same_file_is_listed_once(tree, monkeypatch):
    monkeypatch.chdir(tree)
    manifest = tree / "list.txt"
    manifest.write_text("top.mp4\nday1/a.mp4\n", encoding="utf-8")
    found = discover(
        [
            str(tree / "top.mp4"),
            "top.mp4",
            "./top.mp4",
            "day1/../top.mp4",
            str(tree / "day1"),  # contains a.mp4 ...
            str(tree / "day1/a.mp4"),  # ... named again
            str(tree / "**/*.mp4"),
        ],
        manifest=str(manifest),
    )
    assert rel(found, tree) == ["top.mp4", "day1/a.mp4", "day1/b.MOV", "day1/cam2/c.mkv"]
    assert len(found) == len(set(found))


def test_nothing_found_raises_no_inputs(tree):
    with pytest.raises(NoInputs, match="no video files found"):
        discover([])
    with pytest.raises(NoInputs):
        discover([str(tree / "empty")])  # a folder with no videos
    with pytest.raises(NoInputs):
        discover([str(tree / "nowhere" / "*.mp4")])  # a glob that matches nothing


def test_empty_manifest_raises_no_inputs(tree):
    manifest = tree / "list.txt"
    manifest.write_text("# nothing yet\n\n", encoding="utf-8")
    assert read_manifest(manifest) == []
    with pytest.raises(NoInputs):
        discover([], manifest=str(manifest))


def test_missing_manifest_is_a_readable_no_inputs(tmp_path):
    missing = tmp_path / "no-such-list.txt"
    with pytest.raises(NoInputs) as failed:
        read_manifest(missing)
    message = str(failed.value)
    assert message == f"cannot read manifest {missing}: No such file or directory"
    with pytest.raises(NoInputs, match="cannot read manifest"):
        discover([str(tmp_path)], manifest=str(missing))


def test_manifest_that_is_a_folder_is_a_readable_no_inputs(tmp_path):
    with pytest.raises(NoInputs) as failed:
        read_manifest(tmp_path)
    message = str(failed.value)
    assert message.startswith(f"cannot read manifest {tmp_path}: ")
    assert "\n" not in message


def test_manifest_entry_under_home_is_expanded(tree, tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    (home / "clips").mkdir()
    (home / "clips/h.mp4").write_bytes(b"x")
    monkeypatch.setenv("HOME", str(home))
    manifest = tree / "list.txt"
    manifest.write_text("~/clips/h.mp4\n", encoding="utf-8")
    assert discover([], manifest=str(manifest)) == [str(home / "clips/h.mp4")]
