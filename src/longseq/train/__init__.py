"""The trainer behind `longseq train`: config (config.py sections, config_loader.py), preflight checks, engine (model,
FSDP2, AdamW, schedule), loop and evaluation, checkpoints and where to resume (Note [Resuming]), stop signals (Note
[Stopping without losing work]), metrics, the embedded demo and the --nproc launcher. See docs/train.md."""
