"""Example jobs: each a job file for ``sluiceway run`` and a module with ``build()``."""


def flow_on_demand(module: str, build):
    """A module ``__getattr__`` that builds ``flow`` when a job file loader asks
    for it, not at import: the example's topic, stream or table must exist by then.

    >>> getattr_ = flow_on_demand("example", lambda: "the flow")
    >>> getattr_("flow")
    'the flow'
    """

    def __getattr__(name: str):
        if name == "flow":
            return build()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
