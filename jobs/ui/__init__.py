"""``sluiceway ui``: a read-only web page per job, and the JSON API behind it.

- :mod:`.model` reads what the page shows from checkpoint storage (and a
  cluster's supervisors when one answers);
- :mod:`.server` serves the pages, the static files (uPlot for the charts,
  shipped with its license under ``static/vendor/``) and ``/api/``.
"""
