"""Modality-agnostic core: adapters protocol, taps, projections, objectives, schedules,
pairing, alignment engine, trainer loop, checkpoints, config. Imports torch/omegaconf only."""
