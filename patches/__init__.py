"""Runtime patches against named upstream versions; nothing is applied on import.

Each module has ``NAME``, ``TARGETS``, ``DESCRIPTION``, ``check()`` (``needed`` |
``fixed-upstream`` | ``target-missing``) and an idempotent ``apply()`` returning what it changed.
"""

REGISTRY = (
    "patches.mla_have_te",
    "patches.mla_down_proj_tp_marker",
)
