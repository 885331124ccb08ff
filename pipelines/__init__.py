"""Ray Data pipelines: read image corpora from any fsspec URL, decode on CPU tasks, tokenize on an
actor pool, write Parquet token shards with an error table and a manifest. Uses only the public
tokenizer API of `flextok`."""
