"""Dataset readers: ImageNet layouts, Parquet shards and the embedded demo set, plus preprocessing."""
