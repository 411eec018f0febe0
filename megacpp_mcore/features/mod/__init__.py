"""Mixture-of-Depths: a per-token router on an ``A`` or ``E`` layer (gateskip | threshold | topk)."""
