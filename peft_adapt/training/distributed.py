"""Training past one process: data parallel through accelerate (Trainer's own engine), or one domain per worker.

- `launch_command`: how `peft-adapt train --num-processes N` starts N workers: `accelerate launch --multi_gpu`
  on GPUs; on the CPU `torch.distributed.run` (accelerate's launcher runs multi-process only on GPUs or
  MPI; Trainer and accelerate then use the gloo backend).
- Data parallel (the default with several processes): every worker trains the same domain on its shard;
  only the main process writes the output folder and the registry.
- `--parallel-domains`: each worker trains its own domains as an independent single-process job.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# what torch.distributed.run / accelerate set, and a single-process worker must not see
_DISTRIBUTED_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                    "ACCELERATE_USE_CPU")


@dataclass(frozen=True)
class World:
    rank: int
    size: int


def world() -> World:
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def launch_command(num_processes: int, argv: list[str]) -> list[str]:
    """The command that runs `peft-adapt <argv>` in `num_processes` workers."""
    import torch

    if torch.cuda.is_available():
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(num_processes), "-m", "peft_adapt.cli", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
            "-m", "peft_adapt.cli", *argv]


def become_single_process() -> World:
    """For --parallel-domains: remember this worker's place, then hide the process group from Trainer."""
    here = world()
    for name in _DISTRIBUTED_ENV:
        os.environ.pop(name, None)
    return here


def my_domains(domains: list[str], here: World) -> list[str]:
    return domains[here.rank :: here.size]


def record_failure(out_root: Path, domain: str, here: World, error: Exception) -> None:
    folder = out_root / ".failures"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{domain}.json").write_text(json.dumps({"domain": domain, "worker": here.rank, "error": str(error),
                                                       "type": type(error).__name__}))


def failures(out_root: Path) -> list[dict]:
    folder = out_root / ".failures"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def wait_for_all(out_root: Path, here: World, run_id: str, timeout: float = 86400) -> None:
    """A file barrier: a failed worker waits for the others before exiting non-zero, so the launcher does
    not stop workers that are still training."""
    folder = out_root / ".workers" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(here.rank)).touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < here.size and time.monotonic() < deadline:
        time.sleep(0.5)
