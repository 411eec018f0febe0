"""Runtime patches against named upstream versions (see each module's NAME / TARGETS / check / apply)."""

REGISTRY = ("patches.megatron_lm_shared_mtp",)
