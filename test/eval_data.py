"""Small evaluation datasets in every format spatialthinker-eval reads, built offline, with a replay file whose
answers give exactly known accuracies: the bundled sample scene and generated images, and rosbag2
recordings (sqlite3 and mcap, raw or compressed colour, 16UC1 depth, CameraInfo) written with rosbags."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import spatialthinker_ros

DATA = Path(spatialthinker_ros.__file__).parent / "data"     # the installed package's copy
META = json.loads((DATA / "sample_scene.json").read_text())
SAMPLE_PNG = (DATA / META["image"]).read_bytes()
SAMPLE_DEPTH = cv2.imread(str(DATA / META["depth"]), cv2.IMREAD_UNCHANGED)
SAMPLE_QUESTION = META["questions"][0]          # its replay response has boxes of the mug, plate and book
RELATION = ["left of", "right of", "behind", "in front of"]
DEPTH = ["closer", "farther"]


@dataclass(frozen=True)
class Row:
    category: str            # "relation" or "depth" (CV-Bench: 2D/Relation, 3D/Depth)
    options: list[str]
    key: str                 # the correct letter
    reply: Optional[str]     # what the replayed model writes in <answer>; None: no <answer> at all
    correct: bool


# relation 3 of 4 right, depth 3 of 5 right: overall 6/9, macro (0.75 + 0.6) / 2
ROWS = [
    Row("relation", RELATION, "A", "(A) left of", True),
    Row("relation", RELATION, "B", "right of", True),              # text only: matched by the parser
    Row("relation", RELATION, "C", "(C) behind", True),
    Row("relation", RELATION, "D", "banana", False),               # names no option: unmatched, wrong
    Row("depth", DEPTH, "A", "(A) closer", True),
    Row("depth", DEPTH, "B", "(A)", False),
    Row("depth", DEPTH, "B", None, False),                         # no answer: unmatched, wrong
    Row("depth", DEPTH, "A", "A", True),
    Row("depth", DEPTH, "B", "(B) farther", True),
]
EXPECTED = {"total": 9, "correct": 6, "accuracy": 6 / 9, "unmatched": 2,
            "categories": {"relation": (4, 3), "depth": (5, 3)}, "macro": (0.75 + 0.6) / 2}
CVBENCH_NAMES = {"relation": "2D/Relation", "depth": "3D/Depth"}


def question(i: int, row: Row) -> str:
    noun = "mug" if row.category == "relation" else "book"
    return f"Q{i}: where is the {noun} in image {i}?"


def inline_question(i: int, row: Row, style: str = "card") -> str:
    labelled = " ".join(f"({chr(65 + k)}) {o}" for k, o in enumerate(row.options))
    return f"{question(i, row)} {labelled}" if style == "card" else f"{question(i, row)}\nOptions: {labelled}"


def response(reply: Optional[str]) -> str:
    scene = '{"objects": [{"id": "mug.1", "bbox": [10, 10, 60, 50]}], "relationships": []}'
    answer = f"\n<answer> {reply} </answer>" if reply is not None else ""
    return f"<observe> a table </observe>\n<scene> {scene} </scene>\n<think> looking </think>{answer}"


def probabilities(row: Row) -> list[float]:
    """Known option probabilities of a row: 0.6 on the correct option, the rest shared evenly."""
    rest = 0.4 / (len(row.options) - 1)
    return [0.6 if chr(65 + k) == row.key else rest for k in range(len(row.options))]


def write_replay(path: Path, questions: list[str]) -> Path:
    """Replay lines for the given questions (as the data writes them), ROWS[i]'s reply and probabilities for the
    i-th."""
    with path.open("w") as out:
        for text, row in zip(questions, ROWS):
            out.write(json.dumps({"question": text, "response": response(row.reply),
                                  "option_probabilities": probabilities(row)}) + "\n")
    return path


def image_png(i: int) -> bytes:
    """Row i's image: the sample scene for even rows, a generated pattern (varying size) for odd ones."""
    if i % 2 == 0:
        return SAMPLE_PNG
    height, width = 96 + 8 * i, 128 + 8 * i
    y, x = np.mgrid[0:height, 0:width]
    pattern = np.stack([(x * 7 + i * 30) % 256, (y * 5) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
    return cv2.imencode(".png", pattern)[1].tobytes()


def letter_columns(options: list[str]) -> dict[str, str]:
    return {chr(65 + k): options[k] if k < len(options) else "" for k in range(4)}


# ---- the formats ----------------------------------------------------------------------------------------


def vlmevalkit_tsv(folder: Path) -> tuple[Path, list[str]]:
    """TSV with base64 images; row 3 reuses row 1's image by naming its index, as VLMEvalKit does."""
    import csv

    path = folder / "bench.tsv"
    questions = [question(i, r) for i, r in enumerate(ROWS)]
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, ["index", "question", "A", "B", "C", "D", "answer", "category", "image"],
                                delimiter="\t")
        writer.writeheader()
        for i, row in enumerate(ROWS):
            image = "101" if i == 3 else base64.b64encode(image_png(i)).decode()
            writer.writerow({"index": 100 + i, "question": questions[i], **letter_columns(row.options),
                             "answer": row.key, "category": row.category, "image": image})
    return path, questions


def vlmevalkit_parquet(folder: Path) -> tuple[Path, list[str]]:
    path = folder / "bench.parquet"
    questions = [question(i, r) for i, r in enumerate(ROWS)]
    columns = {"index": [], "question": [], "A": [], "B": [], "C": [], "D": [], "answer": [], "category": [],
               "image": []}
    for i, row in enumerate(ROWS):
        for key, value in {"index": i, "question": questions[i], **letter_columns(row.options), "answer": row.key,
                           "category": row.category, "image": image_png(i)}.items():
            columns[key].append(value if value != "" else None)
    pq.write_table(pa.table(columns), path)
    return path, questions


def cvbench_jsonl(folder: Path) -> tuple[Path, list[str]]:
    """CV-Bench's layout: images under img/, `filename` relative to the jsonl's folder."""
    path = folder / "test.jsonl"
    questions = [question(i, r) for i, r in enumerate(ROWS)]
    (folder / "img").mkdir(exist_ok=True)
    with path.open("w") as out:
        for i, row in enumerate(ROWS):
            (folder / "img" / f"{i}.png").write_bytes(image_png(i))
            kind, task = CVBENCH_NAMES[row.category].split("/")
            labelled = " ".join(f"({chr(65 + k)}) {o}" for k, o in enumerate(row.options))
            out.write(json.dumps({"idx": i, "type": kind, "task": task, "question": questions[i],
                                  "choices": row.options, "answer": f"({row.key})",
                                  "prompt": f"{questions[i]} Select from the following choices.\n{labelled}",
                                  "filename": f"img/{i}.png", "source": "generated"}) + "\n")
    return path, questions


def cvbench_parquet(folder: Path) -> tuple[Path, list[str]]:
    """CV-Bench's parquet: the image embedded as the Hugging Face Image struct {bytes, path}."""
    path = folder / "test.parquet"
    questions = [question(i, r) for i, r in enumerate(ROWS)]
    records = []
    for i, row in enumerate(ROWS):
        kind, task = CVBENCH_NAMES[row.category].split("/")
        records.append({"idx": i, "type": kind, "task": task, "question": questions[i], "choices": row.options,
                        "answer": f"({row.key})", "image": {"bytes": image_png(i), "path": f"{i}.png"}})
    pq.write_table(pa.Table.from_pylist(records), path)
    return path, questions


def stvqa_parquet(folder: Path) -> tuple[Path, list[str]]:
    """STVQA-7K's fields. Even rows give `question` + `options`; odd rows only `question_with_options` (the
    training data's "Options:" line), so their options are read from the question."""
    path = folder / "stvqa.parquet"
    records, questions = [], []
    for i, row in enumerate(ROWS):
        text = inline_question(i, row, "training")
        asked = question(i, row) if i % 2 == 0 else text
        questions.append(asked)
        records.append({"id": f"st{i}", "question": question(i, row) if i % 2 == 0 else None,
                        "options": row.options if i % 2 == 0 else None, "question_with_options": text,
                        "answer_option_text": f"({row.key}) {row.options[ord(row.key) - 65]}",
                        "category": row.category, "image": {"bytes": image_png(i), "path": None}})
    pq.write_table(pa.Table.from_pylist(records), path)
    return path, questions


def project_jsonl(folder: Path) -> tuple[Path, list[str]]:
    """The project's JSONL: image paths relative to the file; answers as letters or option text; rows 1 and 5
    carry their options inline in the model card's form (no list)."""
    path = folder / "mine.jsonl"
    questions = []
    with path.open("w") as out:
        for i, row in enumerate(ROWS):
            (folder / f"frame{i}.png").write_bytes(image_png(i))
            inline = i in (1, 5)
            asked = inline_question(i, row) if inline else question(i, row)
            questions.append(asked)
            answer = row.options[ord(row.key) - 65] if i % 3 == 0 else row.key
            out.write(json.dumps({"index": f"r{i}", "question": asked, "options": [] if inline else row.options,
                                  "answer": answer, "category": row.category, "image": f"frame{i}.png"}) + "\n")
    return path, questions


FORMAT_BUILDERS = {"vlmevalkit-tsv": vlmevalkit_tsv, "vlmevalkit-parquet": vlmevalkit_parquet,
                   "cvbench-jsonl": cvbench_jsonl, "cvbench-parquet": cvbench_parquet,
                   "stvqa": stvqa_parquet, "jsonl": project_jsonl}


def category_names(builder: str) -> dict[str, str]:
    """ROWS' category -> the name the format reports it under."""
    return CVBENCH_NAMES if builder.startswith("cvbench") else {"relation": "relation", "depth": "depth"}


# ---- recordings ----------------------------------------------------------------------------------------

COLOUR, DEPTH_TOPIC, INFO = "/camera/color/image_raw", "/camera/depth/image_raw", "/camera/color/camera_info"
FRAME_TIMES = (0.0, 0.5, 1.0, 1.5)      # colour frames, seconds from the start; the sample scene is at 1.0
START_NS = 1_700_000_000 * 10 ** 9


def frame_size(k: int) -> tuple[int, int]:
    """(width, height) of the k-th recorded colour frame: distinct, so a test can tell which one was used."""
    return (640, 480) if FRAME_TIMES[k] == 1.0 else (160 + 32 * k, 120 + 24 * k)


def write_recording(path: Path, storage: str, compressed: bool) -> Path:
    """A rosbag2 with colour (raw rgb8 or JPEG... PNG CompressedImage), 16UC1 depth stamped 10 ms after each
    colour frame (plus a decoy 200 ms later), and CameraInfo of the sample scene's camera."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.LATEST)
    Image, CompressedImage = store.types["sensor_msgs/msg/Image"], store.types["sensor_msgs/msg/CompressedImage"]
    CameraInfo, Header = store.types["sensor_msgs/msg/CameraInfo"], store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    RegionOfInterest = store.types["sensor_msgs/msg/RegionOfInterest"]
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    sample = cv2.cvtColor(cv2.imdecode(np.frombuffer(SAMPLE_PNG, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    cam = META["camera"]

    def header(ns: int) -> object:
        return Header(stamp=Time(sec=ns // 10 ** 9, nanosec=ns % 10 ** 9), frame_id="camera")

    with Writer(path, version=9, storage_plugin=plugin) as writer:
        colour_type = CompressedImage if compressed else Image
        colour_conn = writer.add_connection(COLOUR, colour_type.__msgtype__, typestore=store)
        depth_conn = writer.add_connection(DEPTH_TOPIC, Image.__msgtype__, typestore=store)
        info_conn = writer.add_connection(INFO, CameraInfo.__msgtype__, typestore=store)
        for k, at in enumerate(FRAME_TIMES):
            ns = START_NS + round(at * 1e9)
            width, height = frame_size(k)
            rgb = sample if (width, height) == (640, 480) else np.full((height, width, 3), 40 * k, np.uint8)
            if compressed:
                data = np.frombuffer(cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes(), np.uint8)
                msg = CompressedImage(header=header(ns), format="png", data=data)
            else:
                msg = Image(header=header(ns), height=height, width=width, encoding="rgb8", is_bigendian=0,
                            step=width * 3, data=np.ascontiguousarray(rgb).reshape(-1))
            writer.write(colour_conn, ns, store.serialize_cdr(msg, colour_type.__msgtype__))
            info = CameraInfo(header=header(ns), height=height, width=width, distortion_model="plumb_bob",
                              d=np.zeros(5), k=np.array([cam["fx"] * width / 640, 0, cam["cx"] * width / 640, 0,
                                                         cam["fy"] * height / 480, cam["cy"] * height / 480, 0, 0, 1.0]),
                              r=np.eye(3).reshape(-1), p=np.zeros(12), binning_x=0, binning_y=0,
                              roi=RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
            writer.write(info_conn, ns, store.serialize_cdr(info, CameraInfo.__msgtype__))
            for offset_ms, depth_mm in ((10, None), (200, 100)):
                depth = SAMPLE_DEPTH if depth_mm is None else np.full((480, 640), depth_mm, np.uint16)
                depth_ns = ns + offset_ms * 10 ** 6
                dmsg = Image(header=header(depth_ns), height=480, width=640, encoding="16UC1", is_bigendian=0,
                             step=640 * 2, data=np.ascontiguousarray(depth).view(np.uint8).reshape(-1))
                writer.write(depth_conn, depth_ns, store.serialize_cdr(dmsg, Image.__msgtype__))
    return path


def recording_jsonl(folder: Path, bag: Path) -> Path:
    """Rows asking about the recording: the sample question at 1.02 s (nearest frame: the sample scene, with
    depth and CameraInfo), and a question at 0.4 s (nearest frame: the one at 0.5 s) without depth."""
    path = folder / "recorded.jsonl"
    rows = [
        {"index": "scene", "question": SAMPLE_QUESTION["question"], "options": SAMPLE_QUESTION["options"],
         "answer": "A", "category": "tabletop", "bag": str(bag.relative_to(folder)), "topic": COLOUR, "time": 1.02,
         "depth_topic": DEPTH_TOPIC, "camera_info_topic": INFO},
        {"index": "early", "question": SAMPLE_QUESTION["question"], "options": SAMPLE_QUESTION["options"],
         "answer": "A", "category": "tabletop", "bag": str(bag.relative_to(folder)), "topic": COLOUR, "time": 0.4},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
