"""Launch settings measured by `python -m benchmarks.tune` on a GPU (generated; edit by rerunning it).

TUNED maps a launch key (`flash_attention.tuning_key`: kernel, sm, dtype, head width, phase) to the
keyword arguments of the fastest candidate measured for it. A key that is absent uses the
kernel's heuristics. Nothing has been measured yet: every launch uses the heuristics.
"""

TUNED: dict[str, dict[str, int]] = {}
