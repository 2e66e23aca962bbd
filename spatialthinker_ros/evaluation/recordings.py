"""Frames from ROS 2 recordings without ROS: rosbag2 folders, bare .mcap and .db3 files, read with `rosbags`.

A row names a colour topic and a time in seconds from the start of the recording; the colour frame logged
nearest that time is used. A depth frame is paired with it by the node's own rules (core/sources.py): the one
whose header stamp is closest to the colour frame's, if within the tolerance (stamps of zero fall back to log
time), and only when it shows the colour frame's field of view (same aspect); otherwise the row has no depth.
The CameraInfo logged nearest the colour frame gives the intrinsics. Decoding is core/images.py's, the
node's own; frames larger than the pipeline takes by default (MAX_REQUEST_IMAGE_PIXELS) are refused before
they are decoded, so a corrupt size cannot allocate gigabytes.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from spatialthinker_ros.core.geometry import DEFAULT_DEPTH_SCALE
from spatialthinker_ros.core.images import ImageError, colour_to_rgb, depth_image, intrinsics_from_camera_info
from spatialthinker_ros.core.request import DEPTH_SYNC_TOLERANCE_S, MAX_REQUEST_IMAGE_PIXELS, depth_aspect_mismatch
from spatialthinker_ros.core.sources import Source, closest_in_time
from spatialthinker_ros.evaluation.errors import BadRowError

COLOUR_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
DEPTH_TYPE = "sensor_msgs/msg/Image"
INFO_TYPE = "sensor_msgs/msg/CameraInfo"
PAIRING_WINDOW_S = 1.0           # depth frames this far (log time) from the colour frame are candidates


@dataclass(frozen=True)
class RecordingFrame:
    """Where a row's image is: a recording, its colour topic, seconds from the start, optional depth/info."""

    bag: Path
    topic: str
    time: float
    depth_topic: str = ""
    camera_info_topic: str = ""
    depth_scale: float = DEFAULT_DEPTH_SCALE

    @classmethod
    def from_row(cls, row: dict[str, Any], folder: Path) -> "RecordingFrame":
        """From a JSONL row's `bag` (relative to the file's folder), `topic`, `time`, optional `depth_topic`,
        `camera_info_topic`, `depth_scale`; ValueError says what is missing."""
        bag = Path(str(row["bag"]))
        topic = row.get("topic")
        if not isinstance(topic, str) or not topic:
            raise ValueError('a row with "bag" needs "topic" (the colour image topic)')
        time = row.get("time", 0.0)
        if isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time) or time < 0:
            raise ValueError(f'"time" must be seconds from the start of the recording (>= 0), not {time!r}')
        if (row.get("depth_topic") or "") and not (row.get("camera_info_topic") or ""):
            raise ValueError('"depth_topic" needs "camera_info_topic" (3D positions need the intrinsics)')
        return cls(bag=bag if bag.is_absolute() else folder / bag, topic=topic, time=float(time),
                   depth_topic=row.get("depth_topic") or "", camera_info_topic=row.get("camera_info_topic") or "",
                   depth_scale=float(row.get("depth_scale", DEFAULT_DEPTH_SCALE)))


class _Recording:
    """One open recording with the log times of each topic's messages, indexed once."""

    def __init__(self, path: Path):
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        if not path.exists():
            raise BadRowError(f"recording {path} does not exist")
        try:
            self._reader = AnyReader([path], default_typestore=get_typestore(Stores.LATEST))
            self._reader.open()
        except Exception as exc:   # rosbags raises its own error types per storage
            raise BadRowError(f"cannot open recording {path}: {exc}") from None
        self.path = path
        self.start = self._reader.start_time
        self._times: dict[str, list[int]] = {}
        self._lock = threading.Lock()   # rosbags readers are not thread-safe

    def close(self) -> None:
        self._reader.close()

    def frame(self, where: RecordingFrame) -> Source:
        duration = self._reader.end_time - self.start
        if where.time * 1e9 > duration + 1e9:
            raise BadRowError(f"time {where.time:g} s is past the end of recording {self.path} "
                              f"({duration * 1e-9:.1f} s long)")
        with self._lock:
            colour_time, colour = self._nearest(where.topic, self.start + round(where.time * 1e9), COLOUR_TYPES)
            rgb = self._decode_colour(where.topic, colour)
            if not where.camera_info_topic:
                return Source(rgb)
            _, info = self._nearest(where.camera_info_topic, colour_time, (INFO_TYPE,))
            try:
                intrinsics = intrinsics_from_camera_info(info)
            except ValueError as exc:
                raise BadRowError(f"{where.camera_info_topic}: {exc}") from None
            depth = None
            if where.depth_topic:
                depth_msg = self._paired_depth(where.depth_topic, colour_time, colour)
                colour_size = (rgb.shape[1], rgb.shape[0])
                if depth_msg is not None and not depth_aspect_mismatch(colour_size, (depth_msg.width,
                                                                                      depth_msg.height)):
                    try:
                        depth = depth_image(depth_msg, where.depth_scale, MAX_REQUEST_IMAGE_PIXELS)
                    except ImageError as exc:
                        raise BadRowError(f"{where.depth_topic}: {exc}") from None
            return Source(rgb, depth=depth, intrinsics=intrinsics)

    def _connections(self, topic: str, types: tuple[str, ...]) -> list:
        connections = [c for c in self._reader.connections if c.topic == topic]
        if not connections:
            topics = sorted({c.topic for c in self._reader.connections})
            raise BadRowError(f"recording {self.path} has no topic {topic} (it has {', '.join(topics)})")
        if connections[0].msgtype not in types:
            raise BadRowError(f"topic {topic} holds {connections[0].msgtype}, not {' or '.join(types)}")
        return connections

    def _log_times(self, topic: str, types: tuple[str, ...]) -> list[int]:
        if topic not in self._times:
            connections = self._connections(topic, types)
            self._times[topic] = sorted(t for _, t, _ in self._reader.messages(connections=connections))
            if not self._times[topic]:
                raise BadRowError(f"topic {topic} in recording {self.path} holds no message")
        return self._times[topic]

    def _nearest(self, topic: str, when: int, types: tuple[str, ...]) -> tuple[int, Any]:
        times = self._log_times(topic, types)
        i = bisect_left(times, when)
        best = min(times[max(0, i - 1):i + 1], key=lambda t: abs(t - when))
        return best, self._read(topic, types, best, best + 1)[0][1]

    def _read(self, topic: str, types: tuple[str, ...], start: int, stop: int) -> list[tuple[int, Any]]:
        connections = self._connections(topic, types)
        messages = []
        for connection, time, raw in self._reader.messages(connections=connections, start=start, stop=stop):
            try:
                messages.append((time, self._reader.deserialize(raw, connection.msgtype)))
            except Exception as exc:
                raise BadRowError(f"{topic}: a message at {time} ns cannot be deserialised ({exc})") from None
        return messages

    def _decode_colour(self, topic: str, msg: Any) -> Any:
        try:
            return colour_to_rgb(msg, MAX_REQUEST_IMAGE_PIXELS)
        except ImageError as exc:
            raise BadRowError(f"{topic}: {exc}") from None

    def _paired_depth(self, topic: str, colour_time: int, colour: Any) -> Optional[Any]:
        window = round(PAIRING_WINDOW_S * 1e9)
        candidates = [_Logged(msg, _stamp(msg, time))
                      for time, msg in self._read(topic, (DEPTH_TYPE,), colour_time - window, colour_time + window + 1)]
        best = closest_in_time(candidates, _stamp(colour, colour_time), DEPTH_SYNC_TOLERANCE_S)
        return None if best is None else best.msg


@dataclass(frozen=True)
class _Logged:
    msg: Any
    time: float   # seconds: the header stamp (core/sources.py's Timed)


def _stamp(msg: Any, log_time: int) -> float:
    """Header stamp in seconds; log time when the driver left it at zero."""
    stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
    return stamp if stamp > 0 else log_time * 1e-9


class RecordingCache:
    """Opens each recording once for all rows that use it; thread-safe."""

    def __init__(self) -> None:
        self._open: dict[Path, _Recording] = {}
        self._lock = threading.Lock()

    def frame(self, where: RecordingFrame) -> Source:
        """The row's frame, or BadRowError saying why there is none."""
        return self._recording(where.bag).frame(where)

    def _recording(self, path: Path) -> _Recording:
        key = path.resolve()
        with self._lock:
            if key not in self._open:
                self._open[key] = _Recording(path)
            return self._open[key]

    def close(self) -> None:
        with self._lock:
            for recording in self._open.values():
                recording.close()
            self._open.clear()
