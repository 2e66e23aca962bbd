"""Reading evaluation rows: every format, bad rows with their reasons, and frames from rosbag2 recordings."""

import base64
import csv
import json
from pathlib import Path

import numpy as np
import pytest

import eval_data
from eval_data import ROWS
from spatialthinker_ros.evaluation.data import BadRowError, detect_format, read_dataset
from spatialthinker_ros.evaluation.recordings import RecordingCache, RecordingFrame

FORMATS = {"vlmevalkit-tsv": "vlmevalkit", "vlmevalkit-parquet": "vlmevalkit", "cvbench-jsonl": "cvbench",
           "cvbench-parquet": "cvbench", "stvqa": "stvqa", "jsonl": "jsonl"}


@pytest.mark.parametrize("builder", sorted(FORMATS))
def test_every_format_reads_questions_keys_categories_and_images(builder, tmp_path: Path):
    path, questions = eval_data.FORMAT_BUILDERS[builder](tmp_path)
    assert detect_format(path) == FORMATS[builder]
    dataset = read_dataset([path])
    assert dataset.bad == []
    names = eval_data.category_names(builder)
    assert [item.question for item in dataset.items] == questions          # exactly as the data writes it
    assert [item.answer for item in dataset.items] == [row.key for row in ROWS]
    assert [item.category for item in dataset.items] == [names[row.category] for row in ROWS]
    assert [item.offered for item in dataset.items] == [row.options for row in ROWS]
    for i, item in enumerate(dataset.items):
        frame = item.load()
        assert frame.rgb.dtype == np.uint8 and frame.rgb.shape[2] == 3
        # VLMEvalKit's row 3 reuses row 1's image by index
        width = 128 + 8 * (1 if builder == "vlmevalkit-tsv" and i == 3 else i)
        assert frame.rgb.shape[1] == (640 if i % 2 == 0 else width)


def test_inline_options_are_not_also_listed(tmp_path: Path):
    path, _ = eval_data.stvqa_parquet(tmp_path)
    items = read_dataset([path]).items
    assert items[1].options == () and items[1].question.endswith("Options: (A) left of (B) right of (C) behind "
                                                                 "(D) in front of")
    assert items[0].options == tuple(RELATION := ROWS[0].options) and "Options" not in items[0].question
    assert RELATION == eval_data.RELATION


def test_categories_limit_and_several_files(tmp_path: Path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, _ = eval_data.project_jsonl(tmp_path / "a")
    second, _ = eval_data.vlmevalkit_tsv(tmp_path / "b")
    dataset = read_dataset([first, second], categories=["depth"], limit=7)
    assert [item.index for item in dataset.items] == ["mine:r4", "mine:r5", "mine:r6", "mine:r7", "mine:r8",
                                                      "bench:104", "bench:105"]
    assert dataset.format == "jsonl+vlmevalkit"


def test_bad_rows_are_reported_with_index_and_reason(tmp_path: Path):
    good = base64.b64encode(eval_data.image_png(0)).decode()
    rows = [
        {"index": 1, "question": "q1", "A": "left", "B": "right", "answer": "A", "category": "c", "image": ""},
        {"index": 2, "question": "q2", "A": "", "B": "", "answer": "A", "category": "c", "image": good},
        {"index": 3, "question": "q3", "A": "left", "B": "right", "answer": "E", "category": "c", "image": good},
        {"index": 4, "question": "", "A": "left", "B": "right", "answer": "A", "category": "c", "image": good},
        {"index": 5, "question": "q5", "A": "left", "B": "right", "answer": "B", "category": "c",
         "image": base64.b64encode(b"not an image at all, just some bytes " * 4).decode()},
        {"index": 6, "question": "q6", "A": "left", "B": "right", "answer": "right", "category": "c", "image": good},
    ]
    path = tmp_path / "bad.tsv"
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    dataset = read_dataset([path])
    assert {(b.index, b.reason) for b in dataset.bad} == {
        ("1", "no image (neither embedded nor a path)"),
        ("2", "no options (neither a list nor (A) ... (B) ... in the question)"),
        ("3", "answer 'E' is not one of its 2 options"),
        ("4", "no question"),
    }
    assert [i.index for i in dataset.items] == ["5", "6"] and dataset.items[1].answer == "B"
    with pytest.raises(BadRowError, match=r"cannot be decoded"):
        dataset.items[0].load()


def test_unreadable_files_are_errors_not_rows(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        read_dataset([tmp_path / "missing.tsv"])
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="cannot read as parquet"):
        read_dataset([tmp_path / "x.parquet"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown file type .csv"):
        read_dataset([tmp_path / "x.csv"])


@pytest.mark.parametrize("storage,compressed", [("sqlite3", False), ("mcap", True), ("mcap", False),
                                                ("sqlite3", True)])
def test_recordings_give_the_nearest_frame_paired_depth_and_intrinsics(storage, compressed, tmp_path: Path):
    bag = eval_data.write_recording(tmp_path / "bag", storage, compressed)
    cache = RecordingCache()
    try:
        # the bag folder, and the bare storage file inside it
        storage_file = next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))
        for where in (bag, storage_file):
            frame = cache.frame(RecordingFrame(where, eval_data.COLOUR, 1.02, eval_data.DEPTH_TOPIC, eval_data.INFO))
            assert frame.rgb.shape == (480, 640, 3)
            assert frame.intrinsics.fx == 525.0 and frame.intrinsics.width == 640
            # the depth stamped 10 ms after the colour frame, not the decoy 200 ms later (100 mm everywhere)
            assert frame.depth.raw.shape == (480, 640) and np.array_equal(frame.depth.raw, eval_data.SAMPLE_DEPTH)
        early = cache.frame(RecordingFrame(bag, eval_data.COLOUR, 0.4))
        assert early.rgb.shape[:2][::-1] == eval_data.frame_size(1) and early.depth is None
        with pytest.raises(BadRowError, match="has no topic /nope"):
            cache.frame(RecordingFrame(bag, "/nope", 0.0))
        with pytest.raises(BadRowError, match="past the end"):
            cache.frame(RecordingFrame(bag, eval_data.COLOUR, 30.0))
        with pytest.raises(BadRowError, match="holds sensor_msgs/msg/CameraInfo"):
            cache.frame(RecordingFrame(bag, eval_data.INFO, 0.0))
        with pytest.raises(BadRowError, match="does not exist"):
            cache.frame(RecordingFrame(tmp_path / "missing", eval_data.COLOUR, 0.0))
    finally:
        cache.close()


def test_recording_rows_read_from_jsonl(tmp_path: Path):
    bag = eval_data.write_recording(tmp_path / "bag", "mcap", False)
    path = eval_data.recording_jsonl(tmp_path, bag)
    with path.open("a") as out:
        out.write(json.dumps({"index": "notopic", "question": "q", "options": ["a", "b"], "answer": "A",
                              "bag": "bag"}) + "\n")
        out.write(json.dumps({"index": "late", "question": "q", "options": ["a", "b"], "answer": "A",
                              "bag": "bag", "topic": eval_data.COLOUR, "time": -1}) + "\n")
    dataset = read_dataset([path])
    assert [(b.index, b.reason) for b in dataset.bad] == [
        ("notopic", 'a row with "bag" needs "topic" (the colour image topic)'),
        ("late", '"time" must be seconds from the start of the recording (>= 0), not -1'),
    ]
    scene, early = dataset.items
    assert scene.load().depth is not None and early.load().rgb.shape[1] == eval_data.frame_size(1)[0]
