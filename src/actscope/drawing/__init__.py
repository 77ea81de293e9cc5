"""Drawing without a plotting library: standalone SVG charts (:mod:`.charts`) and the isolation
of user text from bidirectional control characters (:mod:`.bidi`). Pure Python, no actscope
imports, so every layer that draws (the report, the training tracker's plot) can use it."""
