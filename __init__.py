"""cloakbeam: raw records in, classified and policy-protected training Parquet out.

The repository root is this package; each top-level folder is a subpackage (`cloakbeam.pipeline`,
`cloakbeam.transforms`, `cloakbeam.keys`, ...). Importing `cloakbeam` must stay cheap: no Beam import here.
"""

__version__ = "0.1.0"
