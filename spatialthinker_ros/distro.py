"""What differs between the ROS 2 distributions this package supports, at run time, in one place.

The code uses only rclpy APIs common to Humble, Jazzy and Kilted (docs/building.md, "Supported ROS 2 distributions"). What
remains is Fast DDS's name for the variable that points it at a profile file: Fast DDS 2.x (Humble, Jazzy) reads
FASTRTPS_DEFAULT_PROFILES_FILE and ignores FASTDDS_DEFAULT_PROFILES_FILE without a word, so large frames then
stall; Fast DDS 3.x (Kilted on) reads FASTDDS_DEFAULT_PROFILES_FILE and warns that the old name is deprecated.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Optional

FASTDDS_2_VARIABLE = "FASTRTPS_DEFAULT_PROFILES_FILE"
FASTDDS_3_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"
PROFILE_VARIABLES = (FASTDDS_2_VARIABLE, FASTDDS_3_VARIABLE)
_FASTDDS_2_DISTROS = ("humble", "iron", "jazzy")


def fastdds_profile_variable(prefixes: Optional[Iterable[str]] = None) -> str:
    """The profile variable the installed Fast DDS reads.

    Fast DDS 2.x installs share/fastrtps, 3.x share/fastdds, in the ROS prefix (/opt/ros/<distro>, or the venv of
    `make setup`); without either, ROS_DISTRO decides, and an unknown distribution is taken to be a newer one.
    """
    if prefixes is None:
        prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p] + [sys.prefix]
    for prefix in prefixes:
        share = Path(prefix) / "share"
        if (share / "fastdds").is_dir():
            return FASTDDS_3_VARIABLE
        if (share / "fastrtps").is_dir():
            return FASTDDS_2_VARIABLE
    return FASTDDS_2_VARIABLE if os.environ.get("ROS_DISTRO", "") in _FASTDDS_2_DISTROS else FASTDDS_3_VARIABLE
