"""The exporter's run: config -> select the outputs -> upload (S3, Hub or a volume) -> register (optional).

Exit codes as the initializers': 0 success, 1 an expected error (one line on stderr), 2 an unexpected bug
(redacted traceback), 130 interrupted, 143 stopped by SIGTERM; a rerun resumes.
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from typing import Any

from pkg.initializers.errors import InitializerError, one_line, redact
from pkg.initializers.progress import human_bytes, log
from pkg.initializers.uri import HfUri, S3Uri

from .card import describe_run
from .config import ExportConfig, load_export_config, nothing_to_export
from .outputs import select

FORMAT = 1


def run(config: ExportConfig) -> dict[str, Any]:
    """Export; returns where it went (destination URI, and for the Hub the commit)."""
    selection = select(config.source_path, config.export)
    log(
        f"exporting {selection.what} ({len(selection.files)} files, {human_bytes(selection.total_bytes)}) "
        f"from {selection.root} to {config.shared.uri}"
    )
    run_info = describe_run(config.source_path, selection)
    manifest = {
        "format": FORMAT,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": run_info,
        "total_files": len(selection.files),
        "total_bytes": selection.total_bytes,
    }
    uri = config.shared.uri
    result: dict[str, Any] = {"uri": str(uri)}
    if isinstance(uri, S3Uri):
        from .s3 import S3Export

        exporter = S3Export(config)
        try:
            exporter.export(selection, manifest)
        finally:
            exporter.close()
    elif isinstance(uri, HfUri):
        from .hub import export_hub

        result.update(export_hub(config, selection, run_info))
    else:
        from .local import export_local

        export_local(config, selection, manifest)
    if config.registry_url:
        from .registry import register

        register(config, selection, run_info, result)
    return result


class Terminated(BaseException):
    """SIGTERM arrived (the pod is being stopped)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main() -> int:
    """Entry point of `python -m pkg.model_exporter`; returns the exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if nothing_to_export():
            log("no STORAGE_URI: nothing to export (set STORAGE_URI on this step to export the run)")
            return 0
        run(load_export_config())
        return 0
    except InitializerError as exc:
        print(f"error: {one_line(exc, 1000)}", file=sys.stderr, flush=True)
        return exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:
        print("error: interrupted; rerun to resume (what was uploaded is kept)", file=sys.stderr, flush=True)
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # a bug: keep the trace for the report, minus secrets
        print(redact(traceback.format_exc()), file=sys.stderr, flush=True)
        print(f"error: unexpected {type(exc).__name__}: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
