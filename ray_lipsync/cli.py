"""`ray-lipsync` command line: avatar preparation, offline render, the service, config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from ray_lipsync.config import Settings
from ray_lipsync.errors import AvatarError, LipsyncError

log = logging.getLogger("ray_lipsync")


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_file(args.config) if args.config else Settings()
    overrides: dict[str, object] = {}
    if args.home:
        overrides["home"] = args.home
    if args.models_dir:
        overrides["models_dir"] = args.models_dir
    if getattr(args, "backend", None):
        overrides["backend"] = args.backend
    data = settings.model_dump()
    data.update(overrides)
    if getattr(args, "avatar", None):
        data["avatar"]["name"] = args.avatar
    serve = data["serve"]
    for key in ("host", "port", "livetalking_compat", "max_sessions"):
        value = getattr(args, key, None)
        if value is not None and value is not False:
            serve[key] = value
    return Settings.model_validate(data)


def _clip(spec: str) -> tuple[str, Path]:
    from ray_lipsync.avatar.prepare import parse_clip

    try:
        return parse_clip(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_avatar_prepare(args: argparse.Namespace) -> int:
    from ray_lipsync.avatar.prepare import run_prepare

    settings = _settings(args)
    clip_names = [name for name, _ in args.clip or []]
    if len(set(clip_names)) != len(clip_names):
        raise AvatarError(f"each --clip needs its own name, got {', '.join(clip_names)}")
    report = run_prepare(
        settings,
        image=args.image,
        video=args.video,
        name=args.name,
        backend=args.backend or "procedural",
        progress=not args.quiet,
        clips=dict(args.clip or []),
    )
    log.info("prepared avatar %r: %s", args.name, report)
    return 0


def cmd_avatar_list(args: argparse.Namespace) -> int:
    from ray_lipsync.avatar.prepare import list_avatars

    for row in list_avatars(_settings(args)):
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from ray_lipsync.render import render_file

    settings = _settings(args)
    report = render_file(args.audio, args.output, settings, avatar_name=args.avatar, progress=not args.quiet)
    log.info("wrote %s: %s", args.output, report)
    return 0


ServeRunner = Callable[..., None]  # (settings, address=..., dashboard=...) -> blocks


def cmd_serve(args: argparse.Namespace) -> int:
    if args.serve_runner is None:
        raise LipsyncError("`serve` needs the Ray Serve application: run it as `ray-lipsync serve` "
                           "(the installed command) or `python -m serve_app serve`")
    settings = _settings(args)
    if settings.backend == "musetalk":  # fail at startup, listing every missing/bad weight file
        from ray_lipsync.backends.musetalk.weights import check_weights

        check_weights(settings.models_dir)
    args.serve_runner(settings, address=args.address, dashboard=args.ray_dashboard)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(_settings(args).model_dump_json(indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-lipsync", description=__doc__)
    parser.add_argument("--config", type=Path, help="settings JSON file (see `ray-lipsync config`)")
    parser.add_argument("--home", type=Path, help="avatar store and caches (default ~/.cache/ray-lipsync)")
    parser.add_argument("--models-dir", type=Path, help="MuseTalk weights folder (default ./models)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    avatar = sub.add_parser("avatar", help="prepare and list avatars").add_subparsers(dest="action", required=True)
    prep = avatar.add_parser("prepare", help="build an avatar from a portrait image or a video")
    source = prep.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="portrait image (PNG/JPEG)")
    source.add_argument("--video", type=Path, help="talking-head video")
    prep.add_argument("--name", required=True, help="avatar name: letters, digits, _ and -")
    prep.add_argument("--backend", choices=["procedural", "musetalk"], help="also add MuseTalk latents")
    prep.add_argument("--clip", action="append", type=_clip, metavar="NAME=VIDEO",
                      help="a state or action clip of the same frame size (repeatable), e.g. "
                           "listening=listen.mp4; sessions switch to it by name")
    prep.set_defaults(func=cmd_avatar_prepare)
    avatar.add_parser("list", help="list prepared avatars").set_defaults(func=cmd_avatar_list)

    render = sub.add_parser("render", help="render speech to a lip-synced MP4 offline")
    render.add_argument("--audio", type=Path, required=True, help="speech audio file (WAV, MP3, ...)")
    render.add_argument("--avatar", help="prepared avatar name (default: the default avatar)")
    render.add_argument("--backend", choices=["procedural", "musetalk"])
    render.add_argument("-o", "--output", type=Path, required=True, help="output .mp4")
    render.set_defaults(func=cmd_render)

    serve = sub.add_parser("serve", help="start a local Ray + the WebRTC service")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--backend", choices=["procedural", "musetalk"])
    serve.add_argument("--avatar", help="default avatar of new sessions")
    serve.add_argument("--max-sessions", type=int, dest="max_sessions")
    serve.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    # the dashboard's cost, measured: benchmarks/README.md, section "Figures behind settings in
    # the code"
    serve.add_argument(
        "--ray-dashboard", action="store_true",
        help="start the local Ray with its dashboard (off: it costs CPU even when idle)",
    )
    serve.add_argument(
        "--livetalking-compat", action="store_true", help="also serve LiveTalking's unauthenticated routes"
    )
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="print the effective settings as JSON")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None, serve: ServeRunner | None = None) -> int:
    """Run the CLI. `serve` starts the service; the Serve application (serve_app.main) passes
    it, so this core package never imports the application layer."""
    args = build_parser().parse_args(argv)
    args.serve_runner = serve
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (LipsyncError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
