"""Entry point: `torchrun -m pkg.trainer [--config FILE.yaml] [--key value ...]` or `python -m pkg.trainer`.

Expected failures (bad config, model or dataset) print one line and exit non-zero without a traceback; under
torchrun only rank 0 prints it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from model_dir and dataset_dir
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # bitsandbytes (in the CUDA image and the dev install) warns at import, on CPUs with AVX512-BF16, that it
    # could not fetch an optional 4-bit kernel from the Hub; its own CPU kernel runs instead, and the trainer
    # is offline by design: the line is noise on every run.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import huggingface_hub.utils
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    from pkg.trainer.host_memory import return_freed_memory

    return_freed_memory()
    main_rank = os.environ.get("RANK", "0") == "0"
    setup_logging(main_rank)
    from pkg.trainer.config import load_config
    from pkg.trainer.disk_space import disk_full
    from pkg.trainer.errors import TrainerError

    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        from pkg.trainer.recipe import Recipe

        Recipe(cfg).run()
    except TrainerError as exc:
        if main_rank:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (inside it, it checkpoints: resilience.py)
        if main_rank:
            print(
                "error: interrupted (Ctrl-C); rerun the job to resume from its last checkpoint",
                file=sys.stderr,
            )
        return 130
    except OSError as exc:
        if not disk_full(exc):
            raise
        if main_rank:  # wherever it happens: what was being written and what to do
            print(
                f"error: no space left writing {exc.filename or 'a file'} ({exc.strerror}): free space on "
                "that volume, or give output_dir a larger one, then rerun (it resumes)",
                file=sys.stderr,
                flush=True,
            )
        return 1
    except SystemExit as exc:  # --help
        if isinstance(exc.code, str):
            if main_rank:
                print(exc.code)
            return 0
        raise
    return 0


if __name__ == "__main__":
    code = main()
    from pkg.trainer.distributed import exit_process

    exit_process(code)  # not sys.exit: see exit_process for the abort a normal exit can hit
