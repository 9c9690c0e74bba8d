"""The server's ground floor: what every room above it shares and nothing in it imports from above.

`domain` (a request and its events, as plain values), `errors` (the server's exceptions), `settings` (the one
settings object), `logs`, `metrics` (the Prometheus registry; gauges of live state are registered by the room
that owns the state) and `pins` (pin failures). Rooms above: `generation`, `scheduling`, `api`, `cli`, and
`server.app` at the top, which wires them together.
"""
