"""DMA analytics as pure polars/numpy functions: MNF and night use (``night_flow``, ``night_use``),
FAVAD (``favad``), daily results (``daily``), leak events (``leak_events``; the single-episode
``leak_detection`` before it) and the water balance (``water_balance``). No I/O."""
