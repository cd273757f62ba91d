"""Training under DeepSpeed ZeRO: config, engine, checkpoints with exact resume, metrics.

`kosmos.train.checkpoint.load_model_from_checkpoint(path)` gives the model, tokenizer and model
config of a run folder or checkpoint (ZeRO shards consolidated) for evaluation and export.
"""
