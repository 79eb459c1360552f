"""sq-check: validate an export (``sq-check onnx DIR``, ``sq-check trtllm DIR``)."""

from __future__ import annotations

import argparse
import sys

from sqdeploy.cli.common import run_cli
from sqdeploy.formats.onnx import check as onnx_check
from sqdeploy.formats.trtllm import check as trtllm_check

# kind -> module whose ``main(argv)`` checks that kind of directory
CHECKERS = {"onnx": onnx_check, "trtllm": trtllm_check}


def _usage_of_every_checker() -> str:
    """Each subcommand's own option list, so ``sq-check --help`` shows every option in one place."""
    parts = []
    for kind in sorted(CHECKERS):
        parts.append(CHECKERS[kind].build_parser().format_help().rstrip())
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in CHECKERS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        epilog = ("subcommands (sq-check KIND --help shows one):\n\n" + _usage_of_every_checker() if asked
                  else "sq-check KIND --help lists that check's options")
        ap = argparse.ArgumentParser(prog="sq-check", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("kind", choices=sorted(CHECKERS))
        ap.add_argument("dir")
        ap.parse_args(argv)
        return 2
    return CHECKERS[argv[0]].main(argv[1:])


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
