"""The shared core every layer may use: the compiled policy model and section registry, run statistics,
run-time configuration references, filesystem helpers and the progress side channel.

Nothing here imports Beam, opens a key or reads a record value.
"""
