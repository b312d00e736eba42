"""The ``voxray`` command: ``serve``, ``check-config``, ``simulate``.

The only module that reads ``os.environ``, configures logging and runs uvicorn.

Usage::

    voxray serve [--config config.json] [--host 0.0.0.0] [--port 8000] [--workers N|auto]
    voxray check-config --config config.json      # or: voxray check-config config.json
    voxray check-config --probe                   # also: does each provider take its key and know its model?
    voxray simulate                               # a gateway in this process, one emulated call, the transcript
    voxray simulate --carrier vonage --say "What time do you open tomorrow?" --say "Thank you very much."
    TWILIO_AUTH_TOKEN=... voxray simulate --carrier twilio --url http://127.0.0.1:8000 --calls 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Config

# One event loop per process does all the audio work; a multi-threaded BLAS would spin extra cores
# on the resampler's small matrix products. Set before numpy is imported (the operator may override).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxray", description="Telephony-first voice-agent gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="config.json (default: $VOXRAY_CONFIG, else embedded defaults)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", help="processes serving the port: a number, or auto (one per core); "
                                         "default: the workers setting, else 1")
    # a worker of a group, started by the supervisor (gateway.group.supervisor); not for people
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--hub", help=argparse.SUPPRESS)
    check = sub.add_parser("check-config", help="validate a config file and print the resolved settings")
    check.add_argument("--config", type=Path, help="config.json (default: $VOXRAY_CONFIG, else embedded defaults)")
    check.add_argument("path", type=Path, nargs="?", help="the same as --config PATH")
    check.add_argument("--probe", action="store_true",
                       help="also call each configured provider's cheapest authenticated endpoint and print, per "
                            "stage, ok / key rejected / unreachable / model not found (exit 1 on any failure)")
    sim = sub.add_parser(
        "simulate", help="place emulated carrier calls (against a gateway started here, or --url) and print them",
        description="Without --url, starts a gateway in this process from your configuration (config file, "
                    "VOXRAY_* variables) with a throw-away carrier credential, places an emulated call, and prints "
                    "what was said and each turn's latency. Exits 1 when a turn gets no real answer.")
    sim.add_argument("--config", type=Path, help="config.json for the in-process gateway (default: $VOXRAY_CONFIG)")
    sim.add_argument("--carrier", default="twilio", choices=["twilio", "telnyx", "vonage", "plivo", "exotel"])
    sim.add_argument("--url", help="an already running gateway, e.g. http://127.0.0.1:8000 (default: start one here)")
    sim.add_argument("--credential", action="append", default=[], metavar="KEY=VALUE",
                     help="with --url: the emulated carrier's signing credentials, the gateway's own (e.g. "
                          "auth_token=..., signature_secret=..., signing_key=<base64 Ed25519 seed>, "
                          "basic_auth_user=...); Twilio's default to TWILIO_AUTH_TOKEN / TWILIO_ACCOUNT_SID")
    sim.add_argument("--public-url", help="with --url: the public_url the gateway signs against (default: --url)")
    sim.add_argument("--calls", type=int, default=1, help="calls placed at once")
    sim.add_argument("--turns", type=int, help="utterances per call (default: one per --say, else 2)")
    voice = sim.add_mutually_exclusive_group()
    voice.add_argument("--say", action="append", default=[], metavar="TEXT",
                       help="a sentence the caller speaks (offline voice), one per turn; repeat for more turns")
    voice.add_argument("--audio", type=Path, help="a WAV recording the caller plays each turn (any rate, mono/stereo)")
    sim.add_argument("--to", default="+14155550100", help="the dialed number (selects the persona)")
    sim.add_argument("--answer-timeout", type=float, default=15.0, metavar="SECS",
                     help="end of speech -> first agent audio; later is no answer (default: 15; with --url keep it "
                          "below the gateway's silence_prompt_secs)")
    sim.add_argument("--verbose", action="store_true", help="also show the in-process gateway's log")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    if args.command == "simulate" and args.url:
        return _simulate(args, environ, None)
    if getattr(args, "path", None) and args.config and args.path != args.config:
        parser.error(f"two config files given ({args.path} and --config {args.config}): pass one")
    path = (getattr(args, "config", None) or getattr(args, "path", None)
            or (Path(environ["VOXRAY_CONFIG"]) if environ.get("VOXRAY_CONFIG") else None))
    overrides = {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
                 "workers": getattr(args, "workers", None)}
    from gateway.config import Config, ConfigError  # after the thread limits above (it imports numpy)

    try:
        config = Config.load(path, environ, overrides)
    except ConfigError as exc:
        for problem in exc.problems:       # one line each, all of them
            print(f"voxray: configuration error: {problem}", file=sys.stderr)
        return 2
    if args.command == "simulate":
        return _simulate(args, environ, config)
    if args.command == "check-config":
        print(json.dumps(config.describe(), indent=2))
        for note in config.providers.notes:
            print(f"note: {note}", file=sys.stderr)
        return _probe(config) if args.probe else 0
    from gateway.app import create_app
    from gateway.logging import configure_logging
    from gateway.server import build_server

    if args.worker:                          # one worker of a group: the supervisor checked everything
        return _serve_worker(args, config)
    refusal = _required_at_start(config)
    if refusal is not None:
        print(f"voxray: {refusal}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, json_lines=config.log_json, transport_debug=config.log_transport_debug)
    if config.workers > 1:
        from gateway.group.supervisor import run_group

        return run_group(config, path, overrides, environ)
    server = build_server(create_app(config), config)
    server.run()
    return 0


def _probe(config: Config) -> int:
    """``check-config --probe``: one line per stage; 1 when any provider failed its probe."""
    import asyncio

    from gateway.startup_checks import PROBE_FAILED, probe_providers

    results = asyncio.run(probe_providers(config, config.startup_check_timeout_secs))
    for stage, name, result in results:
        print(f"probe: {stage}: {name}: {result}")
    return 1 if any(result.startswith(PROBE_FAILED) for _, _, result in results) else 0


def _serve_worker(args: argparse.Namespace, config: Config) -> int:
    """``serve --worker N --listen-fd FD --hub PATH``: serve the supervisor's socket as worker N."""
    import socket

    from gateway.app import create_app
    from gateway.group.member import Member
    from gateway.logging import configure_logging
    from gateway.server import build_server

    configure_logging(config.log_level, json_lines=config.log_json, transport_debug=config.log_transport_debug,
                      worker=args.worker)
    member = Member(args.hub, worker=args.worker, timeout_s=config.cluster_request_timeout_secs)
    server = build_server(create_app(config, member=member), config)
    server.run(sockets=[socket.socket(fileno=args.listen_fd)])
    return 0


def _required_at_start(config: Config) -> str | None:
    """What ``recording.require_at_start`` refuses to start without, as one line (before the server runs:
    a failed lifespan would end in uvicorn's traceback); None when there is nothing to check or it answered."""
    if not (config.recording.enable and config.recording.require_at_start):
        return None
    import asyncio

    from gateway.startup_checks import check_recording

    problem = asyncio.run(check_recording(config.recording, config.startup_check_timeout_secs))
    return None if problem is None else f"{problem} (recording.require_at_start is true: not starting)"


def _simulate(args: argparse.Namespace, environ: dict[str, str], config: Config | None) -> int:
    """``voxray simulate``: against ``--url``, or a gateway started here from ``config``."""
    from gateway.logging import configure_logging
    from gateway.simulate.run import Options, run_simulation

    credentials = dict(item.partition("=")[::2] for item in args.credential)
    if args.carrier == "twilio" and args.url:
        credentials.setdefault("auth_token", environ.get("TWILIO_AUTH_TOKEN", ""))
        credentials.setdefault("account_sid", environ.get("TWILIO_ACCOUNT_SID", ""))
    options = Options(carrier=args.carrier, url=args.url, public_url=args.public_url, credentials=credentials,
                      calls=args.calls, turns=args.turns, say=tuple(args.say), audio=args.audio, to=args.to,
                      answer_timeout_s=args.answer_timeout, verbose=args.verbose)
    json_lines = config is not None and config.log_json
    return run_simulation(options, config, setup_logging=lambda: configure_logging(
        "info" if args.verbose else "warning", json_lines=json_lines))


if __name__ == "__main__":
    sys.exit(main())
