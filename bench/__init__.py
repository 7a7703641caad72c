"""What the benchmarks measure with: timing and CPU accounting (`timing`, `loader`), the baselines the system is
compared against (`perfile`), synthetic inputs (`photo_clips`, `photo_split`), and each benchmark's measurements:
`model` (FLOPs per variant, MBT against its encoders), `train` (loader-fed against synthetic-fed training),
`pipeline` (the loaders against the decode bound and the naive and per-file loaders), `preprocess` (the shard job
against bare ffmpeg) and `gpu_check` (the GPU check's parts). The `tools/bench_*.py` scripts, `tools/model_report.py`
and `tools/gpu_check.py` are thin command lines over these."""
