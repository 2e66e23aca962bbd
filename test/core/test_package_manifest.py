"""package.xml declares, under its rosdep key, every module the installed package imports.

A rosdep user gets exactly what package.xml names; a new import without its key breaks their workspace, not ours.
Modules without a rosdep key come from pip, and docs/building.md's workspace instructions must name them.
"""

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# import name -> rosdep key (ROS packages are their own keys); None: no rosdep key, installed by pip
ROSDEP_KEYS = {
    "rclpy": "rclpy", "std_msgs": "std_msgs", "sensor_msgs": "sensor_msgs", "geometry_msgs": "geometry_msgs",
    "visualization_msgs": "visualization_msgs", "builtin_interfaces": "builtin_interfaces",
    "rcl_interfaces": "rcl_interfaces", "lifecycle_msgs": "lifecycle_msgs", "action_msgs": "action_msgs",
    "ament_index_python": "ament_index_python", "launch": "launch", "launch_ros": "launch_ros",
    "numpy": "python3-numpy", "cv2": "python3-opencv", "packaging": "python3-packaging", "PIL": "python3-pil",
    "transformers": "python3-transformers-pip", "tokenizers": "python3-transformers-pip",
    "huggingface_hub": "python3-transformers-pip",
    "torch": None, "torchvision": None, "accelerate": None, "json_repair": None, "httpx": None,
    "pyarrow": None, "rosbags": None, "tqdm": None, "matplotlib": "python3-matplotlib",   # spatialthinker-eval
    "mcp": None, "pydantic": None, "uvicorn": None,   # spatialthinker_mcp (pydantic and uvicorn come with mcp)
}
PIP_NAMES = {"torch": "torch", "torchvision": "torchvision", "accelerate": "accelerate",
             "json_repair": "json-repair", "httpx": "httpx", "pyarrow": "pyarrow", "rosbags": "rosbags",
             "tqdm": "tqdm", "mcp": "mcp", "pydantic": "mcp", "uvicorn": "mcp"}


def imported_modules() -> set[str]:
    found = set()
    for path in (REPO / "spatialthinker_ros").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "spatialthinker_ros"}


def test_every_import_has_a_rosdep_key_or_a_pip_route():
    unknown = imported_modules() - ROSDEP_KEYS.keys()
    assert not unknown, f"add these imports to package.xml (or the pip list) and to ROSDEP_KEYS: {sorted(unknown)}"

    manifest = ET.parse(REPO / "package.xml").getroot()
    declared = {e.text for e in manifest if e.tag in ("depend", "exec_depend", "build_export_depend")}
    for module in imported_modules():
        key = ROSDEP_KEYS[module]
        if key is not None:
            assert key in declared, f"{module} is imported but package.xml lacks <exec_depend>{key}</exec_depend>"

    readme = (REPO / "docs" / "building.md").read_text()
    workspace_section = readme[readme.index("## In a ROS 2 workspace"):]
    pip_line = re.search(r"pip install [^\n]*", workspace_section).group(0)
    for module in imported_modules():
        if ROSDEP_KEYS[module] is None:
            assert PIP_NAMES[module] in pip_line, f"docs/building.md's workspace pip line must install {PIP_NAMES[module]}"
