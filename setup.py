"""pip route for the ROS-free core (no ROS needed): `pip install .[transformers]` on a GPU server.

The ROS package itself (interfaces, node, launch files) is built by CMakeLists.txt, with colcon in a ROS 2
workspace or by `make setup` into the venv; neither uses this file. See docs/building.md.
"""

import tempfile

from setuptools import find_packages, setup

# setuptools writes its metadata (spatialthinker_ros.egg-info) and its staging copy (build/lib, which would keep a
# deleted module and ship it in the next wheel) beside this file; a folder of its own, removed when the build step
# exits, leaves the work tree as it was.
_SCRATCH = tempfile.TemporaryDirectory(prefix="spatialthinker_ros-setup-")

setup(
    name="spatialthinker_ros",
    version="0.1.0",
    description="SpatialThinker spatial question answering: prompts, robust parsing, geometry and backends",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["spatialthinker_ros", "spatialthinker_ros.*"],
                           exclude=["spatialthinker_ros.ros", "spatialthinker_ros.ros.*",
                                    "spatialthinker_ros.mcp", "spatialthinker_ros.mcp.*"]),
    package_data={"spatialthinker_ros": ["data/*"]},   # the CLI's and demo's sample scene
    install_requires=[
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "pillow>=10",       # image headers read before decoding (core/images.py)
        "json-repair>=0.30",
        "httpx>=0.27",
        "pyarrow>=15",      # spatialthinker-eval: parquet benchmark files
        "rosbags>=0.10",    # spatialthinker-eval: rosbag2 recordings without ROS
        "tqdm>=4.60",       # spatialthinker-eval: progress bar
        "matplotlib>=3.7",  # spatialthinker-eval: the reliability and accuracy-vs-coverage pictures
    ],
    extras_require={
        "transformers": ["torch>=2.4", "torchvision", "transformers>=4.52", "accelerate>=1.0"],
    },
    options={"egg_info": {"egg_base": _SCRATCH.name}, "build": {"build_base": _SCRATCH.name}},
    entry_points={"console_scripts": ["spatialthinker-ask=spatialthinker_ros.cli:main",
                                      "spatialthinker-eval=spatialthinker_ros.evaluation.cli:main"]},
)
