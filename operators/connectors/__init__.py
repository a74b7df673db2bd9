"""Connectors: one system per module, behind the source and sink protocols
(re-exported from :mod:`sluiceway.operators.sources` and ``.sinks``)."""

import importlib

from sluiceway.operators.errors import SinkError


def requires(module: str, who: str, extra: str):
    """Import ``module``, which connector ``who`` needs; when it is missing,
    a :class:`~sluiceway.operators.errors.SinkError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SinkError(f"{who} needs the {module} package: pip install 'sluiceway[{extra}]'") from None
