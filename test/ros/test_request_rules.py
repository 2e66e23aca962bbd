"""The node and spatialthinker-ask refuse the same bad requests with the same error code and message: both apply
core/request.py. One list of requests goes to a real node process (service, the image in the request) and to
the installed command line (the image as a file), with the same limits set by parameter and by option."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import Image
from spatialthinker_ros.core.request import ErrorCode
from spatialthinker_ros.testing.fake_cameras import pattern_image
from spatialthinker_ros.testing.processes import installed_executable, node_command
from spatialthinker_ros.ros.conversions import ERROR_CODES
from spatialthinker_ros.srv import AskSpatial
from node_requests import E, OPTIONS, QUESTION, replay_params

pytestmark = pytest.mark.timeout(240)

ASK = installed_executable("spatialthinker-ask")
LIMITS = {"max_question_chars": 100, "max_request_image_pixels": 100_000}


@dataclass
class Case:
    question: str
    options: list[str] = field(default_factory=list)
    size: tuple[int, int] = (64, 48)      # (width, height) of the image asked about
    message: str = ""                      # part of the message both must give


CASES = [
    Case("\u3000\t \u2003\n", message="the question is empty"),
    Case("x" * 101, message="the question is 101 characters long; at most 100 are allowed"),
    Case(" " * 200 + QUESTION, message="(with its whitespace); at most 100"),
    Case(QUESTION, ["x"] * 27, message="27 options given; at most 26"),
    Case(QUESTION, ["left of", " \t "], message="option B is empty"),
    Case(QUESTION, ["y" * 201], message="option A is 201 characters long; at most 200"),
    Case(QUESTION, ["left of" + " " * 300], message="(with its whitespace); at most 200"),
    Case(QUESTION, OPTIONS, size=(400, 300), message="request image: image of 400x300 exceeds the 100000-pixel limit"),
    Case(QUESTION, OPTIONS, size=(4000, 2), message="longer than 200:1"),
]


def ask_cli(case: Case, image: Path, replay: Path) -> subprocess.CompletedProcess:
    args = [str(ASK), "--backend", "replay", "--replay-file", str(replay), "--image", str(image),
            "--question", case.question, "--max-question-chars", str(LIMITS["max_question_chars"]),
            "--max-request-image-pixels", str(LIMITS["max_request_image_pixels"])]
    if case.options:
        args += ["--options", *case.options]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_node_and_command_line_refuse_the_same_requests_alike(spawn, client, replay_file, tmp_path):
    proc = spawn(node_command(**replay_params(replay_file, use_depth=False, **LIMITS)), name="node")
    client.wait_for_service(proc)
    for case in CASES + [Case(QUESTION, OPTIONS)]:   # the last one is fine: both answer it
        width, height = case.size
        rgb = pattern_image(width, height)
        image_file = tmp_path / f"{width}x{height}.png"
        cv2.imwrite(str(image_file), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        response = client.ask(question=case.question, options=case.options,
                              image=Image(width=width, height=height, encoding="rgb8", step=width * 3,
                                          data=np.ascontiguousarray(rgb).tobytes()))
        done = ask_cli(case, image_file, replay_file)
        brief = (case.question[:40], [o[:20] for o in case.options[:3]], case.size)
        if not case.message:
            assert response.success and done.returncode == 0, (response.message, done.stderr)
            continue
        assert (response.success, response.error_code) == (False, E.ERROR_INVALID_REQUEST), (brief, response.message)
        assert case.message in response.message, (brief, response.message)
        assert done.returncode == 2 and done.stdout == "", (brief, done.stderr)
        assert done.stderr.strip() == f"spatialthinker-ask: error ({ErrorCode.INVALID_REQUEST.value}): " \
                                      f"{response.message}", brief
    assert proc.alive()


def test_every_error_code_has_one_service_constant():
    assert set(ERROR_CODES) == set(ErrorCode)
    constants = {name: getattr(AskSpatial.Response, name) for name in dir(AskSpatial.Response)
                 if name.startswith("ERROR_") and name != "ERROR_NONE"}
    assert sorted(ERROR_CODES.values()) == sorted(constants.values())
    assert all(constants[f"ERROR_{code.name}"] == ERROR_CODES[code] for code in ErrorCode)
