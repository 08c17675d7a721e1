"""atheris target: policy documents (the strict YAML loader and the policy compiler with every section).
Any outcome but a compiled policy or a PolicyError/ConfigError is a crash. Run through tests/fuzz/run.py."""

import sys

import atheris

with atheris.instrument_imports(include=["cloakbeam"]):
    from cloakbeam.core.safeyaml import load_yaml
    from cloakbeam.errors import ConfigError
    from cloakbeam.tests.fuzz._harness import fuzz_schema, run
    from cloakbeam.transforms.policy import compile_policy

SCHEMA = fuzz_schema()


def TestOneInput(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        raw = load_yaml(text, "fuzz.yaml", what="policy file")
        policy = compile_policy(raw, SCHEMA, source="fuzz.yaml", text=text)
    except ConfigError as exc:
        assert str(exc), "a refusal says why"
        return
    assert policy.content_hash and set(policy.actions) <= set(SCHEMA.leaf_paths)
    policy.output_schema()


if __name__ == "__main__":
    run(TestOneInput)
    sys.exit(0)
