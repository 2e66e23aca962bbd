"""The official MCP client over stdio on the installed spatialthinker_mcp, for the MCP tests and benchmark: the
server is a child process in this process's (isolated) ROS environment."""

import contextlib
import os
import sys
from pathlib import Path

from mcp import Client, StdioServerParameters, stdio_client

from spatialthinker_ros.testing.processes import installed_executable


def mcp_executable() -> str:
    executable = installed_executable("spatialthinker_mcp")
    return str(executable) if executable is not None else sys.executable


@contextlib.asynccontextmanager
async def mcp_client(log: Path, *args: str):
    """A connected, initialised Client of a spatialthinker_mcp child (its stderr in `log`)."""
    command = mcp_executable()
    args = list(args) if command != sys.executable else ["-m", "spatialthinker_ros.mcp.server", *args]
    with open(log, "w") as errlog:
        server = StdioServerParameters(command=command, args=args, env=dict(os.environ))
        async with Client(stdio_client(server, errlog=errlog)) as client:
            yield client
