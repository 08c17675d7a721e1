"""Beam graph assembly and launch: build the protect graph, run it on a runner profile, write and sign the manifest."""
