"""CLI: ``python tests/emulator --port 0`` starts the emulator and prints a ready line."""

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from repobox_emulator import serve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(prog='repobox-emulator', description=__doc__)
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=0, help='0 picks a free port (printed in the ready line)')
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    main()
