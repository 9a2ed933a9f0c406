"""The pipeline's stages as plain Python callables over column batches; Ray Data runs them (run/dataset.py), but
nothing here imports Ray, so tests call them directly. Each declares the columns it `reads`.

- `Preprocess` (CPU): media -> uint8 tiles and media facts.
- `Generate` / `Score` (a model replica): output rows with answers / label probabilities.
- `WriteShards`: Parquet shards, one stats row per shard.
"""
