"""The exact two-stage generation: the split, the samplers, the runner, previews and image encoding."""
