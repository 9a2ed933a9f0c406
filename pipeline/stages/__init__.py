"""The pipeline's stages as plain Python callables over column batches; Ray Data runs them (run/dataset.py), but
nothing here imports Ray, so tests call them directly. Each declares the `Columns` it reads, adds and drops
(`columns(job)`), checked as a chain when the dataset is built (stages/base.check_stages).

- `Preprocess` (CPU): media -> uint8 tiles and media facts.
- `Generate` / `Score` (a model replica): output rows with answers / label probabilities.
- `WriteShards`: Parquet shards, one stats row per shard.
"""
