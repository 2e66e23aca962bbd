"""Point the ROS wheels' exported CMake files at this venv's Python and numpy headers.

The PyPI ROS 2 wheels were built in a manylinux image, and their *Export.cmake files name that image's
include folders (/opt/python/cp3XX-cp3XX/...). Building our own interfaces against them needs this venv's
folders instead. Idempotent: files already rewritten are left alone.
"""

import pathlib
import re
import sys
import sysconfig

import numpy


def main() -> int:
    prefix = pathlib.Path(sys.prefix)
    python_include = sysconfig.get_paths()["include"]
    numpy_include = numpy.get_include()
    patterns = [
        (re.compile(r"/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/_core/include"), numpy_include),
        (re.compile(r"/opt/python/cp3\d+-cp3\d+/include/python3\.\d+"), python_include),
    ]
    changed = 0
    for path in (prefix / "share").rglob("*.cmake"):
        text = path.read_text()
        if "/opt/python/" not in text:
            continue
        for pattern, replacement in patterns:
            text = pattern.sub(replacement, text)
        path.write_text(text)
        changed += 1
    print(f"fix_wheel_cmake_paths: rewrote {changed} CMake files under {prefix / 'share'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
