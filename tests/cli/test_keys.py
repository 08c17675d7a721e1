"""`cloakbeam keys …`, `decrypt`, `verify`: exit codes and messages for good and bad invocations."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cloakbeam.cli.main import main


@pytest.fixture()
def state(tmp_path, monkeypatch):
    s = tmp_path / "state"
    monkeypatch.setenv("CLOAKBEAM_STATE_DIR", str(s))
    return s


def _reveal(tmp_path, monkeypatch, capsys) -> str:
    """A reveal keyring as the reveal service would create it (its own passphrase variable)."""
    monkeypatch.setenv("REVEAL_PASSPHRASE", "reveal-pw-for-tests")
    path = str(tmp_path / "service" / "reveal-keyring.json")
    assert main(["keys", "init-reveal", "--keyring", path, "--env", "REVEAL_PASSPHRASE", "--scrypt-n", "4096"]) == 0
    out = capsys.readouterr().out
    assert "reveal public key default v1:" in out and "reveal-pw" not in out
    return path


def test_init_passphrase_list_rotate_retire(state, tmp_path, monkeypatch, capsys):
    reveal = _reveal(tmp_path, monkeypatch, capsys)
    monkeypatch.setenv("CLOAKBEAM_KEYRING_PASSPHRASE", "pw-for-tests")
    assert main(["keys", "init", "--scrypt-n", "4096"]) == 2  # a pipeline keyring needs the reveal public key
    assert "--reveal-key" in capsys.readouterr().err
    assert main(["keys", "init", "--scrypt-n", "4096", "--reveal-key", reveal]) == 0
    ring = state / "keyring.json"
    assert stat.S_IMODE(ring.stat().st_mode) == 0o600
    doc = json.loads(ring.read_text())
    assert doc["protection"]["mode"] == "passphrase" and doc["dev"] is False
    assert main(["keys", "init", "--scrypt-n", "4096", "--reveal-key", reveal]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    doc = json.loads(ring.read_text())
    assert doc["reveal_public_keys"]["default"]["version"] == 1 and "secrets" not in json.dumps(doc["reveal_public_keys"])
    # set-reveal-key records a public key given as name:base64 (e.g. a second reveal key)
    from cloakbeam.keys.sealing import read_reveal_public_keys

    b64 = read_reveal_public_keys(reveal)["default"]["public_key"]
    assert main(["keys", "set-reveal-key", f"pii-high:{b64}"]) == 0
    assert set(json.loads(ring.read_text())["reveal_public_keys"]) == {"default", "pii-high"}
    assert main(["keys", "set-reveal-key", "not a key"]) == 2
    assert main(["keys", "rotate"]) == 0
    assert main(["keys", "rotate", "--name", "pii-high"]) == 0
    assert main(["keys", "retire", "2"]) == 1  # newest version
    err = capsys.readouterr().err
    assert "newest version" in err
    assert main(["keys", "retire", "1"]) == 0
    capsys.readouterr()
    assert main(["keys", "list"]) == 0
    out = capsys.readouterr().out
    assert "default\tv1\tretired" in out and "default\tv2\tactive" in out and "pii-high\tv1\tactive" in out
    assert "pw-for-tests" not in out
    assert main(["keys", "public-key"]) == 0
    assert len(capsys.readouterr().out.strip()) == 44


def test_missing_or_wrong_passphrase_exit_2_without_leaking(state, tmp_path, monkeypatch, capsys):
    reveal = _reveal(tmp_path, monkeypatch, capsys)
    monkeypatch.setenv("CLOAKBEAM_KEYRING_PASSPHRASE", "right-one-for-the-tests")
    assert main(["keys", "init", "--scrypt-n", "4096", "--reveal-key", reveal]) == 0
    monkeypatch.setenv("CLOAKBEAM_KEYRING_PASSPHRASE", "wrong-one")
    assert main(["keys", "list"]) == 2
    err = capsys.readouterr().err
    assert "wrong passphrase" in err and "wrong-one" not in err and "right-one" not in err
    monkeypatch.delenv("CLOAKBEAM_KEYRING_PASSPHRASE")
    assert main(["keys", "rotate"]) == 2
    assert "CLOAKBEAM_KEYRING_PASSPHRASE" in capsys.readouterr().err


def test_group_readable_keyring_exit_2(state, capsys):
    assert main(["keys", "init", "--protect", "dev"]) == 0
    os.chmod(state / "keyring.json", 0o644)
    assert main(["keys", "list"]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_missing_keyring_exit_2(state, capsys):
    assert main(["keys", "list"]) == 2
    assert "keys init" in capsys.readouterr().err


def test_decrypt_and_verify_usage_errors(state, tmp_path, capsys):
    assert main(["keys", "init", "--protect", "dev"]) == 0
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    pub = json.loads((state / "keyring.json").read_text())["signing_public_key"]
    dev = ["--dev", "--role", "r", "--purpose", "p", "--public-key", pub]
    assert main(["decrypt", str(tmp_path / "nope"), "--out", str(tmp_path / "p"), *dev]) == 2
    nonempty = tmp_path / "full"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    assert main(["decrypt", str(out), "--out", str(nonempty), *dev]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["decrypt", str(out), "--out", str(tmp_path / "p2"), "--dev", "--role", "r", "--purpose", "p"]) == 2
    assert "no pinned signing key" in capsys.readouterr().err
    assert main(["decrypt", str(out), "--out", str(tmp_path / "p3"), *dev]) == 1  # verification first: no manifest
    assert "manifest.json is missing" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "missing"), "--public-key", pub]) == 2
    assert main(["verify", str(out), "--public-key", pub]) == 1
    assert "manifest.json is missing" in capsys.readouterr().err
    assert main(["verify", str(out), "--public-key", "not-base64!"]) == 2
    assert main(["verify", str(out)]) == 2
    with pytest.raises(SystemExit) as ei:
        main(["decrypt", str(out)])  # --out and --purpose are required
    assert ei.value.code == 2


def test_init_without_passphrase_exit_2_and_writes_nothing(state, tmp_path, monkeypatch, capsys):
    reveal = _reveal(tmp_path, monkeypatch, capsys)
    monkeypatch.delenv("CLOAKBEAM_KEYRING_PASSPHRASE", raising=False)
    assert main(["keys", "init", "--reveal-key", reveal]) == 2
    assert "CLOAKBEAM_KEYRING_PASSPHRASE" in capsys.readouterr().err
    assert not (state / "keyring.json").exists()
