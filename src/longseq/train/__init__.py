"""The trainer behind `longseq train`: config (config.py), engine (FSDP2, AdamW, schedule), loop, checkpoints,
metrics, the embedded demo and process launching. See docs/train.md."""
