"""Fault injection for tests/reliability: a test puts this directory on one worker process's
PYTHONPATH, and with `GATT_FAULT=hang_in_sampling` the engine's sampling then blocks for ever while
the process, and its heartbeat thread, live on: what a hung engine looks like from outside.

The engine module is patched when it is first imported (not here, at start-up, before the
worker's own directory is on `sys.path`)."""

from __future__ import annotations

import os
import sys
import threading
from importlib.abc import MetaPathFinder

TARGET = "workers.engine.pipeline"


def _hang(*args: object, **kwargs: object) -> None:
    threading.Event().wait()


class _PatchOnImport(MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def patched(module):  # noqa: ANN001, ANN202
            exec_module(module)
            module.sample_dialogues = _hang

        spec.loader.exec_module = patched
        return spec


if os.environ.get("GATT_FAULT") == "hang_in_sampling":
    sys.meta_path.insert(0, _PatchOnImport())
