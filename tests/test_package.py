"""The package's public names: each one is the object its module defines, reported as `bemi_asgi.NAME`, and
importing the package loads none of them until used (the worker and the CLI start without the web framework)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import bemi_asgi


@pytest.mark.parametrize("name", bemi_asgi.__all__)
def test_each_exported_name_is_its_modules_object(name: str) -> None:
    """`bemi_asgi.NAME` is the object its module defines, and says it is `bemi_asgi.NAME`."""
    module = bemi_asgi._MODULES[name]
    value = getattr(bemi_asgi, name)
    assert value is getattr(importlib.import_module(module, "bemi_asgi"), bemi_asgi._DEFINED_AS.get(name, name))
    if isinstance(value, type) or callable(value):
        assert value.__module__ == "bemi_asgi"  # `bemi_asgi.Bemi` in reprs and docs, not where it is defined


def test_every_export_is_listed_once() -> None:
    """`__all__` and the lazy table name the same names; an unknown name is an AttributeError."""
    assert sorted(bemi_asgi._MODULES) == sorted(bemi_asgi.__all__)
    assert len(set(bemi_asgi.__all__)) == len(bemi_asgi.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = bemi_asgi.Nope  # type: ignore[attr-defined]


def test_the_worker_starts_without_the_web_framework_or_the_query_models() -> None:
    """A fresh interpreter importing the CLI and the worker loads neither Starlette, FastAPI, pydantic nor the
    query side."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, bemi_asgi.cli, bemi_asgi.worker.pipeline; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "bemi_asgi.worker.pipeline" in loaded
    assert not {"starlette", "fastapi", "pydantic", "bemi_asgi.history.models"} & set(loaded)
