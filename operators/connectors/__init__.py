"""Connectors: one system per module, behind the source and sink protocols
(re-exported from :mod:`sluiceway.operators.sources` and ``.sinks``)."""
