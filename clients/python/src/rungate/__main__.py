"""``python -m rungate``: a command line for reading a run's output.

``python -m rungate tail RUN --from 0 --url ws://HOST:PORT --token TOKEN``
prints each event as one JSON line on stdout, ``{"offset": N, "event":
{...}}``, resuming across reconnects; gaps, truncation and the run's end are
JSON lines on stderr. It exits 0 when the run ends (or after ``--count``
events), 1 on an error. Owns argument parsing and printing only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from typing import Sequence

from .errors import RungateError
from .viewer import EndedItem, EventItem, ViewerClient


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rungate", description="rungate client tools")
    sub = p.add_subparsers(dest="command", required=True)
    tail = sub.add_parser("tail", help="print a run's output events as JSON lines")
    tail.add_argument("run", metavar="RUN", help="the run id")
    tail.add_argument(
        "--from",
        dest="from_offset",
        default="0",
        help="first offset to print (default 0: everything kept; 'live': from the head)",
    )
    tail.add_argument(
        "--url",
        default=os.environ.get("RUNGATE_URL", "ws://127.0.0.1:7700"),
        help="the gateway (ws://HOST:PORT; env RUNGATE_URL)",
    )
    tail.add_argument(
        "--token",
        default=os.environ.get("RUNGATE_TOKEN"),
        help="a viewer token covering RUN (env RUNGATE_TOKEN)",
    )
    tail.add_argument("--count", type=int, default=None, help="stop after this many events")
    return p


async def _tail(run: str, from_offset: int | None, url: str, token: str, count: int | None) -> int:
    printed = 0
    async with ViewerClient(url, token) as viewer:
        async for item in viewer.events(run, from_offset=from_offset):
            if isinstance(item, EventItem):
                line = json.dumps({"offset": item.offset, "event": item.event}, separators=(",", ":"))
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
                printed += 1
                if count is not None and printed >= count:
                    return 0
            else:
                notice = {k: v for k, v in asdict(item).items()}
                sys.stderr.write(json.dumps(notice, separators=(",", ":")) + "\n")
                sys.stderr.flush()
                if isinstance(item, EndedItem):
                    return 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.token is None:
        print("a token is needed: --token or RUNGATE_TOKEN", file=sys.stderr)
        return 2
    if args.from_offset == "live":
        from_offset: int | None = None
    else:
        try:
            from_offset = int(args.from_offset)
        except ValueError:
            print(f"--from takes an offset or 'live', not {args.from_offset!r}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(_tail(args.run, from_offset, args.url, args.token, args.count))
    except RungateError as e:
        print(f"rungate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
