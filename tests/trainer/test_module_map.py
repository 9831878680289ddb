"""pkg/trainer/__init__.py's module map names every module of the package, and only those (the fast tier)."""

from __future__ import annotations

import pkgutil
import re

import pytest

import pkg.trainer

pytestmark = pytest.mark.fast


def test_the_module_map_is_complete():
    modules = {m.name for m in pkgutil.iter_modules(pkg.trainer.__path__)}
    listed = set(re.findall(r"^    (\w+) ", pkg.trainer.__doc__, re.M))
    assert listed == modules, f"missing: {sorted(modules - listed)}, gone: {sorted(listed - modules)}"
