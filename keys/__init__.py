"""Key management: key references, keyrings and KMS providers, envelope encryption. Never logs key bytes."""
