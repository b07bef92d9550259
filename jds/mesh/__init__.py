"""Placements: which devices run which phase, how each phase is sharded, and pipeline stages."""
