"""host_memory.return_freed_memory: memory freed by a worker thread (where autograd runs the backward) goes
back to the system instead of staying resident in glibc's heaps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.trainer.conftest import ROOT

SCRIPT = """
import sys, threading
import torch
from pkg.trainer.host_memory import return_freed_memory

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

if sys.argv[1] == "set":
    assert return_freed_memory()
kept = []

def step():  # like a backward: a large block freed, then ~4 MiB tensors freed around small ones kept
    torch.ones(40 << 18).sum()
    freed = []
    for i in range(100):
        freed.append(torch.ones((1 << 20) + i * 1024))
        kept.append(torch.ones(1 << 10))
    del freed

before = rss_mib()
for _ in range(3):
    worker = threading.Thread(target=step)
    worker.start()
    worker.join()
print(round(rss_mib() - before))
"""


def retained_mib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def test_freed_tensors_leave_the_resident_memory():
    # Measured: 844 MiB of the 1.2 GiB freed stays resident by default, 5 MiB with the setting.
    assert retained_mib("default") > 400  # what the setting is for (glibc's default behaviour)
    assert retained_mib("set") < 100


def test_a_threshold_the_user_chose_is_kept(monkeypatch):
    from pkg.trainer.host_memory import return_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_memory() is False


@pytest.mark.fast
def test_a_job_apart_keeps_its_imports_and_raises_its_error_here():
    from pkg.trainer.errors import ConfigError
    from pkg.trainer.host_memory import apart

    assert "tabnanny" not in sys.modules

    def tokenize() -> None:
        import tabnanny  # noqa: F401  (stands for datasets and pyarrow)

    apart(tokenize)
    assert "tabnanny" not in sys.modules

    def bad_rows() -> None:
        raise ConfigError("dataset_dir x: no rows")

    with pytest.raises(ConfigError, match=r"^dataset_dir x: no rows$") as caught:
        apart(bad_rows)
    assert caught.value.exit_code == 2

    with pytest.raises(ZeroDivisionError):  # a bug: the same exception (its traceback printed by the child)
        apart(lambda: 1 / 0)

    def killed() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(RuntimeError, match="failed in its child process"):
        apart(killed)


def test_a_job_apart_runs_torch_after_the_parent_ran_parallel_ops():
    # Without one thread in the child this hangs: libgomp's pool is the parent's, its threads gone.
    script = (
        "import torch\n"
        "from pkg.trainer.host_memory import apart\n"
        "torch.set_num_threads(2); a = torch.randn(1000, 1000); (a @ a).sum(); torch.randn(10**7).sum()\n"
        "apart(lambda: torch.randn(10**7).sum())\n"
        "print('done')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
