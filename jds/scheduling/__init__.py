"""The scheduling policy: which requests run together, where, and at what shape."""
