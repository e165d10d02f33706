"""The shard writer: ``python -m pipeline.shards write SRC OUT`` (see :mod:`.write`)."""
