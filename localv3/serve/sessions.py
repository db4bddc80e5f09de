"""How many conversations the server can keep cached: each kept session holds a full-context
KV cache, and the plan reserved memory for one. More fit where the plan left room for them."""

from __future__ import annotations


def sessions_that_fit(engine, most: int) -> int:
    """1 plus the extra full-context caches the plan's free memory holds on every device that
    keeps part of the cache, at most `most`; 1 for an engine without a plan (nothing to go by)."""
    plan = getattr(engine, "plan", None)
    if plan is None:
        return 1
    fits = most
    for device, size in plan.kv_cache.device_bytes.items():
        use = plan.device(device)
        free = use.free_bytes if use is not None else None
        if free is not None and size > 0:
            fits = min(fits, 1 + max(free, 0) // size)
    return max(fits, 1)
