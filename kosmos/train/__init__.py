"""Training under DeepSpeed ZeRO: config, engine, checkpoints with exact resume, metrics, the run folder.

Loading a trained model for evaluation, generation and export is `kosmos.checkpoint`.
"""
