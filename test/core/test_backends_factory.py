"""create_backend: names, settings, and that only the transformers backend pulls in torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spatialthinker_ros.core.backends import BACKEND_NAMES, create_backend
from spatialthinker_ros.core.backends.base import GenerationConfig

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def test_unknown_backend_lists_the_valid_names():
    with pytest.raises(ValueError) as raised:
        create_backend("vllm")
    assert BACKEND_NAMES == ("transformers", "openai", "replay")
    assert "transformers, openai, replay" in str(raised.value)


def test_unknown_setting_lists_the_valid_ones(tmp_path: Path):
    with pytest.raises(ValueError) as raised:
        create_backend("replay", replay_file=str(tmp_path / "x.jsonl"), temprature=0.5)
    assert "temprature" in str(raised.value) and "latency_s" in str(raised.value)


def test_generation_may_be_given_as_a_mapping():
    backend = create_backend("openai", model="m", generation={"max_new_tokens": 64, "min_new_tokens": 8})
    try:
        assert backend.config.generation == GenerationConfig(max_new_tokens=64, min_new_tokens=8)
        assert (backend.name, backend.model_name, backend.max_batch_size) == ("openai", "m", 8)
    finally:
        backend.close()


def test_transformers_backend_from_the_factory(tiny_checkpoint: Path):
    backend = create_backend("transformers", model=str(tiny_checkpoint), device="cpu", max_batch_size=2)
    try:
        assert (backend.name, backend.model_name, backend.max_batch_size) == ("transformers", str(tiny_checkpoint), 2)
    finally:
        backend.close()


def test_openai_and_replay_backends_do_not_import_torch(tmp_path: Path):
    replay = tmp_path / "answers.jsonl"
    replay.write_text(json.dumps({"question": "q", "response": "<answer> A </answer>"}) + "\n")
    script = (
        "import sys\n"
        "from spatialthinker_ros.core.backends import create_backend\n"
        f"create_backend('replay', replay_file={str(replay)!r}).close()\n"
        "create_backend('openai').close()\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
