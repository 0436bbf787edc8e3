"""What torchrun tells a process through its environment (RANK, WORLD_SIZE), readable without torch, so
the command line can decide which rank talks before anything heavy is imported."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank (0 outside torchrun); usable before the process group exists."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
