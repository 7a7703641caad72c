"""What the benchmarks measure with: timing and CPU accounting (`timing`, `loader`), the baselines the system is
compared against (`perfile`), and synthetic inputs (`photo_clips`, `photo_split`). The `tools/bench_*.py` scripts and
`tools/gpu_check.py` are thin command lines over these."""
