"""Downstream training and evaluation loops land with the fine-tuning modes (see README status)."""
