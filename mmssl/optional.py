"""The towers' optional dependencies: timm and transformers (the ``towers`` extra), imported only when a
config asks for a tower of theirs, so that mmssl runs without them otherwise."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

EXTRA = "towers"


class MissingExtra(ImportError, ValueError):
    """An optional package a setting needs is not installed. A ValueError too, so that the CLI reports it
    in one line like any other mistake in a setting."""


def require(module: str, setting: str) -> ModuleType:
    """``module``, imported; when it is not installed, one line naming ``setting`` and the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise  # the package is there but broken: its own traceback says more
        raise MissingExtra(
            f"{setting} needs the {module} package, which is not installed: pip install 'mmssl[{EXTRA}]'"
        ) from None


@contextlib.contextmanager
def quiet_transformers(transformers: ModuleType) -> Iterator[None]:
    """transformers' loading reports and progress bars off while a local model loads (the tower's keys
    are checked by mmssl, and a run's log should not hold a table per rank)."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
