"""The run library: typed run configs, `pretrain(cfg)` and `finetune(cfg)`, the training-step core
both engines share, the run scaffolding, checkpoints of runs and the stage report. Entry scripts and
tests call it; it never imports an entry script."""
