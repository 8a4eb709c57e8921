"""Data: dataset sources, decoding, face cropping, shards, validation and the loader."""
