"""Connectors: one system per module, behind the source and sink protocols
(re-exported from :mod:`sluiceway.operators.sources` and ``.sinks``)."""

import importlib

from sluiceway.operators.errors import SinkError

DEFAULT_LOG_DIR = "./.sluiceway-log"  # the durable log's folder when none is named (here: the CLI imports it light)


def requires(module: str, who: str, extra: str):
    """Import ``module``, which connector ``who`` needs; when it is missing,
    a :class:`~sluiceway.operators.errors.SinkError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SinkError(f"{who} needs the {module} package: pip install 'sluiceway[{extra}]'") from None


def lazy_exports(module: str, names: dict[str, str]):
    """A module ``__getattr__`` that imports each of ``names`` (name ->
    connector module) on first use, so ``operators.sources`` and ``.sinks``
    re-export connectors without importing their dependencies up front."""

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    __getattr__.__doc__ = "Connectors re-exported here (imported on first use): " + ", ".join(names)
    return __getattr__
