"""KEK providers backed by an external KMS: `aws-kms` (boto3), `gcp-kms` (google-cloud-kms), `vault-transit` (hvac).

All share one model (`RemoteKekProvider`): a KEK name ("default", or the `key:` of an encrypt action) has
versions 1, 2, ...; each version is one handle in the KMS (an AWS KMS key, a GCP CryptoKeyVersion, a Vault
transit key version). The keyring file records the handles and their state (no secrets); `rotate` creates a
new handle, `retire` disables it in the KMS and marks it retired, after which cloakbeam refuses to use it
(and the KMS would refuse too). Every wrap binds the caller's associated data (AWS: encryption context with the
SHA-256 of the AAD; GCP: additionalAuthenticatedData; Vault: associated_data).

KeyRef params (non-secret; credentials come from each SDK's usual environment):
- aws-kms:       key_id (existing key ARN/alias for version 1, optional), region, endpoint_url
- gcp-kms:       key (projects/P/locations/L/keyRings/R/cryptoKeys/K, required), endpoint (e.g. http://127.0.0.1:port)
                 and `key.<name>` for other KEK names
- vault-transit: address (or $VAULT_ADDR), mount (default transit), key_prefix (default cloakbeam-);
                 token from $VAULT_TOKEN (or the env var named by token_env)
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from cloakbeam.errors import ConfigError, KeyAccessError
from cloakbeam.keys.keyring import now_iso

PROVIDERS = ("aws-kms", "gcp-kms", "vault-transit")


class RemoteKekProvider:
    """Versioned KEKs whose material never leaves the KMS."""

    name = "remote"

    def __init__(self, ref: Any, doc: dict[str, Any]) -> None:
        self.ref = ref
        self._doc = doc

    def __reduce__(self):  # noqa: D105
        raise TypeError("a KEK provider holds a KMS client and cannot be pickled")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- backend primitives -------------------------------------------------------------------------
    def _encrypt(self, handle: str, plaintext: bytes, aad: bytes) -> bytes:
        raise NotImplementedError

    def _decrypt(self, handle: str, blob: bytes, aad: bytes) -> bytes:
        raise NotImplementedError

    def _create(self, name: str, existing: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    def _disable(self, handle: str) -> None:
        raise NotImplementedError

    # -- provider interface ---------------------------------------------------------------------------
    def _versions(self, name: str) -> list[dict[str, Any]]:
        keys = self._doc.setdefault("kms_keys", {})
        if name not in keys:
            raise KeyAccessError(f"keyring {self.ref.path} has no key named '{name}'; create it with 'cloakbeam keys rotate --name {name}'")
        return keys[name]

    def _entry(self, name: str, version: str) -> dict[str, Any]:
        for v in self._versions(name):
            if str(v["version"]) == str(version):
                return v
        raise KeyAccessError(f"keyring {self.ref.path} has no version {version} of key '{name}'")

    def primary_version(self, name: str) -> str:
        active = [v["version"] for v in self._versions(name) if v.get("state") == "active"]
        if not active:
            raise KeyAccessError(f"key '{name}' has no active version; run 'cloakbeam keys rotate --name {name}'")
        return str(max(active))

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        version = self.primary_version(name)
        return version, self._encrypt(self._entry(name, version)["handle"], plaintext, aad)

    def unwrap(self, name: str, version: str, wrapped: bytes, aad: bytes) -> bytes:
        entry = self._entry(name, version)
        if entry.get("state") == "retired":
            raise KeyAccessError(
                f"KEK '{name}' version {version} is retired and can no longer unwrap keys; "
                "data keys still wrapped under it must be rewrapped before retiring ('cloakbeam keys rewrap')"
            )
        return self._decrypt(entry["handle"], wrapped, aad)

    def rotate(self, name: str) -> str:
        versions = self._doc.setdefault("kms_keys", {}).setdefault(name, [])
        handle = self._create(name, versions)
        version = max((v["version"] for v in versions), default=0) + 1
        versions.append({"version": version, "handle": handle, "state": "active", "created": now_iso()})
        return str(version)

    def retire(self, name: str, version: str) -> None:
        if str(version) == self.primary_version(name):
            raise KeyAccessError(f"version {version} is the newest version of key '{name}'; rotate first, then rewrap, then retire it")
        entry = self._entry(name, version)
        self._disable(entry["handle"])
        entry["state"] = "retired"
        entry["retired"] = now_iso()

    def list_keys(self) -> list[dict[str, Any]]:
        out = []
        for name, versions in sorted((self._doc.get("kms_keys") or {}).items()):
            for v in versions:
                out.append({"name": name, "version": str(v["version"]), "state": v.get("state"), "created": v.get("created"), "handle": v.get("handle"), **({"retired": v["retired"]} if "retired" in v else {})})
        return out


def _aad_digest(aad: bytes) -> str:
    return hashlib.sha256(aad).hexdigest()


class AwsKmsProvider(RemoteKekProvider):
    """AWS KMS: each KEK version is a symmetric KMS key; the AAD goes into the encryption context."""

    name = "aws-kms"

    def __init__(self, ref: Any, doc: dict[str, Any]) -> None:
        super().__init__(ref, doc)
        try:
            import boto3
        except ImportError:
            raise ConfigError("the aws-kms provider needs boto3: pip install 'cloakbeam[aws]'") from None
        self._kms = boto3.client("kms", region_name=ref.param("region", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")), endpoint_url=ref.param("endpoint_url"))

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kw)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise KeyAccessError(f"AWS KMS refused to {what} ({code})") from None
        except BotoCoreError as exc:
            raise KeyAccessError(f"AWS KMS is unreachable while trying to {what} ({type(exc).__name__})") from None

    def _encrypt(self, handle: str, plaintext: bytes, aad: bytes) -> bytes:
        r = self._call("wrap a key", self._kms.encrypt, KeyId=handle, Plaintext=plaintext, EncryptionContext={"cloakbeam-aad": _aad_digest(aad)})
        return r["CiphertextBlob"]

    def _decrypt(self, handle: str, blob: bytes, aad: bytes) -> bytes:
        r = self._call("unwrap a key (wrong key or altered record)", self._kms.decrypt, KeyId=handle, CiphertextBlob=blob, EncryptionContext={"cloakbeam-aad": _aad_digest(aad)})
        return r["Plaintext"]

    def _create(self, name: str, existing: list[dict[str, Any]]) -> str:
        given = self.ref.param("key_id" if name == "default" else f"key_id.{name}")
        if given and not existing:
            return given
        r = self._call("create a key", self._kms.create_key, Description=f"cloakbeam KEK {name} v{len(existing) + 1}", KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")
        return r["KeyMetadata"]["KeyId"]

    def _disable(self, handle: str) -> None:
        self._call("disable a retired key", self._kms.disable_key, KeyId=handle)


class VaultTransitProvider(RemoteKekProvider):
    """HashiCorp Vault transit: one transit key per KEK name; our versions are its versions."""

    name = "vault-transit"

    def __init__(self, ref: Any, doc: dict[str, Any]) -> None:
        super().__init__(ref, doc)
        try:
            import hvac
        except ImportError:
            raise ConfigError("the vault-transit provider needs hvac: pip install 'cloakbeam[vault]'") from None
        token_env = ref.param("token_env", "VAULT_TOKEN")
        token = os.environ.get(token_env)
        if not token:
            raise KeyAccessError(f"the vault-transit provider needs a token in the environment variable {token_env}")
        address = ref.param("address") or os.environ.get("VAULT_ADDR")
        if not address:
            raise ConfigError("the vault-transit provider needs 'address' in the keys config or $VAULT_ADDR")
        self._client = hvac.Client(url=address, token=token)
        self._mount = ref.param("mount", "transit")
        self._prefix = ref.param("key_prefix", "cloakbeam-")

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        import hvac.exceptions as hx
        import requests

        try:
            return fn(mount_point=self._mount, **kw)
        except hx.VaultError as exc:
            raise KeyAccessError(f"Vault transit refused to {what} ({type(exc).__name__})") from None
        except requests.RequestException as exc:
            raise KeyAccessError(f"Vault is unreachable while trying to {what} ({type(exc).__name__})") from None

    @staticmethod
    def _split(handle: str) -> tuple[str, int]:
        key, _, v = handle.rpartition(":v")
        return key, int(v)

    def _encrypt(self, handle: str, plaintext: bytes, aad: bytes) -> bytes:
        key, version = self._split(handle)
        t = self._client.secrets.transit
        r = self._call("wrap a key", t.encrypt_data, name=key, plaintext=base64.b64encode(plaintext).decode(), key_version=version,
                       associated_data=base64.b64encode(aad).decode())
        return r["data"]["ciphertext"].encode()

    def _decrypt(self, handle: str, blob: bytes, aad: bytes) -> bytes:
        key, version = self._split(handle)
        if not blob.decode(errors="replace").startswith(f"vault:v{version}:"):
            raise KeyAccessError(f"a wrapped key does not belong to Vault key version {version}")
        t = self._client.secrets.transit
        r = self._call("unwrap a key (wrong key or altered record)", t.decrypt_data, name=key, ciphertext=blob.decode(), associated_data=base64.b64encode(aad).decode())
        return base64.b64decode(r["data"]["plaintext"])

    def _create(self, name: str, existing: list[dict[str, Any]]) -> str:
        key = self._prefix + name
        t = self._client.secrets.transit
        if not existing:
            try:
                info = t.read_key(name=key, mount_point=self._mount)
            except Exception:
                self._call("create a key", t.create_key, name=key, key_type="aes256-gcm96")
                info = self._call("read a key", t.read_key, name=key)
                return f"{key}:v{int(info['data']['latest_version'])}"
        self._call("rotate a key", t.rotate_key, name=key)
        info = self._call("read a key", t.read_key, name=key)
        return f"{key}:v{int(info['data']['latest_version'])}"

    def _disable(self, handle: str) -> None:
        key, version = self._split(handle)
        t = self._client.secrets.transit
        info = self._call("read a key", t.read_key, name=key)
        current = int(info["data"].get("min_decryption_version", 1))
        if version + 1 > current:  # Vault retires every version up to `version`
            self._call("retire a key version", t.update_key_configuration, name=key, min_decryption_version=version + 1)

    def retire(self, name: str, version: str) -> None:
        super().retire(name, version)
        for v in self._versions(name):  # Vault's min_decryption_version retires all older versions too
            if v["version"] < int(version) and v.get("state") != "retired":
                v["state"] = "retired"
                v["retired"] = now_iso()


class GcpKmsProvider(RemoteKekProvider):
    """Google Cloud KMS: one CryptoKey per KEK name; our versions are its CryptoKeyVersions."""

    name = "gcp-kms"

    def __init__(self, ref: Any, doc: dict[str, Any]) -> None:
        super().__init__(ref, doc)
        try:
            from google.cloud import kms  # noqa: F401
        except ImportError:
            raise ConfigError("the gcp-kms provider needs google-cloud-kms: pip install 'cloakbeam[gcp-kms]'") from None
        self._client = self._make_client(ref)

    @staticmethod
    def _make_client(ref: Any) -> Any:
        from google.cloud import kms

        endpoint = ref.param("endpoint")
        if endpoint:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud.kms_v1.services.key_management_service.transports.rest import KeyManagementServiceRestTransport

            scheme, _, host = endpoint.partition("://")
            transport = KeyManagementServiceRestTransport(host=host, url_scheme=scheme, credentials=AnonymousCredentials())
            return kms.KeyManagementServiceClient(transport=transport)
        return kms.KeyManagementServiceClient()

    def _crypto_key(self, name: str) -> str:
        key = self.ref.param("key" if name == "default" else f"key.{name}")
        if not key:
            raise ConfigError(f"the gcp-kms provider needs the CryptoKey resource name of KEK '{name}' in keys config ('key' or 'key.{name}')")
        return key

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        from google.api_core import exceptions as gx

        try:
            return fn(**kw)
        except gx.GoogleAPIError as exc:
            raise KeyAccessError(f"Google Cloud KMS refused to {what} ({type(exc).__name__})") from None

    def _encrypt(self, handle: str, plaintext: bytes, aad: bytes) -> bytes:
        r = self._call("wrap a key", self._client.encrypt, request={"name": handle, "plaintext": plaintext, "additional_authenticated_data": aad})
        if r.name and r.name != handle:
            raise KeyAccessError("Google Cloud KMS encrypted with a different key version than requested")
        return bytes(r.ciphertext)

    def _decrypt(self, handle: str, blob: bytes, aad: bytes) -> bytes:
        crypto_key = handle.split("/cryptoKeyVersions/")[0]
        r = self._call("unwrap a key (wrong key or altered record)", self._client.decrypt, request={"name": crypto_key, "ciphertext": blob, "additional_authenticated_data": aad})
        return bytes(r.plaintext)

    def _create(self, name: str, existing: list[dict[str, Any]]) -> str:
        crypto_key = self._crypto_key(name)
        if not existing:
            key = self._call("read a key", self._client.get_crypto_key, request={"name": crypto_key})
            if key.primary and key.primary.name:
                return key.primary.name
        v = self._call("create a key version", self._client.create_crypto_key_version, request={"parent": crypto_key, "crypto_key_version": {}})
        self._call("set the primary version", self._client.update_crypto_key_primary_version,
                   request={"name": crypto_key, "crypto_key_version_id": v.name.rsplit("/", 1)[1]})
        return v.name

    def _disable(self, handle: str) -> None:
        self._call("destroy a retired key version", self._client.destroy_crypto_key_version, request={"name": handle})


_CLASSES = {"aws-kms": AwsKmsProvider, "gcp-kms": GcpKmsProvider, "vault-transit": VaultTransitProvider}


def make_provider(ref: Any, doc: dict[str, Any]) -> RemoteKekProvider:
    cls = _CLASSES.get(ref.provider)
    if cls is None:
        raise ConfigError(f"unknown key provider '{ref.provider}'; use local, {', '.join(PROVIDERS)}")
    return cls(ref, doc)
