"""Passphrase keyrings (issue 13): scrypt N = 2^17 for new keyrings, keyrings with another recorded N still open,
and weak passphrases are refused with a sentence that never quotes them."""

from __future__ import annotations

import json

import pytest

from cloakbeam.cli.main import main
from cloakbeam.errors import ConfigError
from cloakbeam.keys import keyring as kr
from cloakbeam.keys.service import KeyRef, init_keyring, open_key_service

ENV = "CLOAKBEAM_KEYRING_PASSPHRASE"


def test_new_passphrase_keyrings_use_scrypt_n_2_17(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "correct horse battery staple")
    assert kr.DEFAULT_SCRYPT_N == 2**17
    ref = init_keyring(tmp_path / "k.json", protection="passphrase")
    kdf = json.loads(open(ref.path).read())["protection"]["kdf"]
    assert (kdf["name"], kdf["n"], kdf["r"], kdf["p"]) == ("scrypt", 2**17, 8, 1)
    assert len(open_key_service(ref).prf_key("t")) == 32


def test_a_keyring_with_an_older_recorded_n_still_opens(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "correct horse battery staple")
    ref = init_keyring(tmp_path / "k.json", protection="passphrase", scrypt_n=2**15)
    assert json.loads(open(ref.path).read())["protection"]["kdf"]["n"] == 2**15
    a = open_key_service(ref).prf_key("t")
    __import__("cloakbeam.keys.service", fromlist=["_PROCESS"])._PROCESS.clear()
    assert open_key_service(KeyRef(path=ref.path)).prf_key("t") == a


@pytest.mark.parametrize("weak,why", [
    ("short-pw", "shorter than 12 characters"),
    ("aaaaaaaaaaaaaaaaaaaa", "too easy to guess"),
    ("abcabcabcabcabcabc", "too easy to guess"),
    ("Password123!", "common password"),
    ("cloakbeam-2026", "common password"),
])
def test_weak_passphrases_are_refused_with_a_sentence(tmp_path, monkeypatch, weak, why):
    monkeypatch.setenv(ENV, weak)
    with pytest.raises(ConfigError, match=why) as exc:
        init_keyring(tmp_path / "k.json", protection="passphrase", scrypt_n=2**12)
    assert weak not in str(exc.value) and ENV in str(exc.value)
    assert not (tmp_path / "k.json").exists()


def test_the_cli_refuses_a_weak_passphrase_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV, "hunter2hunter2")
    # both keyrings a deployment makes with a passphrase: the reveal service's and the pipeline's
    assert main(["keys", "init-reveal", "--state-dir", str(tmp_path / "s"), "--scrypt-n", "4096"]) == 2
    err = capsys.readouterr().err
    assert "too easy to guess" in err and "hunter2" not in err and "Traceback" not in err
    monkeypatch.setenv(ENV, "correct horse battery staple")
    assert main(["keys", "init-reveal", "--state-dir", str(tmp_path / "r"), "--scrypt-n", "4096"]) == 0
    capsys.readouterr()
    monkeypatch.setenv(ENV, "hunter2hunter2")
    reveal = str(tmp_path / "r" / "reveal-keyring.json")
    assert main(["keys", "init", "--state-dir", str(tmp_path / "s"), "--scrypt-n", "4096", "--reveal-key", reveal]) == 2
    err = capsys.readouterr().err
    assert "too easy to guess" in err and "hunter2" not in err and "Traceback" not in err


def test_strong_passphrases_pass():
    for ok in ("correct horse battery staple", "Tr0ub4dor&3-xyz-9", "pw-for-tests"):
        kr.check_passphrase(ok, ENV)
