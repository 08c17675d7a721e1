"""The `pseudonymize` action: keyed, deterministic, realistic surrogates (names, e-mails, phones, addresses).

How a surrogate is chosen, without a Faker call per row:
1. Once per worker process and kind, a *pool* of realistic parts is drawn from Faker with a fixed seed
   (`_pool`): first names, last names, street addresses, phone-number prefixes, ... The seed is public; the
   pools are the same on every worker with the same Faker version and locale.
2. Per batch, every *distinct* normalized input value gets HMAC-SHA256 under
   `ctx.keys.prf_key("pseudonymize/<domain>")` (one native kernel call over the distinct values:
   `keyed.keyed_digests`).
3. Independent 32-bit words of the digest index the pools; the parts are joined with Arrow kernels.

So the same value in the same domain gives the same surrogate on every worker, run and retry with the same
key, and a different key gives unrelated surrogates. Without the key the mapping cannot be recomputed; it is
not reversible by design (reversal belongs to the token vault).

Collision rate. A kind has an effective space of S combinations (`SurrogateGenerator.space()`); for n
distinct inputs the chance that a given input shares its surrogate with another is about 1 - exp(-(n-1)/S).
The share of distinct surrogates lost, 1 - distinct outputs / n, is about n / (2 S). With the en_US pools
(Faker 40): name S = 690 first x 18 initials x 1 000 last ≈ 1.24e7, so among 100 000 distinct names ≈ 0.8 %
share a surrogate with another and ≈ 0.4 % of surrogates are lost (see the benchmark line pseudonymize.collisions);
e-mail S ≈ 3.4e9; phone S ≈ 4.1e7 (≈ 4 100 Faker prefixes x 10 000 line numbers); address S ≈ 1.7e7;
first_name, last_name, city and company are single pools (690 to 3 744 values): labels, not identities.
`benchmarks/bench_classify_mask.py` measures it. Collisions never merge records (surrogates are labels,
not keys); use `tokenize` when joins must be exact.

Surrogate names carry a middle initial ("Dana K. Whitfield") and e-mails use reserved example domains, so a
surrogate is never a copy of a Faker-style input value; a surrogate that equals its own input is re-drawn.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.transforms.keyed import digest_words, keyed_digests, normalize
from cloakbeam.transforms.registry import Action, ActionContext, Param, register

KINDS = ("name", "first_name", "last_name", "email", "phone", "address", "city", "company", "username")
_NORMAL = {"email": "email", "phone": "digits"}
_DEFAULT_KIND = {"PERSON_NAME": "name", "EMAIL": "email", "PHONE": "phone"}
_SEED = 0x5EED_C10A
_INITIALS = "ABCDEFGHJKLMNPRSTW"  # no I/O/Q/U/V/X/Y/Z: look like digits or are rare initials


@functools.lru_cache(maxsize=64)
def _pool(part: str, locale: str) -> pa.Array:
    """Distinct Faker values for one part, drawn once per process with a fixed seed (order kept)."""
    from faker import Faker

    fake = Faker(locale)
    fake.seed_instance(_SEED)
    if part in ("first", "last"):
        # The person provider's own name lists (all of them, sorted): no draws needed, and the pool is the full
        # list rather than whatever a few thousand weighted draws happen to reach.
        attr = "first_names" if part == "first" else "last_names"
        for provider in fake.providers:
            names = getattr(provider, attr, None)
            if names:
                return pa.array(sorted({str(n) for n in names if str(n).strip()}), type=pa.string())
    draws, make = {
        "first": (8192, fake.first_name),
        "last": (8192, fake.last_name),
        "street": (4096, fake.street_address),
        "cityline": (4096, lambda: _city_line(fake)),
        "city": (4096, fake.city),
        "company": (4096, fake.company),
        "user": (8192, fake.user_name),
        "phone": (4096, lambda: _phone_prefix(fake.phone_number())),
        "domain": (64, fake.safe_domain_name),
    }[part]
    seen: dict[str, None] = {}
    for _ in range(draws):
        v = make()
        if v:
            seen.setdefault(v, None)
    return pa.array(list(seen), type=pa.string())


def _city_line(fake: Any) -> str:
    try:
        return f"{fake.city()}, {fake.state_abbr()} {fake.postcode()}"
    except AttributeError:  # locales without states
        return f"{fake.postcode()} {fake.city()}"


def _phone_prefix(number: str) -> str:
    """A Faker phone number without its extension and last four digits (the line number comes from the hash)."""
    for sep in ("x", "X", " ext"):
        number = number.split(sep)[0]
    number = number.rstrip()
    return number[:-4] if len(number) > 4 and number[-4:].isdigit() else "555-"


class SurrogateGenerator:
    """Maps HMAC digests to surrogates of one kind; pools are shared per process (built on first use)."""

    def __init__(self, kind: str, locale: str = "en_US") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown surrogate kind '{kind}'")
        self.kind = kind
        self.locale = locale

    def pools(self) -> dict[str, pa.Array]:
        parts = {
            "name": ("first", "last"),
            "first_name": ("first",),
            "last_name": ("last",),
            "email": ("first", "last", "domain"),
            "phone": ("phone",),
            "address": ("street", "cityline"),
            "city": ("city",),
            "company": ("company",),
            "username": ("user",),
        }[self.kind]
        return {p: _pool(p, self.locale) for p in parts}

    def space(self) -> int:
        """Number of distinct surrogates this kind can produce (the S of the collision estimate)."""
        sizes = {k: len(v) for k, v in self.pools().items()}
        extra = {"name": len(_INITIALS), "email": len(_INITIALS) * 100, "phone": 10_000, "username": 100}.get(self.kind, 1)
        return int(np.prod(list(sizes.values()), dtype=np.float64) * extra)

    def from_words(self, w: np.ndarray) -> pa.Array:
        """Surrogates for a (n, k) uint32 matrix of independent uniform words (k >= 4)."""
        pools = self.pools()

        def pick(part: str, col: int) -> pa.Array:
            pool = pools[part]
            return pool.take(pa.array((w[:, col] % np.uint32(len(pool))).astype(np.int64)))

        def initial(col: int) -> pa.Array:
            letters = pa.array(list(_INITIALS), type=pa.string())
            return letters.take(pa.array((w[:, col] % np.uint32(len(_INITIALS))).astype(np.int64)))

        def number(col: int, mod: int, width: int) -> pa.Array:
            vals = pa.array((w[:, col] % np.uint32(mod)).astype(np.int64)).cast(pa.string())
            return pc.utf8_lpad(vals, width=width, padding="0")

        k = self.kind
        if k == "name":
            return pc.binary_join_element_wise(pick("first", 0), pc.binary_join_element_wise(initial(1), ".", ""), pick("last", 2), " ")
        if k == "first_name":
            return pick("first", 0)
        if k == "last_name":
            return pick("last", 0)
        if k == "email":
            local = pc.binary_join_element_wise(pick("first", 0), initial(1), pc.binary_join_element_wise(pick("last", 2), number(3, 100, 2), ""), ".")
            return pc.utf8_lower(pc.binary_join_element_wise(local, pick("domain", 4), "@"))
        if k == "phone":
            return pc.binary_join_element_wise(pick("phone", 0), number(1, 10_000, 4), "")
        if k == "address":
            return pc.binary_join_element_wise(pick("street", 0), pick("cityline", 1), ", ")
        if k == "username":
            return pc.binary_join_element_wise(pick("user", 0), number(1, 100, 2), "")
        return pick(k, 0)  # city, company

    def surrogates(self, key: bytes, column: pa.Array) -> pa.Array:
        """One surrogate per row (null stays null), the same for equal normalized values."""
        how = _NORMAL.get(self.kind, "text")
        digests, row = keyed_digests(key, column, how)
        if len(digests) == 0:
            return pa.nulls(len(row), pa.string())
        words = digest_words(digests)
        distinct = self.from_words(words[:, :5])
        # A surrogate equal to its own input would leak it: re-draw those from the digest's other words.
        uniq_norm = normalize(pc.dictionary_encode(normalize(column, how)).dictionary, how)
        same = pc.fill_null(pc.equal(normalize(distinct, how), uniq_norm), False).to_numpy(zero_copy_only=False)
        if same.any():
            redraw = self.from_words(words[:, 3:8])
            distinct = pc.if_else(pa.array(same), redraw, distinct)
        return distinct.take(pa.array(row, mask=row < 0))

    def one(self, key: bytes, value: str) -> str:
        """Surrogate for a single value (free-text spans); same result as `surrogates` for that value."""
        return self.surrogates(key, pa.array([value], type=pa.string()))[0].as_py()


def pseudonym_key(ctx: ActionContext, domain: str) -> bytes:
    return ctx.keys.prf_key(f"pseudonymize/{domain}")


@register
class Pseudonymize(Action):
    """Replace each value with a realistic surrogate that is stable per (key, domain, value)."""

    name = "pseudonymize"
    params = {
        "kind": Param(str, choices=KINDS, doc="surrogate kind; default from the field's declared class"),
        "domain": Param(str, doc="values share surrogates within a domain; default: the kind"),
        "locale": Param(str, default="en_US", doc="Faker locale of the pools"),
    }
    accepts = (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),)
    requires = frozenset({"keys"})

    def configure(self) -> None:
        if self.options["kind"] is None:
            kind = _DEFAULT_KIND.get(self.field.declared_class or "")
            if kind is None:
                raise self.fail(f"say which surrogate to use with 'kind: <{'|'.join(KINDS)}>'")
            self.options["kind"] = kind
        if self.options["domain"] is None:
            self.options["domain"] = self.options["kind"]
        try:
            from faker import Faker

            Faker(self.options["locale"])
        except AttributeError:
            raise self.fail(f"Faker has no locale '{self.options['locale']}'; use e.g. en_US") from None
        self._gen = SurrogateGenerator(self.options["kind"], self.options["locale"])

    def output_type(self) -> pa.DataType | None:
        return pa.string()

    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        return self._gen.surrogates(pseudonym_key(ctx, self.options["domain"]), column)

    def describe(self) -> dict[str, Any]:
        return {"action": self.name, "kind": self.options["kind"], "domain": self.options["domain"], "locale": self.options["locale"]}
