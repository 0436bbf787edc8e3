"""Launch several ranks from a test: each rank a real process with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free port), gloo on the CPU, and a hard timeout so a hang
fails the test instead of blocking the suite."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
    }


@dataclass
class Rank:
    rank: int
    proc: subprocess.Popen
    out_path: Path
    err_path: Path

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()


def spawn(argvs: list[list[str]], logs: Path, env: dict[str, str] | None = None) -> list[Rank]:
    """Start one process per argv (rank = index) as one process group; outputs go to files in `logs`."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ranks = []
    for r, argv in enumerate(argvs):
        out, err = logs / f"rank{r}.out", logs / f"rank{r}.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            full_env = {**rank_env(r, len(argvs), port), **(env or {})}
            proc = subprocess.Popen(argv, stdout=fo, stderr=fe, cwd=REPO, env=full_env)
        ranks.append(Rank(r, proc, out, err))
    return ranks


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "fastgrow.cli", *map(str, args)]


def wait(ranks: list[Rank], timeout: float) -> list[int]:
    """Return codes of every rank; on timeout kill them all and raise (with their stderr)."""
    deadline = time.monotonic() + timeout
    codes = []
    for r in ranks:
        try:
            codes.append(r.proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in ranks:
                q.proc.kill()
            for q in ranks:
                q.proc.wait()
            tails = "\n".join(f"--- rank {q.rank} stderr:\n{q.stderr[-2000:]}" for q in ranks)
            raise AssertionError(f"ranks still running after {timeout} s (a hang)\n{tails}") from None
    return codes


def altered_data_copy(src: Path, dst: Path, *, token: int) -> Path:
    """A copy of prepared token data with every token replaced by `token` (metadata rewritten so it
    opens and verifies)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    for shard in meta["shards"]:
        toks = np.full(shard["num_tokens"], token, dtype=dtype).tobytes()
        (dst / shard["file"]).write_bytes(toks)
        shard["sha256"] = hashlib.sha256(toks).hexdigest()
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst
