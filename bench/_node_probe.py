"""spatialthinker_node's own main(), plus a read-only probe: the colour frames each camera has received.

    python bench/_node_probe.py STATUS_FILE --ros-args -p ...

Runs `spatialthinker_ros.ros.main.main` unchanged, given the node through its on_node hook. On SIGUSR1 (sent by the benchmark at window boundaries, a few
times per run) it writes CameraInput.frames_received to STATUS_FILE; nothing runs periodically in the node, so
its CPU figure is its own. Without it the benchmark could not tell whether the node received as many frames as
the bare subscriber it is compared with.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from spatialthinker_ros.ros.main import main as node_main


def main() -> int:
    status = Path(sys.argv[1])
    created = []
    seq = [0]

    def write_status(*_) -> None:      # a signal handler: runs on the main (executor) thread, between callbacks
        seq[0] += 1
        cameras = created[0].cameras if created else {}
        counts = {f"{name}_colour": camera.frames_received for name, camera in cameras.items()}
        counts.update({f"{name}_dropped": camera.frames_dropped for name, camera in cameras.items()})
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "time": time.time(), "seq": seq[0], **counts}))
        tmp.replace(status)

    signal.signal(signal.SIGUSR1, write_status)
    return node_main(args=[sys.argv[0], *sys.argv[2:]], on_node=created.append)


if __name__ == "__main__":
    sys.exit(main())
