"""The README's reference sections are generated from the code; they must match it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from pkg.initializers.config import ENV_VARS

REPO = Path(__file__).resolve().parents[1]


def test_readme_reference_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_docs.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_every_initializer_variable_read_is_documented() -> None:
    """Each name config.py reads with _get/_number/_patterns has an ENV_VARS entry, and nothing more."""
    tree = ast.parse((REPO / "pkg/initializers/config.py").read_text())
    read = {
        node.args[1].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in {"_get", "_number", "_patterns", "_flag"}
        and len(node.args) > 1
        and isinstance(node.args[1], ast.Constant)
    }
    read = {name for name in read if not name.startswith("AWS_")}  # read only to redact them
    # The proxy variables are read by the HTTP stacks themselves (urllib, botocore, huggingface_hub).
    assert read == {var.name for var in ENV_VARS if not var.name.endswith("_PROXY")}


@pytest.mark.fast
def test_readme_and_images_doc_give_one_set_of_commands() -> None:
    """The `docker run` and `kubectl` commands of README.md are those of docs/images.md, and every command of
    both files' bash blocks is run by a named test or says why it is not (tests/images/docs_commands.py)."""
    from tests.images.docs_commands import DOCS, ROOT, bash_commands, podman_flags, who_runs

    shared = [
        [c for c in bash_commands(ROOT / doc) if c.startswith(("docker run", "kubectl "))] for doc in DOCS
    ]
    assert shared[0] == shared[1]
    assert len([c for c in shared[0] if c.startswith("docker run")]) == 5
    unclassified = [c for doc in DOCS for c in bash_commands(ROOT / doc) if who_runs(c) is None]
    assert unclassified == [], "classify these in tests/images/docs_commands.py WHO_RUNS"
    assert podman_flags() == ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
