"""The exporter's run: config -> select the outputs -> upload (S3, Hub or a volume) -> register (optional).

Exit codes as the initializers': 0 success, 1 an expected error (one line on stderr), 2 an unexpected bug
(redacted traceback), 130 interrupted, 143 stopped by SIGTERM; a rerun resumes.
"""

from __future__ import annotations

import time
from typing import Any

from pkg.initializers.process import run_main
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


def main() -> int:
    """Entry point of `python -m pkg.model_exporter`; returns the exit code."""

    def body() -> None:
        if nothing_to_export():
            log("no STORAGE_URI: nothing to export (set STORAGE_URI on this step to export the run)")
            return
        run(load_export_config())

    return run_main(body, "rerun to resume (what was uploaded is kept)")
