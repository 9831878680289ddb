"""file:// destination (a mounted volume): each file copied under a temporary name, its MD5 checked against
the source's, renamed into place; files already there with the same size and MD5 are kept; the manifest
(`.model-exporter/manifest.json`) is removed first and written last, as on S3."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pkg.initializers.blocks import blocks, md5_of
from pkg.initializers.errors import InitializerError
from pkg.initializers.progress import Progress, human_bytes, log
from pkg.initializers.safety import target_path
from pkg.initializers.uri import LocalUri

from .config import ExportConfig
from .outputs import Selection

MANIFEST = ".model-exporter/manifest.json"


def export_local(config: ExportConfig, selection: Selection, manifest: dict[str, Any]) -> dict[str, Any]:
    uri = config.shared.uri
    assert isinstance(uri, LocalUri)
    root = Path(uri.path)
    source = os.path.realpath(selection.root)
    if os.path.realpath(root) == source or os.path.realpath(root).startswith(source + os.sep):
        raise InitializerError(f"STORAGE_URI {uri} is inside the folder being exported; pick another")
    marker = root / MANIFEST
    try:
        marker.unlink(missing_ok=True)
    except OSError as exc:
        raise InitializerError(f"cannot write to {root}: {exc.strerror}; check the volume") from None
    interval = config.shared.tuning.progress_interval
    progress = Progress(len(selection.files), selection.total_bytes, interval).start()
    entries, kept = [], 0
    try:
        for f in selection.files:
            target = target_path(root, f.path)
            digest = md5_of(f.source).hexdigest()
            if target.is_file() and target.stat().st_size == f.size and md5_of(target).hexdigest() == digest:
                kept += 1
            else:
                _copy(f.source, target, digest)
            entries.append({"path": f.path, "size": f.size, "etag": digest})
            progress.add_bytes(f.size)
            progress.file_done()
    except OSError as exc:
        raise InitializerError(f"cannot write to {root}: {exc.strerror}; check the volume") from None
    finally:
        progress.close()
    manifest = {**manifest, "files": entries}
    tmp = marker.with_name(marker.name + ".tmp")
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, marker)
    log(
        f"copied {len(entries) - kept} files ({human_bytes(selection.total_bytes)} in all), {kept} already "
        f"there, to {root}; manifest {marker} written last"
    )
    return manifest


def _copy(source: Path, target: Path, digest: str) -> None:
    tmp = target.with_name(f".{target.name}.partial")
    with open(tmp, "wb") as out:
        for block in blocks(source):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    if md5_of(tmp).hexdigest() != digest:
        tmp.unlink()
        raise InitializerError(f"the copy of {source} to {target} does not match it (a failing disk?); rerun")
    os.replace(tmp, target)
