"""The one typed node configuration (core/config.py) against the shipped parameter file and the command line."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from spatialthinker_ros import cli, cli_options
from spatialthinker_ros.core.backends.settings import TransformersConfig, backend_settings
from spatialthinker_ros.core.config import (BY_NAME, PARAMETERS, answering_setup, defaults, lift_config_from,
                                            pipeline_config_from)
from spatialthinker_ros.core.conformal import SETUP_FIELDS, CalibrationSetup
from spatialthinker_ros.core.geometry import LiftConfig
from spatialthinker_ros.core.pipeline import PipelineConfig
from spatialthinker_ros.core.prompt import PromptConfig

REPO = Path(__file__).resolve().parents[2]
# Keys of config/spatialthinker.yaml whose shipped value is not the default, and why (none today).
SHIPPED_OTHER_THAN_DEFAULT: dict[str, str] = {}


def test_shipped_parameter_file_holds_valid_values_of_declared_parameters():
    shipped = yaml.safe_load((REPO / "config" / "spatialthinker.yaml").read_text())["/**"]["ros__parameters"]
    assert set(shipped) <= set(BY_NAME), f"unknown parameters: {set(shipped) - set(BY_NAME)}"
    for name, value in shipped.items():
        assert BY_NAME[name].problem(value) is None, f"{name}: {value!r} {BY_NAME[name].problem(value)}"
        if name not in SHIPPED_OTHER_THAN_DEFAULT:
            assert value == BY_NAME[name].default, name


def test_every_default_is_valid_and_every_parameter_documents_when_it_applies():
    for spec in PARAMETERS:
        assert spec.problem(spec.default) is None, spec.name
        assert spec.applies in ("next request", "activate", "configure", "start") and spec.description
    assert BY_NAME["max_pixels"].backends == ("transformers", "openai") and BY_NAME["queue_size"].backends == ()
    assert BY_NAME["queue_size"].problem(0) and BY_NAME["backend"].problem("vllm") and BY_NAME["cameras"].problem([])


def test_node_and_command_line_load_the_model_alike_by_default():
    """min_pixels included: the node and spatialthinker-ask give the image processor the same settings."""
    args = cli.build_parser().parse_args(["--image", "x.png", "--question", "q"])
    from_cli = TransformersConfig(**backend_settings("transformers", cli_options.setting_values(args)))
    from_node = TransformersConfig(**backend_settings("transformers", defaults()))
    assert from_cli == from_node and from_cli.min_pixels == from_node.min_pixels == BY_NAME["min_pixels"].default
    for name in ("prompt_style", "max_input_pixels", "max_question_chars", "max_request_image_pixels",
                 "max_new_tokens", "depth_scale", "check_relations", "relation_margin", "min_depth", "max_depth",
                 "backend"):
        assert getattr(args, name) == BY_NAME[name].default, name


def test_node_and_command_line_read_depth_alike_and_refuse_an_empty_range():
    """min_depth/max_depth: one default each (LiftConfig's), the same LiftConfig from the node's parameters and the
    command line's options; a range that is empty is refused with the reason."""
    args = cli.build_parser().parse_args(["--image", "x.png", "--question", "q", "--min-depth", "0.07",
                                          "--max-depth", "0.5"])
    assert lift_config_from(vars(args)) == lift_config_from(defaults() | {"min_depth": 0.07, "max_depth": 0.5})
    assert lift_config_from(defaults()) == LiftConfig() == PipelineConfig().lift
    assert (BY_NAME["min_depth"].default, BY_NAME["max_depth"].default) == (0.05, 20.0)
    with pytest.raises(ValueError, match="max_depth must be finite and above min_depth"):
        lift_config_from(defaults() | {"min_depth": 1.0, "max_depth": 0.5})


def test_node_and_command_line_build_the_same_pipeline_from_their_values():
    args = cli.build_parser().parse_args(["--image", "x.png", "--question", "q", "--prompt-style", "training",
                                          "--max-input-pixels", "76800", "--max-question-chars", "99"])
    node_values = defaults() | {"prompt_style": "training", "max_input_pixels": 76800, "max_question_chars": 99}
    assert cli_options.pipeline_config(args) == pipeline_config_from(node_values)
    assert pipeline_config_from(node_values).prompt == PromptConfig(style="training", max_question_chars=99)
    assert pipeline_config_from(node_values).max_input_pixels == 76800


def test_the_answering_setup_is_read_from_the_loaded_backend(tiny_checkpoint: Path, tmp_path: Path):
    from spatialthinker_ros.core.backends import create_backend
    from spatialthinker_ros.core.checkpoint import checkpoint_fingerprint

    values = defaults() | {"prompt_style": "training", "max_input_pixels": 76800}
    replay_file = tmp_path / "replay.jsonl"
    replay_file.write_text('{"question": "q", "response": "<answer> (A) x </answer>"}\n')
    replay = create_backend("replay", replay_file=str(replay_file))
    assert answering_setup(replay, values) == CalibrationSetup.replay(76800, "training")
    setups = {}
    for settings in ({}, {"reuse_prompts": False}, {"compile": True}):
        backend = create_backend("transformers", model=str(tiny_checkpoint), device="cpu", max_pixels=50176,
                                 **settings)
        try:
            setups[tuple(settings)] = answering_setup(backend, values)
        finally:
            backend.close()
    assert setups[()] == CalibrationSetup(
        model=str(tiny_checkpoint), backend="transformers", checkpoint=checkpoint_fingerprint(str(tiny_checkpoint)),
        dtype="float32", quantization="none", min_pixels=3136, max_pixels=50176, max_input_pixels=76800,
        prompt_style="training", letters_continue=True)
    # Without prompt reuse the same answers get the same probabilities, so the calibration still holds; with compile
    # (a static cache) a letter written in two tokens, or not written, gets none, so it does not.
    assert setups[("reuse_prompts",)] == setups[()]
    assert setups[("compile",)] == replace(setups[()], letters_continue=False)



def test_the_calibration_setup_is_named_alike_everywhere():
    """What a calibration holds for: the setup's fields, listed from them in the parameter's description and in
    README's calibration recipe."""
    description = BY_NAME["calibration_file"].description
    assert re.search(r"another (.*)$", description).group(1) == ", ".join(SETUP_FIELDS[:-1]) + f" or {SETUP_FIELDS[-1]}"
    readme = (REPO / "README.md").read_text()
    recipe = re.search(r"exact settings: same\s+(.*?) \(", readme, re.S).group(1)
    assert tuple(re.findall(r"`(\w+)`", recipe)) == SETUP_FIELDS
