"""``capkit`` command: version and pointers to the other commands."""
from __future__ import annotations

import argparse
import sys

from capkit import __version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="capkit",
        description="capkit: contrastive pruning with sparse kernels. "
        "Commands: capkit-info (backends on this machine), python -m benchmarks.masked_linear "
        "(kernel benchmark), python -m capkit.demo (a short demo of the masked linear op).",
    )
    parser.add_argument("--version", action="version", version=f"capkit {__version__}")
    parser.add_argument("command", nargs="?", choices=["info", "demo"], help="run capkit-info or the demo")
    args = parser.parse_args(argv)
    if args.command == "info":
        from capkit.info import main as info_main

        return info_main([])
    if args.command == "demo":
        from capkit.demo import main as demo_main

        return demo_main([])
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
