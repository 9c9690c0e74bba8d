"""The gRPC edge: servicers, proto <-> domain conversion, and the one error boundary."""
