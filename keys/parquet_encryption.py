"""Policy section `parquet_encryption`: Parquet modular encryption of whole output columns.

    parquet_encryption:
      footer_key: default            # KEK name that protects the footer key (default "default")
      plaintext_footer: true         # default true: readers without keys still see the schema and row counts
      columns:                       # KEK name -> output column paths encrypted with a column key under it
        pme-health: [diagnosis]
        default: [income]

Files are written with `pyarrow.parquet.encryption` (parquet-cpp): AES_GCM_V1, 256-bit data keys
(`data_key_length_bits=256`) and SINGLE wrapping (`double_wrapping=False`): each data key is wrapped directly by
our `KmsClient`, which calls the same KEK provider as the rest of cloakbeam (local keyring AES-256-GCM or a
KMS). Double wrapping is off on purpose: parquet-cpp would then wrap data keys under its own
intermediate KEKs (128-bit by default) instead of ours. The wrapping material is stored inside each file
(`internal_key_material=True`).

`writer_kwargs(ctx)` builds {"encryption_properties": ...} in the worker (never pickled);
`reader_kwargs(key_service)` gives an authorized reader {"decryption_properties": ...}.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

import pyarrow.parquet.encryption as pe

from cloakbeam.core.policy import register_section
from cloakbeam.errors import KeyAccessError, PolicyError

SECTION = "parquet_encryption"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_AAD = b"cloakbeam-parquet-key/v1\x00"


class CloakbeamKmsClient(pe.KmsClient):
    """parquet-cpp KmsClient backed by a KeyService's KEK provider. Wrapped form: "cb1:<version>:<b64>"."""

    def __init__(self, key_service: Any) -> None:
        super().__init__()
        self._ks = key_service

    def __reduce__(self):  # noqa: D105
        raise TypeError("a KmsClient holds a key service and cannot be pickled")

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        version, wrapped = self._ks.wrap_with_kek(master_key_identifier, bytes(key_bytes), _AAD + master_key_identifier.encode())
        return f"cb1:{version}:{base64.b64encode(wrapped).decode()}"

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        try:
            tag, version, b64 = str(wrapped_key).split(":", 2)
            if tag != "cb1":
                raise ValueError
            wrapped = base64.b64decode(b64)
        except ValueError:
            raise KeyAccessError(f"Parquet key material for key '{master_key_identifier}' is not in cloakbeam's format") from None
        return self._ks.unwrap_with_kek(master_key_identifier, version, wrapped, _AAD + master_key_identifier.encode())


def crypto_factory(key_service: Any) -> pe.CryptoFactory:
    return pe.CryptoFactory(lambda _config: CloakbeamKmsClient(key_service))


class ParquetEncryptionSection:
    """Compiled `parquet_encryption` section. Holds names only; key objects are built per worker."""

    def __init__(self, footer_key: str, columns: Mapping[str, list[str]], plaintext_footer: bool) -> None:
        self.footer_key = footer_key
        self.columns = {k: list(v) for k, v in columns.items()}
        self.plaintext_footer = plaintext_footer
        self._cache: dict[int, tuple[Any, pe.CryptoFactory]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"footer_key": self.footer_key, "columns": self.columns, "plaintext_footer": self.plaintext_footer, "_cache": {}}

    def encryption_config(self) -> pe.EncryptionConfiguration:
        return pe.EncryptionConfiguration(
            footer_key=self.footer_key,
            column_keys=self.columns,
            encryption_algorithm="AES_GCM_V1",
            plaintext_footer=self.plaintext_footer,
            double_wrapping=False,
            internal_key_material=True,
            data_key_length_bits=256,
        )

    def _factory(self, key_service: Any) -> pe.CryptoFactory:
        hit = self._cache.get(id(key_service))
        if hit is None or hit[0] is not key_service:
            hit = (key_service, crypto_factory(key_service))
            self._cache = {id(key_service): hit}
        return hit[1]

    def writer_kwargs(self, ctx: Any) -> dict[str, Any]:
        """Keyword arguments for `pq.ParquetWriter` (fresh data keys per file), built from `ctx.keys`."""
        ks = ctx.keys
        props = self._factory(ks).file_encryption_properties(pe.KmsConnectionConfig(), self.encryption_config())
        return {"encryption_properties": props}

    def report(self, run_stats: Any = None) -> dict[str, Any]:
        return {
            "algorithm": "AES_GCM_V1",
            "data_key_bits": 256,
            "double_wrapping": False,
            "plaintext_footer": self.plaintext_footer,
            "footer_key": self.footer_key,
            "columns": {k: sorted(v) for k, v in sorted(self.columns.items())},
        }


def reader_kwargs(key_service: Any) -> dict[str, Any]:
    """Keyword arguments for `pq.read_table` / `pq.ParquetFile` for a reader with access to the KEKs."""
    props = crypto_factory(key_service).file_decryption_properties(pe.KmsConnectionConfig(), pe.DecryptionConfiguration())
    return {"decryption_properties": props}


def _compile(value: Any, schema: Any, policy: Any) -> ParquetEncryptionSection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PolicyError("'parquet_encryption' must be a mapping with 'columns' (KEK name -> list of columns)")
    unknown = sorted(set(value) - {"footer_key", "plaintext_footer", "columns"})
    if unknown:
        raise PolicyError(f"parquet_encryption: unknown key '{unknown[0]}'; allowed: columns, footer_key, plaintext_footer")
    footer = value.get("footer_key", "default")
    if not isinstance(footer, str) or not _NAME.match(footer):
        raise PolicyError("parquet_encryption.footer_key must be a key name of letters, digits, '.', '_' or '-'")
    plaintext = value.get("plaintext_footer", True)
    if not isinstance(plaintext, bool):
        raise PolicyError("parquet_encryption.plaintext_footer must be true or false")
    cols = value.get("columns")
    if not isinstance(cols, dict) or not cols:
        raise PolicyError("parquet_encryption.columns must map a KEK name to a list of output columns")
    outputs = set(policy.output_actions)
    seen: dict[str, str] = {}
    for key, paths in cols.items():
        if not isinstance(key, str) or not _NAME.match(key):
            raise PolicyError(f"parquet_encryption.columns: '{key}' is not a valid key name")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise PolicyError(f"parquet_encryption.columns.{key} must be a non-empty list of column paths")
        for p in paths:
            if p not in outputs:
                why = "is dropped by the policy" if p in schema.fields else "is not in the schema"
                raise PolicyError(f"parquet_encryption.columns.{key}: column '{p}' {why}; list only columns that reach the output")
            if p in seen:
                raise PolicyError(f"parquet_encryption: column '{p}' is listed under both '{seen[p]}' and '{key}'")
            seen[p] = key
        cols[key] = list(paths)
    return ParquetEncryptionSection(footer, cols, plaintext)


register_section(SECTION, _compile)
