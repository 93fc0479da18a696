"""Stable Diffusion adapter: pipeline loading, pool generation and UNet (LoRA) fine-tuning."""
