"""Lightning callbacks: monitors, cache builder, preemption, evaluation (the demos bring their own)."""
