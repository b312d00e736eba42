"""The ``voxray`` command: ``serve``, ``check-config``.

The only module that reads ``os.environ``, configures logging and runs uvicorn.

Usage::

    voxray serve [--config config.json] [--host 0.0.0.0] [--port 8000]
    voxray check-config --config config.json      # or: voxray check-config config.json
    TWILIO_AUTH_TOKEN=... voxray simulate --carrier twilio --url http://127.0.0.1:8000 --calls 5
"""

from __future__ import annotations

import os

# One event loop per process does all the audio work; a multi-threaded BLAS would spin extra cores
# on the resampler's small matrix products. Set before numpy is imported (the operator may override).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from gateway.config import Config, ConfigError  # noqa: E402

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxray", description="Telephony-first voice-agent gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="config.json (default: $VOXRAY_CONFIG, else embedded defaults)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    check = sub.add_parser("check-config", help="validate a config file and print the resolved settings")
    check.add_argument("--config", type=Path, help="config.json (default: $VOXRAY_CONFIG, else embedded defaults)")
    check.add_argument("path", type=Path, nargs="?", help="the same as --config PATH")
    sim = sub.add_parser("simulate", help="place emulated carrier calls against a gateway and print latencies")
    sim.add_argument("--carrier", default="twilio", choices=["twilio", "telnyx", "vonage", "plivo", "exotel"])
    sim.add_argument("--credential", action="append", default=[], metavar="KEY=VALUE",
                     help="the emulated carrier's signing credentials (e.g. auth_token=..., signature_secret=..., "
                          "signing_key=<base64 Ed25519 seed>, basic_auth_user=...); Twilio's default to "
                          "TWILIO_AUTH_TOKEN / TWILIO_ACCOUNT_SID")
    sim.add_argument("--url", required=True, help="the gateway's address, e.g. http://127.0.0.1:8000")
    sim.add_argument("--public-url", help="the public_url the gateway signs against (default: --url)")
    sim.add_argument("--calls", type=int, default=1)
    sim.add_argument("--turns", type=int, default=2, help="utterances per call")
    sim.add_argument("--audio", type=Path, help="WAV of the caller's utterance (default: a synthetic voice)")
    sim.add_argument("--to", default="+14155550100", help="the dialed number (selects the persona)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    if args.command == "simulate":
        from gateway.simulate.call import run_simulation

        credentials = dict(item.partition("=")[::2] for item in args.credential)
        if args.carrier == "twilio":
            credentials.setdefault("auth_token", environ.get("TWILIO_AUTH_TOKEN", ""))
            credentials.setdefault("account_sid", environ.get("TWILIO_ACCOUNT_SID", ""))
        return run_simulation(url=args.url, public_url=args.public_url, calls=args.calls, turns=args.turns,
                              audio=args.audio, to=args.to, carrier=args.carrier, credentials=credentials)
    if getattr(args, "path", None) and args.config and args.path != args.config:
        parser.error(f"two config files given ({args.path} and --config {args.config}): pass one")
    path = (getattr(args, "config", None) or getattr(args, "path", None)
            or (Path(environ["VOXRAY_CONFIG"]) if environ.get("VOXRAY_CONFIG") else None))
    overrides = {"host": getattr(args, "host", None), "port": getattr(args, "port", None)}
    try:
        config = Config.load(path, environ, overrides)
    except ConfigError as exc:
        for problem in exc.problems:       # one line each, all of them
            print(f"voxray: configuration error: {problem}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(json.dumps(config.describe(), indent=2))
        for note in config.providers.notes:
            print(f"note: {note}", file=sys.stderr)
        return 0
    from gateway.app import create_app
    from gateway.logging import configure_logging
    from gateway.server import build_server

    configure_logging(config.log_level, json_lines=config.log_json, transport_debug=config.log_transport_debug)
    server = build_server(create_app(config), config)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
