"""Refinery's contract and client, without the server (the refinery-client distribution).

- `refinery.v1`: the protobuf and gRPC code generated from `proto/refinery/v1/` (scripts/gen_proto.py);
- `refinery.contract`: the `.proto` files themselves, for generating clients in other languages;
- `refinery.client`: a small typed client for `GenerationService.Generate`.
"""
