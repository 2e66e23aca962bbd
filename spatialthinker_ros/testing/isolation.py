"""An isolated ROS graph for this process and every child it starts, and the DDS transport profile it uses.

Imports no ROS: isolate_ros() must run before rclpy creates its first context.
"""

from __future__ import annotations

import fcntl
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from spatialthinker_ros.distro import PROFILE_VARIABLES, fastdds_profile_variable

LARGE_IMAGES_PROFILE_NAME = "fastdds_large_images.xml"
DDS_TRANSPORTS = ("shm_large", "default")
# Domains the tests take: Fast DDS's ports for domain d start at 7400 + 250 d, below the ephemeral ports up to 100
DOMAIN_IDS = range(1, 101)
# Where every process on this host (any user, any TMPDIR) looks for the domains taken: one lock file per domain
DOMAIN_LOCK_DIR = Path("/tmp")
_held_domain_locks: list[int] = []   # descriptors of this process's domain locks: held until it exits


def allocate_domain_id(ids: Sequence[int] = DOMAIN_IDS, lock_dir: Path = DOMAIN_LOCK_DIR) -> int:
    """A ROS_DOMAIN_ID no other process on this host holds, held by this one until it exits.

    Each domain has a lock file in `lock_dir` (spatialthinker-ros-domain-<id>.lock); the first free one, in random
    order, is flock()ed and its descriptor kept open. The kernel releases the lock when the process ends however it
    ends, so a killed suite frees its domain. Children do not inherit the lock (Python opens files close-on-exec):
    they join the parent's graph through the environment, and the harness stops them before the parent exits.
    RuntimeError when every id is held."""
    for domain in random.SystemRandom().sample(list(ids), len(ids)):
        path = lock_dir / f"spatialthinker-ros-domain-{domain}.lock"
        try:   # read-only: a lock file another user created is readable, and flock needs no write access
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except PermissionError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_domain_locks.append(fd)
        return domain
    raise RuntimeError(f"every ROS domain in {ids[0]}..{ids[-1]} is held by another process on this host (lock files "
                       f"{lock_dir}/spatialthinker-ros-domain-*.lock)")


def isolate_ros(prefix: str = "spatialthinker-", offline: bool = True) -> Path:
    """Localhost-only discovery, a domain no other process on this host holds (allocate_domain_id), a temporary log
    folder and the large-frame Fast DDS profile, for this process and every child it starts (they inherit
    os.environ). Call before rclpy creates a context.

    A Fast DDS profile the user already set (under either Fast DDS's variable name) wins. `offline` keeps
    transformers and the hub from the network.
    Returns the temporary folder (ROS logs under roslog/, free for scratch files); remove it with shutil.rmtree.
    """
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)   # a sourced ROS install wins; else the venv is the prefix
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.pop("ROS_LOCALHOST_ONLY", None)   # deprecated; conflicts with the discovery range when set
    os.environ["ROS_DOMAIN_ID"] = str(allocate_domain_id())
    os.environ["ROS_LOG_DIR"] = str(scratch / "roslog")
    os.environ["PYTHONUNBUFFERED"] = "1"        # children's logs are complete when read
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    profile = large_images_profile()
    if profile is not None and not any(os.environ.get(name) for name in PROFILE_VARIABLES):
        os.environ[fastdds_profile_variable()] = str(profile)
    return scratch


def large_images_profile() -> Optional[Path]:
    """The shipped Fast DDS profile without which frames over 512 KB stall for seconds on one machine (see the
    file): the installed share folder's copy, else the source checkout's."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            path = Path(get_package_share_directory("spatialthinker_ros")) / "config" / LARGE_IMAGES_PROFILE_NAME
        except (PackageNotFoundError, OSError):   # not installed, or no ROS prefix in the environment
            path = None
        if path is not None and path.is_file():
            return path
    except ImportError:   # the ROS-free install (pip) has no ament index
        pass
    source = Path(__file__).resolve().parents[2] / "config" / LARGE_IMAGES_PROFILE_NAME
    return source if source.is_file() else None


def use_dds_transport(kind: str) -> None:
    """Before rclpy.init, for this process and its children: shm_large is the shipped profile (shared memory with
    64 MB segments, + UDP); default is Fast DDS as installed (no profile)."""
    if kind == "shm_large":
        profile = large_images_profile()
        if profile is None:
            raise FileNotFoundError(f"{LARGE_IMAGES_PROFILE_NAME} is neither installed nor in this checkout")
        os.environ[fastdds_profile_variable()] = str(profile)
    elif kind == "default":
        for name in PROFILE_VARIABLES:
            os.environ.pop(name, None)
    else:
        raise ValueError(f"unknown DDS transport {kind!r}; one of {DDS_TRANSPORTS}")

