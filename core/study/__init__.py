"""Studies (``rlm experiment``, ``rlm merge-eval``): configs and presets, the plan of steps, the step graph,
the step functions and the report."""
