"""Experiments over the whole system: the built-in demo dataset (`demo_data`), the demo's five variants on one budget
(`demo`, `make demo`) and the fusion sweeps (`ablation`, `make ablation`)."""
