"""What a caller or a checkpoint can make the real node do, and what it never does:

- it never runs a checkpoint's own code (trust_remote_code): a booby-trapped checkpoint loads without it running;
- the API key never reaches its log, its log files, or any message it publishes or answers with;
- bad parameter values are refused with the reason: at startup (a clear message, exit code 1) and at runtime;
- everything a caller sends is capped: exactly at each limit is accepted, one past it refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from rcl_interfaces.msg import Log, Parameter, ParameterEvent, ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, ListParameters, SetParameters
from rclpy.qos import QoSProfile
from spatialthinker_ros.testing.http_server import ScriptedHandler, local_http_server
from spatialthinker_ros.testing.fake_cameras import pattern_image
from spatialthinker_ros.testing.node_client import spin_future, spin_until
from spatialthinker_ros.testing.processes import node_command
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from node_requests import CALL, E, OPTIONS, QUESTION, RESPONSE

from spatialthinker_ros.action import AskSpatial as AskSpatialAction

pytestmark = pytest.mark.timeout(180)
PACKAGE = Path(__file__).resolve().parents[2] / "spatialthinker_ros"


def request_image(width: int = 64, height: int = 48, frame_id: str = "request") -> Image:
    return Image(header=Header(frame_id=frame_id), width=width, height=height, encoding="rgb8", step=width * 3,
                 data=pattern_image(width, height).tobytes())


# ----------------------------------------------------------------------------- trust_remote_code


def test_trust_remote_code_appears_nowhere_in_the_package():
    import spatialthinker_ros

    installed = Path(spatialthinker_ros.__file__).parent
    sources = [p for root in {PACKAGE, installed} for p in root.rglob("*.py")]
    assert len(sources) > 20
    hits = [str(p) for p in sources if "trust_remote_code" in p.read_text(encoding="utf-8")]
    assert hits == [], "the model is Qwen2.5-VL, which transformers implements: never trust a checkpoint's code"


def booby_trap(checkpoint: Path, target: Path) -> Path:
    """A copy of the checkpoint whose own code (auto_map) would write `target/ran` if anything imported it."""
    trapped = target / "checkpoint"
    shutil.copytree(checkpoint, trapped)
    marker = target / "ran"
    (trapped / "trap_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('checkpoint code ran')\n"
        "from transformers import Qwen2_5_VLConfig\n\n\nclass TrapConfig(Qwen2_5_VLConfig):\n    pass\n")
    auto_map = {"AutoConfig": "trap_code.TrapConfig", "AutoProcessor": "trap_code.TrapProcessor",
                "AutoModel": "trap_code.TrapModel", "AutoModelForImageTextToText": "trap_code.TrapModel",
                "AutoTokenizer": ["trap_code.TrapTokenizer", None]}
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        config = json.loads((trapped / name).read_text())
        config["auto_map"] = auto_map
        (trapped / name).write_text(json.dumps(config))
    return marker


def test_a_checkpoint_carrying_its_own_code_loads_without_running_it(spawn, client, tiny_checkpoint, tmp_path):
    marker = booby_trap(tiny_checkpoint, tmp_path)
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    # the trap is real: trusting the checkpoint runs its code (in a child process, to keep this one clean)
    probe = spawn([sys.executable, "-c", "import sys; from transformers import AutoConfig; "
                   "AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)", str(marker.parent / "checkpoint")],
                  name="probe", env=env)
    assert probe.popen.wait(timeout=120) == 0, probe.output()
    assert marker.exists()
    marker.unlink()
    proc = spawn(node_command(backend="transformers", model=str(marker.parent / "checkpoint"), device="cpu",
                           max_new_tokens=16, use_depth=False), name="node", env=env)
    client.wait_for_service(proc, timeout=120)
    response = client.ask(timeout=120, question=QUESTION, image=request_image())
    assert response.success, response.message + proc.output()
    assert not marker.exists(), "the node ran the checkpoint's own code"


# ----------------------------------------------------------------------------- the API key


@dataclasses.dataclass
class _KeyServerState:
    seen: list[str] = dataclasses.field(default_factory=list)   # the Authorization header of every request
    mode: str = "ok"                                             # how the next requests are answered


class _Server(ScriptedHandler):
    """OpenAI-compatible enough: answers, or fails in ways that echo the Authorization header back."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization", "")
        self.server.state.seen.append(auth)
        mode = self.server.state.mode
        if mode == "reject":
            return self._send(401, f'{{"error": "invalid api key {auth}"}}'.encode())
        if mode == "crash":
            return self._send(500, f"Traceback ... headers={{'authorization': '{auth}'}}".encode(), "text/plain")
        usage = {"prompt_tokens": 50, "completion_tokens": 40}
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": RESPONSE}, "finish_reason": "stop"}
            return self._send(200, json.dumps({"choices": [choice], "usage": usage}).encode())
        events = [{"choices": [{"index": 0, "delta": {"content": RESPONSE[i:i + 80]}}]}
                  for i in range(0, len(RESPONSE), 80)]
        events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, {"choices": [], "usage": usage}]
        self._events(events + ["[DONE]"])


@pytest.fixture
def key_server():
    with local_http_server(_Server, _KeyServerState()) as server:
        yield server


def test_the_api_key_is_never_logged_published_or_answered(spawn, client, key_server, tmp_path):
    secret = f"sk-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    log_dir = tmp_path / "roslog"
    env = os.environ | {"ROBOT_VLM_KEY": secret, "ROS_LOG_DIR": str(log_dir)}
    seen: list = []     # every message from the node, on every topic it publishes
    node = client.node
    for msg_type, topic in ((Log, "/rosout"), (ParameterEvent, "/parameter_events")):
        node.create_subscription(msg_type, topic, seen.append, QoSProfile(depth=1000))
    proc = spawn(node_command(backend="openai", server_url=f"http://127.0.0.1:{key_server.server_address[1]}/v1",
                           model="served-model", api_key_env="ROBOT_VLM_KEY", max_new_tokens=64, use_depth=False,
                           max_input_pixels=320 * 240), name="node", env=env)
    client.wait_for_service(proc)
    assert spin_until(node, lambda: node.count_publishers("/spatialthinker/debug_image") > 0, CALL)
    assert spin_until(node, client.action.server_is_ready, CALL)
    answers: list = []
    ask = dict(question=QUESTION, options=OPTIONS, image=request_image(640, 480))
    for mode in ("ok", "reject", "crash", "ok"):
        key_server.state.mode = mode
        response = client.ask(**ask)
        assert response.success == (mode == "ok"), (mode, response.message)
        answers.append(response)
        goal = spin_future(node, client.action.send_goal_async(AskSpatialAction.Goal(**ask),
                                                                 feedback_callback=seen.append), CALL)
        result = spin_future(node, goal.get_result_async(), CALL).result
        assert result.success == (mode == "ok"), (mode, result.message)
        answers.append(result)
    assert "HTTP 401" in answers[2].message and "HTTP 500" in answers[4].message
    assert key_server.state.seen and set(key_server.state.seen) == {f"Bearer {secret}"}, "the key was really sent"
    assert spin_until(node, lambda: len(client.answers) >= 4 and client.debug and client.markers, CALL)
    parameters = spin_future(node, node.create_client(ListParameters, "/spatialthinker/list_parameters").call_async(
        ListParameters.Request()), CALL)
    values = spin_future(node, node.create_client(GetParameters, "/spatialthinker/get_parameters").call_async(
        GetParameters.Request(names=parameters.result.names)), CALL)
    proc.stop()
    published = [*seen, *answers, *client.answers, *client.graphs, *client.markers, values]
    texts = {"node output": proc.output()}
    texts |= {str(p): p.read_text(errors="replace") for p in log_dir.rglob("*") if p.is_file()}
    texts |= {f"message {i}: {type(m).__name__}": repr(m) for i, m in enumerate(published)}
    assert any(p.is_file() for p in log_dir.rglob("*")), "the node's log files were read"
    assert "HTTP 401" in texts["node output"], "the failures were logged (without the key)"
    assert len(published) > 20
    leaked = [where for where, text in texts.items() if secret in text or secret[:20] in text]
    assert leaked == []


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name, value, reason", [
    ("server_url", "ftp://gpu.example.com/v1", "must start with http:// or https://"),
    ("model", "https://evil.example.com/model.bin", "not a URL"),
    ("cameras", "[front, bad-name]", "not a valid ROS name"),
    ("api_key_env", "KEY;rm", "must be an environment variable name"),
    ("max_request_image_pixels", "0", "out of range"),
    ("queue_size", "many", "queue_size"),
])
def test_a_bad_parameter_at_startup_exits_with_the_reason(spawn, name, value, reason):
    proc = spawn(node_command(backend="replay", replay_file="/nonexistent") + ["-p", f"{name}:={value}"], name="node")
    assert proc.popen.wait(timeout=30) == 1
    output = proc.output()
    assert "invalid parameter" in output and reason in output, output
    assert "Traceback" not in output, output


def parameter(name: str, value) -> Parameter:
    if isinstance(value, str):
        return Parameter(name=name, value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value))
    if isinstance(value, float):
        return Parameter(name=name, value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value))
    return Parameter(name=name, value=ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value))


def test_bad_parameter_values_at_runtime_are_refused_with_the_reason(spawn, client, tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.write_text(json.dumps({"question": QUESTION, "response": RESPONSE}) + "\n")
    proc = spawn(node_command(backend="replay", replay_file=str(replay), use_depth=False), name="node")
    client.wait_for_service(proc)
    setter = client.node.create_client(SetParameters, "/spatialthinker/set_parameters")
    getter = client.node.create_client(GetParameters, "/spatialthinker/get_parameters")
    assert spin_until(client.node, lambda: setter.service_is_ready() and getter.service_is_ready(), CALL)
    cases = [
        (parameter("server_url", "http://user:pw@gpu.example.com/v1"), "must not contain credentials"),
        (parameter("server_url", "http://gpu.example.com/v1?key=1"), "query or fragment"),
        (parameter("model", "org/name/../../etc\x01"), "control characters"),
        (parameter("model", "file://x/y"), "not a URL"),
        (parameter("device", "tpu"), "must be auto, cpu, cuda or cuda:N"),
        (parameter("request_timeout", -1.0), "request_timeout"),
        (parameter("max_question_chars", 10**9), "max_question_chars"),
        (parameter("request_timeout", "soon"), "Wrong parameter type"),   # rclpy's own type check
        (parameter("request_timeout", 12.5), None),     # a good value is accepted
    ]
    results = spin_future(client.node, setter.call_async(SetParameters.Request(parameters=[p for p, _ in cases])),
                          CALL).results
    for (param, reason), result in zip(cases, results):
        if reason is None:
            assert result.successful, result.reason
        else:
            assert not result.successful and reason in result.reason, (param.name, result.reason)
    values = spin_future(client.node, getter.call_async(GetParameters.Request(
        names=["server_url", "model", "device", "request_timeout", "max_question_chars"])), CALL).values
    assert [values[0].string_value, values[1].string_value, values[2].string_value] == \
        ["http://127.0.0.1:8000/v1", "OX-PIXL/SpatialThinker-7B", "auto"]
    assert (values[3].double_value, values[4].integer_value) == (12.5, 2000)
    assert client.ask(question=QUESTION, options=OPTIONS, image=request_image()).success
    assert proc.alive()


# ----------------------------------------------------------------------------- caps on what callers send


def test_every_size_a_caller_controls_is_capped_exactly_at_its_limit(spawn, client, tmp_path):
    question = "Q" * 300
    replay = tmp_path / "replay.jsonl"
    replay.write_text(json.dumps({"question": question, "response": RESPONSE}) + "\n")
    pixels = 200 * 150
    proc = spawn(node_command(backend="replay", replay_file=str(replay), max_question_chars=300, use_depth=False,
                           max_request_image_pixels=pixels), name="node")
    client.wait_for_service(proc)
    at_limit = dict(question=question, options=[chr(65 + i % 26) * 200 for i in range(26)],
                    image=request_image(200, 150, frame_id="f" * 256))
    response = client.ask(**at_limit)
    assert response.success, response.message
    assert response.answer.header.frame_id == "f" * 256 and len(response.answer.options) == 26
    past = [
        dict(question=question + "?"),
        dict(question=question + " "),
        dict(options=at_limit["options"] + ["A"]),
        dict(options=at_limit["options"][:-1] + ["B" * 201]),
        dict(image=request_image(201, 150)),
        dict(image=request_image(200, 151)),
        dict(image=request_image(200, 150, frame_id="f" * 257)),
    ]
    for change in past:
        response = client.ask(**(at_limit | change))
        assert response.error_code == E.ERROR_INVALID_REQUEST, ({k: str(v)[:40] for k, v in change.items()},
                                                                response.message)
        assert re.search(r"at most|exceeds", response.message), response.message
    assert proc.alive()
