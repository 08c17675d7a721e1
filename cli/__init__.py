"""The `cloakbeam` command line: the top layer. Each command group is one module (`run`, `classify`, `keys`,
`vault`); every command prints errors as one sentence and never a value or key material."""
