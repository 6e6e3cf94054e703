"""Step 9b on a Ray cluster: `driver` carries out a plan in blocks on `worker.BlockWorker`
actors. Nothing here imports Ray until a run uses it."""
