"""The node's parameters as ROS declares them: descriptors and the on-set check, from core/config.py.

config/spatialthinker.yaml and docs/node.md list the same parameters; test_config.py and test_launch.py keep them in
step.
"""

from __future__ import annotations

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult

from spatialthinker_ros.core.config import BY_NAME, PARAMETERS, WHEN, ParamSpec  # noqa: F401 - the node's list


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    choices = f"; one of {', '.join(spec.choices)}" if spec.choices else ""
    d = ParameterDescriptor(name=spec.name, description=f"{spec.description}{choices} ({WHEN[spec.applies]})")
    if spec.int_range:
        d.integer_range = [IntegerRange(from_value=spec.int_range[0], to_value=spec.int_range[1], step=0)]
    if spec.float_range:
        d.floating_point_range = [FloatingPointRange(from_value=spec.float_range[0], to_value=spec.float_range[1],
                                                     step=0.0)]
    return d


def check_parameters(parameters) -> SetParametersResult:
    """on-set callback: rejects the whole set if any value is invalid, with the reason."""
    for parameter in parameters:
        spec = BY_NAME.get(parameter.name)
        if spec is None:
            continue
        reason = spec.rule_problem(parameter.value)
        if reason:
            return SetParametersResult(successful=False, reason=f"{parameter.name}={parameter.value!r}: {reason}")
    return SetParametersResult(successful=True)
