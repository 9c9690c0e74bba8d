"""Fakes of the remote services the model store talks to: real HTTP servers on 127.0.0.1, in threads."""
