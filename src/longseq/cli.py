"""The `longseq` command line: a table of subcommands, each imported only when it runs.

    longseq train CONFIG.yaml [--section.key=value ...]      # CPU or one GPU
    torchrun --nproc-per-node 8 -m longseq.cli train CONFIG.yaml
    longseq train --demo                                     # tiny model, 2 CPU processes, ~2 minutes
    longseq train --help                                     # every config field, its default and doc
"""

from __future__ import annotations

import difflib
import importlib
import sys

# name -> (one-line summary, "module:function" taking argv and returning an exit code); a new command is one entry.
COMMANDS = {
    "train": ("Train a causal LM on long sequences (FSDP2 + sequence parallelism).", "longseq.train.command:main"),
    "plan": ("The fastest configuration that fits, or the longest length (no GPU needed).", "longseq.plan.command:main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: longseq COMMAND [ARGS]\n\ncommands:")
        for name, (summary, _) in COMMANDS.items():
            print(f"  {name:<8} {summary}")
        print("\n`longseq COMMAND --help` describes a command.")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"longseq: unknown command {name!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module, function = COMMANDS[name][1].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
