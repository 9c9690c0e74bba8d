"""The `refinery` command line: `serve`, `generate` and `models` (see `main.py`)."""
