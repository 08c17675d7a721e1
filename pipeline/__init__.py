"""Beam graph assembly, options, manifest and the `cloakbeam` command line."""
