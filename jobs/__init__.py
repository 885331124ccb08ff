"""Thin entrypoints for `ray job submit` and the `flextok` console script.

Each job is `python -m jobs.<name>` with `main(argv=None) -> int`; nothing runs at import and no job
imports another job. Shared glue: `jobs.cli_util` (argument and error handling) and `jobs.train_flags`
(the training jobs' common flags); the Ray Train machinery itself is the `training` package.
"""
