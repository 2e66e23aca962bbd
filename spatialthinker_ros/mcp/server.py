"""spatialthinker_mcp: an MCP server (the official `mcp` SDK) over a running spatialthinker node, so an LLM agent
host can ask the robot's camera spatial questions and get 3D positions, checked relations and a calibrated
act-or-ask decision (docs/agents.md). Every tool is read-only: the server asks, it never actuates.

stdio by default (agent hosts start it as a child process); --http serves streamable HTTP on 127.0.0.1, and on
any other address only with a bearer token from the environment variable --token-env names.

Exit codes: 0 stopped, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import ipaddress
import os
import sys
from typing import Annotated, Any, Callable, Optional, Sequence

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import Field

from spatialthinker_ros.core.images import colour_to_rgb
from spatialthinker_ros.core.text import excerpt
from spatialthinker_ros.mcp import results
from spatialthinker_ros.mcp.node_link import CallTimedOut, NodeLink, NodeUnavailable, Progress

PROG = "spatialthinker_mcp"
DEFAULT_PORT = 8765
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=False,
                            open_world_hint=False)
STAGE_NAMES = {0: "queued", 1: "generating", 2: "scene ready"}   # action/AskSpatial.action's STAGE_* values
SCENE_READY = 2

INSTRUCTIONS = """Spatial perception of a robot's camera by the SpatialThinker vision-language model. Boxes are
in the camera image's pixels; positions are metres in the camera's optical frame (x right, y down, z forward).
ask_spatial with options returns a decision: act only when it is "act" (the calibrated prediction set holds
exactly one option); on "ask_for_help" ask a person or look again; "uncalibrated" means there is no guarantee."""

Camera = Annotated[str, Field(description="a camera name of the node's cameras parameter; empty = its first camera")]
IncludeImage = Annotated[bool, Field(description="also return the frame with boxes and relations drawn (JPEG)")]


def _error(code: str, message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=results.error_text(code, message))], is_error=True)


def _stamp(header: Any) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


class SpatialTools:
    """The four tools over one NodeLink; every node outcome becomes one tool result."""

    def __init__(self, link: NodeLink, timeout_s: float):
        self.link, self.timeout_s = link, timeout_s

    async def _ask(self, ctx: Context, **request: Any) -> Any:
        """One question to the node: through its action when the MCP client asked for progress (the feedback is
        relayed), else through its service, one round trip where a goal takes two. The successful Result or
        Response, or a CallToolResult error. Either way a cancelled call cancels the node's request."""
        from spatialthinker_ros.ros.conversions import error_code_name

        meta = ctx.request_context.meta
        wants_progress = meta is not None and meta.get("progress_token") is not None   # 0 and "" are tokens too
        try:
            if wants_progress:
                result = await self._ask_with_progress(ctx, request)
            else:
                result = await self.link.ask(self.timeout_s, **request)
        except CallTimedOut as exc:
            return _error("TIMEOUT", f"{exc} (the server's --timeout)")
        except NodeUnavailable as exc:
            return _error("NODE_UNAVAILABLE", str(exc))
        if not result.success:
            return _error(error_code_name(result.error_code), result.message)
        return result

    async def _ask_with_progress(self, ctx: Context, goal: dict[str, Any]) -> Any:
        """One goal, its feedback relayed as MCP progress (1, 2, 3, ... with the stage in the message). A scene-ready
        message that has not come with the result is reported from the result: feedback travels on a topic of its
        own, and rclpy drops a goal's feedback that it takes after the goal's result."""
        queue: asyncio.Queue[Progress] = asyncio.Queue()
        scene_seen = False

        def on_progress(progress: Progress) -> None:
            nonlocal scene_seen
            scene_seen = scene_seen or progress.stage == SCENE_READY
            queue.put_nowait(progress)

        async def relay() -> None:
            sent = 0
            while True:
                progress = await queue.get()
                text = STAGE_NAMES.get(progress.stage, str(progress.stage))
                if progress.stage:
                    text += f": {progress.tokens} tokens"
                sent += 1
                try:   # a client that went away must not stop the call (queue.join() waits for every item)
                    await ctx.report_progress(sent, None, text)
                except Exception:
                    pass
                finally:
                    queue.task_done()

        relaying = asyncio.ensure_future(relay())
        try:
            result = await self.link.ask_with_feedback(self.timeout_s, on_progress, **goal)
            if result.success and result.answer.scene_graph.objects and not scene_seen:
                on_progress(Progress(SCENE_READY, result.answer.completion_tokens))
            await queue.join()
            return result
        finally:
            relaying.cancel()

    def _frame(self, answer: Any) -> dict:
        return {"stamp": _stamp(answer.header), "camera": answer.camera, "frame_id": answer.header.frame_id}

    @staticmethod
    async def _image(result: Any, scene_caption: str) -> list[Any]:
        """The frame the node answered on (the request's return_image) with the answer's scene graph drawn, off
        the event loop (a large frame takes a while to draw and encode)."""
        from spatialthinker_ros.ros.conversions import scene_graph_from_msg

        def draw() -> bytes:   # the node has checked the frame's size against its own limit
            rgb = colour_to_rgb(result.image, result.image.width * result.image.height)
            return results.annotated_jpeg(rgb, scene_graph_from_msg(result.answer.scene_graph), scene_caption)

        try:
            jpeg = await asyncio.to_thread(draw)
        except ValueError as exc:   # a frame the node sent that cannot be read here
            return [TextContent(type="text", text=f"image not included: {excerpt(exc, 300)}")]
        return [ImageContent(type="image", data=base64.b64encode(jpeg).decode("ascii"), mime_type="image/jpeg")]

    async def ask_spatial(self, ctx: Context, question: str, options: list[str], camera: str,
                          include_image: bool) -> CallToolResult:
        from spatialthinker_ros.ros.conversions import answer_from_msg

        outcome = await self._ask(ctx, question=question, options=list(options), camera=camera,
                                  return_image=include_image)
        if isinstance(outcome, CallToolResult):
            return outcome
        answer = outcome.answer
        parsed, inference = answer_from_msg(answer)
        result = results.ask_result(parsed, self._frame(answer), answer.model, inference.seconds, answer.question,
                                    list(answer.options), list(answer.prediction_set),
                                    float(answer.prediction_set_coverage))
        content: list[Any] = [TextContent(type="text", text=results.ask_summary(result))]
        if include_image:
            content += await self._image(outcome, parsed.answer or parsed.status.name.lower())
        return CallToolResult(content=content, structured_content=result.model_dump(mode="json"))

    async def _scene(self, ctx: Context, camera: str, include_image: bool = False) -> tuple[Any, Any]:
        """The scene-only answer's SceneResult (or a CallToolResult error) and the node's Result or Response."""
        from spatialthinker_ros.ros.conversions import answer_from_msg

        outcome = await self._ask(ctx, question=results.SCENE_QUESTION, camera=camera, scene_only=True,
                                  return_image=include_image)
        if isinstance(outcome, CallToolResult):
            return outcome, None
        parsed, inference = answer_from_msg(outcome.answer)
        return results.scene_result(parsed, self._frame(outcome.answer), outcome.answer.model,
                                    inference.seconds), outcome

    async def describe_scene(self, ctx: Context, camera: str, include_image: bool) -> CallToolResult:
        scene, outcome = await self._scene(ctx, camera, include_image)
        if isinstance(scene, CallToolResult):
            return scene
        content: list[Any] = [TextContent(type="text", text=results.scene_summary(scene))]
        if include_image:
            content += await self._image(outcome, "scene")
        return CallToolResult(content=content, structured_content=scene.model_dump(mode="json"))

    async def locate(self, ctx: Context, description: str, camera: str) -> CallToolResult:
        scene, _ = await self._scene(ctx, camera)
        if isinstance(scene, CallToolResult):
            return scene
        found = results.locate_result(scene, description)
        return CallToolResult(content=[TextContent(type="text", text=results.locate_summary(found))],
                              structured_content=found.model_dump(mode="json"))

    async def node_status(self) -> CallToolResult:
        try:
            state = await self.link.lifecycle_state()
            params = await self.link.parameters("backend", "model", "queue_size")
            topics = await self.link.watch_cameras()
        except NodeUnavailable as exc:
            return _error("NODE_UNAVAILABLE", str(exc))
        if state == "active":   # an active node has published ~/stats: a fresh server may not have it yet
            await self.link.wait_for_stats()
        stats = self.link.stats or {}
        counted = stats.get("cameras", {})
        cameras = [results.CameraStatus(name=name, topic=topic, last_frame_age_s=self.link.last_frame_age_s(name),
                                        frames_received=counted.get(name, {}).get("frames_received", 0))
                   for name, topic in topics.items()]
        scheduler = stats.get("scheduler") or {}
        queue = {key: scheduler.get(key, 0) for key in ("queued", "running", "submitted", "completed", "failed",
                                                          "timed_out", "cancelled", "rejected", "max_queue_depth")}
        queue["queue_size"] = params["queue_size"]
        backend = stats.get("backend") or {}
        status = results.NodeStatusResult(node=self.link.path, lifecycle_state=state, backend=params["backend"],
                                          model=backend.get("model") or params["model"], cameras=cameras,
                                          calibration=stats.get("calibration"), queue=queue)
        ages = ", ".join(f"{c.name} {'no frame' if c.last_frame_age_s is None else f'{c.last_frame_age_s:.2f} s'}"
                         for c in cameras)
        calibration = (f"coverage {status.calibration.coverage:g}" if status.calibration else "no calibration")
        text = (f"{self.link.path} {state}, {status.backend} {status.model}; cameras: {ages or 'none'}; "
                f"{calibration}; queue {queue['queued']} waiting, {queue['running']} running")
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content=status.model_dump(mode="json"))


def build_server(tools: SpatialTools) -> MCPServer:
    """The MCP server with the four read-only tools (their names and fields are a contract: docs/agents.md)."""
    server = MCPServer(PROG, instructions=INSTRUCTIONS)

    @server.tool(annotations=READ_ONLY, description=(
        "Ask a spatial question about the camera's latest frame. With options (e.g. ['left of', 'right of']) the "
        "answer carries each option's probability, the calibrated prediction set and a decision: act only on "
        "'act'. Returns objects with pixel boxes and 3D positions (metres, camera optical frame) and relations "
        "checked against depth."))
    async def ask_spatial(
            ctx: Context,
            question: Annotated[str, Field(min_length=1, description="the question, e.g. 'Is the cup left of the "
                                                                     "plate?'")],
            options: Annotated[list[str], Field(max_length=26, description="multiple-choice options, lettered A, "
                                                                           "B, ... in order; empty = free form")] = [],
            camera: Camera = "",
            include_image: IncludeImage = False,
    ) -> Annotated[CallToolResult, results.AskSpatialResult]:
        return await tools.ask_spatial(ctx, question, options, camera, include_image)

    @server.tool(annotations=READ_ONLY, description=(
        "The objects the camera sees now (id, label, pixel box, 3D position in metres or null) and their relations "
        "checked against depth, without a question: faster than ask_spatial."))
    async def describe_scene(ctx: Context, camera: Camera = "",
                             include_image: IncludeImage = False) -> Annotated[CallToolResult, results.SceneResult]:
        return await tools.describe_scene(ctx, camera, include_image)

    @server.tool(annotations=READ_ONLY, description=(
        "Where an object is: the scene's objects matching a description (e.g. 'the mug'), best first, with 3D "
        "positions in metres. Empty, with the reason and the objects seen, when none matches."))
    async def locate(ctx: Context,
                     object: Annotated[str, Field(min_length=1, description="what to find, e.g. 'mug'")],
                     camera: Camera = "") -> Annotated[CallToolResult, results.LocateResult]:
        return await tools.locate(ctx, object, camera)

    @server.tool(annotations=READ_ONLY, description=(
        "The node's health: lifecycle state, backend and model, each camera's last frame age, the calibration's "
        "coverage and setup (none: decisions are uncalibrated), and the request queue."))
    async def node_status() -> Annotated[CallToolResult, results.NodeStatusResult]:
        return await tools.node_status()

    return server


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BearerTokenGuard:
    """ASGI middleware: HTTP requests without `Authorization: Bearer <token>` get 401."""

    def __init__(self, app: Callable, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers", ())).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = b"missing or wrong bearer token"
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-name", default="spatialthinker", help="the node's name (default %(default)s)")
    parser.add_argument("--namespace", default="/", help="the node's namespace (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds a tool call may take, queue and model included (default %(default)s)")
    parser.add_argument("--wait", type=float, default=5.0, metavar="S",
                        help="seconds a call waits for the node to be there before it fails (default %(default)s)")
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="--http: address to bind (default %(default)s); a "
                                                            "non-loopback one needs --token-env")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="--http: port (default %(default)s)")
    parser.add_argument("--token-env", metavar="NAME", help="--http: NAME of the environment variable holding the "
                                                            "bearer token clients must send (never the token itself)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from rclpy.utilities import remove_ros_args

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(remove_ros_args([PROG, *argv])[1:])
        token = os.environ.get(args.token_env, "") if args.token_env else ""
        if args.token_env and not token:
            parser.error(f"--token-env {args.token_env}: that environment variable is unset or empty")
        if args.http and not is_loopback(args.host) and not token:
            parser.error(f"--host {args.host} is not a loopback address: serving it needs a bearer token, read from "
                         "the environment variable --token-env names")
        if args.timeout <= 0 or args.wait <= 0:
            parser.error("--timeout and --wait must be positive")
    except SystemExit as exit_:         # argparse has printed usage and the error (or the help)
        return int(exit_.code or 0)
    link = NodeLink(args.node_name, args.namespace, wait_s=args.wait, ros_args=[PROG, *argv])
    server = build_server(SpatialTools(link, args.timeout))
    try:
        if args.http:
            _serve_http(server, args.host, args.port, token)
        else:
            server.run("stdio")
    except KeyboardInterrupt:
        pass
    finally:
        link.close()
    return 0


def _serve_http(server: MCPServer, host: str, port: int, token: str) -> None:
    import uvicorn

    app = server.streamable_http_app(host=host)
    config = uvicorn.Config(BearerTokenGuard(app, token) if token else app, host=host, port=port,
                            log_level="warning")
    asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    sys.exit(main())
