#!/bin/bash
# Shard AudioSet-2M (unbalanced_train_segments.csv) as an AWS Batch array job: each child job shards every N-th
# shard of the split's one plan into the same output folder on a shared filesystem (EFS, FSx); the child that
# finishes the last part writes manifest.json. AWS Batch gives each child AWS_BATCH_JOB_ARRAY_INDEX (0..size-1),
# which the tool reads as --job-index; --num-jobs must equal the array size. With a job queue and a job definition
# whose image holds this repository (its .venv and ffmpeg) at /app and the data at /data:
#   QUEUE=my-queue DEFINITION=mbt tools/aws_batch/shard_audioset.sh
# Failed children: submit the same command again with --array-properties size=N (finished shards are kept, every
# child resumes its part), then run tools/merge_manifests.py on the folder if the manifest is still missing.
set -euo pipefail

NUM_JOBS=${NUM_JOBS:-100}
aws batch submit-job \
    --job-name shard-audioset \
    --job-queue "${QUEUE:?name the job queue}" \
    --job-definition "${DEFINITION:?name the job definition}" \
    --array-properties "size=$NUM_JOBS" \
    --container-overrides "$(cat <<JSON
{"vcpus": 8, "memory": 16384,
 "command": [".venv/bin/python", "tools/shard_audioset.py", "--num-jobs", "$NUM_JOBS",
             "--segments", "/data/audioset/unbalanced_train_segments.csv",
             "--labels", "/data/audioset/class_labels_indices.csv", "--videos", "/data/audioset/videos",
             "--out", "/data/shards/audioset/unbalanced_train", "--workers", "8", "--quiet"]}
JSON
)"
