"""Admission, resolution, placement, batching and the per-device workers with their residency."""
