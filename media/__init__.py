"""Reading media under the workers' rules: local paths under allowed roots, URLs behind an SSRF guard, object stores,
containers (shards, Parquet, Arrow, 🤗 datasets), and decoding with byte, pixel and time caps. No torch."""
