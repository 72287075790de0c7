"""The `seqkern` command: `seqkern info`, `seqkern bench` (also `python -m seqkern ...`)."""

from __future__ import annotations

import sys

USAGE = """usage: seqkern <command> [options]

commands:
  bench   time every op on every available backend against upstream and its peers
          (seqkern bench --help)
  info    versions, build, GPU, and which backend can run which op
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a command is required: usage on stderr, a usage error's status
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        from seqkern.info import main as run
    elif cmd == "bench":
        from seqkern.bench import main as run
    else:
        print(f"seqkern: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
