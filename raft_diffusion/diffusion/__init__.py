"""RAFT for text-to-image diffusion pipelines, over the shared core.

config     RaftConfig: the base config extended with model, sampler, UNet fine-tuning, CLIP evaluation
cli        align, gallery, compare, toyworld, config-help
task       DiffusionTask: the RaftTask (pipeline, pool generation, LoRA/full fine-tuning, held-out evaluation)
pipeline / generate / finetune   loading, seeded sampling, the denoising loss and LoRA save/load
metrics / gallery / compare / tracking   held-out metrics, before/after pages, trackers
toyworld   the toy image world (procedural scenes, small CLIP, miniature SD) and its build
tiny       tiny pipelines built from configs, for tests and smoke runs
"""
