"""`python -m tests.rank0_late MODULE ARGS...`: run MODULE as `python -m MODULE ARGS...` would, with rank 0 starting
RANK0_DELAY_S late, so that every other rank reaches a shared error first (the order that took rank 0's message with
it under torchrun: Note [One line from rank 0 under torchrun] in longseq/train/command.py)."""

import os
import runpy
import sys
import time

RANK0_DELAY_S = 3.0

if __name__ == "__main__":
    if os.environ.get("RANK") == "0":
        time.sleep(RANK0_DELAY_S)
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
