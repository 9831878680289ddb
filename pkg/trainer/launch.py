"""The llm-trainer image's launcher: torchrun's launch of `pkg.trainer`, where an expected error is one line.

    python -m pkg.trainer.launch [TORCHRUN FLAGS] [TRAINER FLAGS]   # ENTRYPOINT, llm-* runtimes

Leading torchrun flags (`--nproc-per-node 2`, `--nnodes 2`, `--rdzv-endpoint HOST:PORT` ...) go to torchrun;
everything from the first other argument on goes to the trainer. Without flags, torchrun reads PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT as the Kubeflow torch plugin sets them.

`torchrun -m pkg.trainer` launches the same workers, but when one fails torchrun's own command prints a
ChildFailedError report and a traceback (about 40 lines) after the worker's `error:` line. Here torchrun's
`run()` is called in this process, as `tune run` calls it, and a failed worker becomes its exit code: the
worker's one line is all that is printed. `--nproc-per-node gpu` (or `auto`) on a node without a GPU is
answered in one line too, where torchrun would raise `ValueError: Cuda is not available`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from pkg.trainer.errors import ConfigError, TrainerError

MODULE = "pkg.trainer"


def local_processes(value: str) -> int:
    """torchrun's --nproc-per-node: a number; `auto`, the GPUs present, else 1 (not the CPU count); `gpu`,
    the GPUs present, refused on a node without one."""
    if value in ("auto", "gpu"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
        if value == "gpu":
            raise ConfigError(
                "PET_NPROC_PER_NODE=gpu (--nproc-per-node gpu) starts one process per GPU, and this node has "
                "no GPU: run on a GPU node (docker: --gpus all), or give a number of processes, e.g. 1"
            )
        return 1
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"nproc per node {value!r}: expected a number, auto or gpu") from None
    if n < 1:
        raise ConfigError(f"nproc per node must be >= 1, got {n}")
    return n


def num_nodes(nnodes: str) -> int:
    """torchrun's --nnodes (`2`, or `2:2`; an elastic range such as `1:4` is refused)."""
    low, _, high = str(nnodes).partition(":")
    if high and high != low:
        raise ConfigError(f"--nnodes {nnodes}: elastic ranges are not supported; give one number")
    try:
        return int(low)
    except ValueError:
        raise ConfigError(f"--nnodes {nnodes!r}: expected a number of nodes") from None


def launcher_flags(argv: list[str]) -> int:
    """How many arguments at the start of argv are torchrun's flags (with their values)."""
    from torch.distributed.run import get_args_parser

    options = get_args_parser()._option_string_actions
    i = 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        action = options.get(flag)
        if action is None or flag in ("-h", "--help", "-m", "--module", "--no-python", "--no_python"):
            break
        i += 1 if action.nargs == 0 or "=" in argv[i] else 2
    if i > len(argv):
        raise ConfigError(f"launcher flag {argv[-1]} needs a value")
    return i


def launch_args(launcher: list[str]) -> Any:
    """torchrun's parsed arguments for these launcher flags (PET_* variables apply as torchrun does)."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args([*launcher, "-m", MODULE])
    args.nproc_per_node = str(local_processes(str(args.nproc_per_node)))
    flags = {arg.split("=", 1)[0].replace("_", "-") for arg in launcher}
    endpoint = args.rdzv_endpoint or flags & {"--master-addr", "--master-port"}
    endpoint = endpoint or {"PET_MASTER_ADDR", "PET_MASTER_PORT"} & set(os.environ)
    if not endpoint and not args.standalone:
        if num_nodes(args.nnodes) != 1:
            raise ConfigError(
                f"{args.nnodes} nodes need --rdzv_endpoint=HOST:PORT (the Trainer controller adds it)"
            )
        args.standalone = True  # one node: a free local port, nothing to agree on
    return args


def run_workers(args: Any, trainer_args: list[str]) -> int:
    """Run torchrun's launch of `pkg.trainer` with these arguments; the workers' exit code, or 128 + the
    signal that stopped the launch. The workers print their own errors (rank 0 its one line)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    args.training_script_args = trainer_args
    if int(args.nproc_per_node) > 1:  # what torchrun sets then, without its warning line
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Its "failed (exitcode: N)" and "Sending process ... closing signal" lines repeat what the worker said.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:  # the workers said why (rank 0's one line); pass their exit code on
        failures = sorted(exc.failures.items())
        codes = [f.exitcode for _, f in failures]
        killed = [(rank, f) for rank, f in failures if f.exitcode < 0]
        if killed and not any(c > 0 for c in codes):  # no worker lived to say why
            rank, failure = killed[0]
            print(
                f"error: worker rank {rank} was killed by {failure.signal_name()} (out of memory? see the "
                "pod's events and memory limit)",
                file=sys.stderr,
                flush=True,
            )
            return 128 - failure.exitcode
        return next((c for c in codes if c > 0), 1)
    except SignalException as exc:  # SIGTERM (eviction): the workers checkpointed and stopped
        print(f"stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stdout)  # fmt: skip
    if any(arg in ("-h", "--help") for arg in argv):  # the trainer's flags, without starting workers
        from pkg.trainer.config import load_config

        try:
            load_config(["--help"])
        except SystemExit as exc:
            print(exc.code if isinstance(exc.code, str) else "")
        return 0
    try:
        n = launcher_flags(argv)
        args = launch_args(argv[:n])
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return run_workers(args, argv[n:])


if __name__ == "__main__":
    sys.exit(main())
