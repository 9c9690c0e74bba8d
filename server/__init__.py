"""Refinery's gRPC server: validation, scheduling, the two-stage runner, streaming, health, metrics, CLI."""
