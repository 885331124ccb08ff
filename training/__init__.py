"""Ray Train glue for `flextok train-tokenizer` and `flextok train-generator`: no argparse, no prints.

One concern per module, in dependency order:

    settings   TrainConfig: the run-time settings (architecture lives in the model configs)
    optim      AdamW (decay on matrices only), warm-up + cosine schedule, optimiser state, EMA
    runs       the run folder: layout, newest checkpoint (local or remote), settings a resume must
               repeat, tokenizer provenance
    batching   token-budget micro-batches of a window of token rows: packed, length-bucketed or padded
    data       Ray Datasets of images and token rows, Arrow collates, the per-worker batch stream
    tasks      what is trained: TokenizerTask, GeneratorTask (pure PyTorch hooks)
    trainer    one worker's model, optimiser, EMA and step (no Ray: unit-tested directly)
    loop       the Ray Train worker function: resume, train, checkpoint, log, grids
    driver     run_training: TorchTrainer, resume by re-running, failures, the final model

`jobs/` turn flags into a `TrainConfig` and a task, call `training.driver.run_training`, and print
one summary line.
"""
