"""The one typed node configuration (core/config.py) against the shipped parameter file and the command line."""

from pathlib import Path

import yaml

from spatialthinker_ros import cli
from spatialthinker_ros.core.backends.settings import TransformersConfig, backend_settings
from spatialthinker_ros.core.config import BY_NAME, PARAMETERS, defaults

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
    from_cli = TransformersConfig(**backend_settings("transformers", cli.setting_values(args)))
    from_node = TransformersConfig(**backend_settings("transformers", defaults()))
    assert from_cli == from_node and from_cli.min_pixels == from_node.min_pixels == BY_NAME["min_pixels"].default
    for name in ("prompt_style", "max_input_pixels", "max_question_chars", "max_request_image_pixels",
                 "max_new_tokens", "depth_scale", "relation_margin", "backend"):
        assert getattr(args, name) == BY_NAME[name].default, name
