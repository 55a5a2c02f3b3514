"""Checkpoints: layout and checks, durable saving, resuming, state dicts and exports."""
