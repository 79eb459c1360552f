"""sq-check: validate an export (``sq-check onnx DIR``, ``sq-check trtllm DIR``)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import run_cli

# kind -> module whose ``main(argv)`` checks that kind of directory
CHECKERS = {
    "onnx": "sqdeploy.exporter.onnx.check",
    "trtllm": "sqdeploy.exporter.trtllm.check",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in CHECKERS:
        ap = argparse.ArgumentParser(prog="sq-check", description=__doc__)
        ap.add_argument("kind", choices=sorted(CHECKERS))
        ap.add_argument("dir")
        ap.parse_args(argv)
        return 2
    return importlib.import_module(CHECKERS[argv[0]]).main(argv[1:])


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
