"""Quality: measuring and tuning lossy settings on the model. ``evaluate`` (KL of the
next-token distribution, greedy agreement, perplexity change, beside bits per element),
``calibrate`` (per-layer steps for a target KL), ``baselines`` (fp16, int8, KIVI,
CacheGen as released) and ``demo`` (the main job of ``make demo``).

The top layer: may import everything below it, and nothing imports it but the CLI,
benchmarks and tests.
"""
