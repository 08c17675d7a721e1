"""Key management: key references, keyrings and KMS providers, envelope encryption. Never logs key bytes.

Modules: `service` (KeyRef, KeyService, open_key_service, init/ensure keyring, wrapped-key records),
`keyring` (keyring file + local KEK provider), `kms` (aws-kms, gcp-kms, vault-transit), `cells` (cell format
and the column kernel), `decrypt` (role-checked decrypt, rewrap), `signing` (signed manifest, verify),
`quarantine` (sealed quarantine records), `parquet_encryption` (policy section), `roles`, `cli`.
See docs/keys-and-encryption.md.
"""
