"""`python -m pkg.trainer.launch`, the llm-trainer image's entry point and the llm-* runtimes' command:
torchrun's launch of pkg.trainer, where an expected error is the worker's one line and nothing else."""

from __future__ import annotations

import pytest

from pkg.trainer import launch
from tests.trainer.conftest import BASE_ARGS, PYTHON, cli, finish, start, trainer_env


def test_an_expected_error_is_one_line_without_torchrun_report(tmp_path, alpaca_data):
    """Two workers as a runtime's node starts them (PET_* only): the missing model is rank 0's one line;
    torchrun's ChildFailedError report and its "failed (exitcode ...)" lines are not printed."""
    args = {
        **BASE_ARGS,
        "model_dir": tmp_path / "no-model",
        "dataset_dir": alpaca_data,
        "output_dir": tmp_path / "o",
    }
    env = trainer_env(PET_NPROC_PER_NODE="2", PET_NNODES="1")
    env.pop("OMP_NUM_THREADS")  # the launcher sets it as torchrun does, without torchrun's warning line
    result = finish(start([PYTHON, "-m", "pkg.trainer.launch", *cli(args)], env), 240)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "does not exist: run the model initializer" in lines[0]
    for noise in ("Traceback", "ChildFailedError", "To enable traceback", "exitcode"):
        assert noise not in result.stdout + result.stderr


@pytest.mark.fast
def test_gpu_processes_without_a_gpu_say_so(monkeypatch, capsys):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("this node has a GPU")
    monkeypatch.setenv("PET_NPROC_PER_NODE", "gpu")
    assert launch.main(["--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: PET_NPROC_PER_NODE=gpu") and "no GPU" in err and "\n" not in err, err
    monkeypatch.setenv("PET_NPROC_PER_NODE", "auto")  # auto: the GPUs present, else one process
    assert launch.launch_args([]).nproc_per_node == "1"


@pytest.mark.fast
def test_leading_torchrun_flags_go_to_torchrun():
    argv = ["--nproc-per-node", "2", "--master-port=29511", "--max-steps", "3", "--nnodes", "x"]
    assert launch.launcher_flags(argv) == 3  # from --max-steps on: the trainer's (even a torchrun-like flag)
    assert launch.launcher_flags(["--config", "job.yaml"]) == 0
    args = launch.launch_args(argv[:3])
    assert (args.nproc_per_node, args.master_port) == ("2", 29511)
