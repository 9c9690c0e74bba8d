"""Generated from proto/refinery/v1 by scripts/gen_proto.py; do not edit."""
