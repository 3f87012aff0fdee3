"""Answer keys and endpoint families (property tests), and the key-driven helpers of the transform."""

from __future__ import annotations

import re
from dataclasses import replace

import polars as pl
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llm_enrich.schemas.enriched import CACHED_TOKENS_COLUMN, INPUT_TOKENS_COLUMN, KEY_COLUMN, OUTPUT_TOKENS_COLUMN
from llm_enrich.transforms.enrichment import EnrichSpec, charge_first, prompt_keys
from llm_enrich.transforms.keys import AnswerIdentity, answer_key, endpoint_family
from llm_enrich.transforms.prompts import parse_template

# Strings that look like the separators a naive "join with a delimiter" recipe would use.
_TRICKY = st.sampled_from(
    ["", " ", "\x00", "\n", "|", ",", ":", '"', "\\", '","', "null", "None", "é", "e\u0301", "🙂"]
)
TEXT = st.one_of(st.text(), _TRICKY, st.lists(_TRICKY, max_size=4).map("".join))
OPT_TEXT = st.one_of(st.none(), TEXT)
TEMPERATURE = st.one_of(st.none(), st.floats(allow_nan=False))
MAX_TOKENS = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63))
IDENTITY = st.builds(
    AnswerIdentity, model=TEXT, endpoint=TEXT, temperature=TEMPERATURE, max_tokens=MAX_TOKENS, output_schema=OPT_TEXT
)
HEX64 = re.compile(r"[0-9a-f]{64}")


@given(IDENTITY, OPT_TEXT, TEXT)
def test_key_is_64_lowercase_hex_and_deterministic(identity: AnswerIdentity, system: str | None, prompt: str) -> None:
    key = answer_key(identity, system, prompt)
    assert HEX64.fullmatch(key)
    # Same inputs, freshly built objects: same key (no dependence on identity of objects or hash seeds).
    twin = AnswerIdentity(**{f: getattr(identity, f) for f in identity.__dataclass_fields__})
    assert answer_key(twin, system, prompt) == key


_STRATEGY_OF = {
    "model": TEXT,
    "endpoint": TEXT,
    "temperature": TEMPERATURE,
    "max_tokens": MAX_TOKENS,
    "output_schema": OPT_TEXT,
}


@pytest.mark.parametrize("field", list(_STRATEGY_OF))
@given(data=st.data(), identity=IDENTITY, system=OPT_TEXT, prompt=TEXT)
def test_key_changes_when_any_identity_field_changes(
    field: str, data: st.DataObject, identity: AnswerIdentity, system: str | None, prompt: str
) -> None:
    other = data.draw(_STRATEGY_OF[field], label=field)
    assume(other != getattr(identity, field))
    changed = replace(identity, **{field: other})
    assert answer_key(changed, system, prompt) != answer_key(identity, system, prompt)


@given(IDENTITY, OPT_TEXT, TEXT, OPT_TEXT, TEXT)
def test_distinct_messages_never_share_a_key(
    identity: AnswerIdentity, system_a: str | None, prompt_a: str, system_b: str | None, prompt_b: str
) -> None:
    assume((system_a, prompt_a) != (system_b, prompt_b))
    assert answer_key(identity, system_a, prompt_a) != answer_key(identity, system_b, prompt_b)


@given(IDENTITY, TEXT, TEXT.filter(bool), TEXT)
def test_moving_text_between_system_and_prompt_changes_the_key(
    identity: AnswerIdentity, head: str, middle: str, tail: str
) -> None:
    assert answer_key(identity, head, middle + tail) != answer_key(identity, head + middle, tail)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("a", "bc"), ("ab", "c")),
        ((None, "x"), ("", "x")),
        ((None, "null"), ("null", "")),
        (("a", "b"), ('a","b', "")),
        (("", ""), (None, "")),
    ],
)
def test_known_splits_do_not_collide(a: tuple[str | None, str], b: tuple[str | None, str]) -> None:
    identity = AnswerIdentity(model="m", endpoint="openai")
    assert answer_key(identity, *a) != answer_key(identity, *b)


def test_unset_and_zero_settings_are_different_answers() -> None:
    base = AnswerIdentity(model="m", endpoint="openai")
    keys = {
        answer_key(base, None, "p"),
        answer_key(replace(base, temperature=0.0), None, "p"),
        answer_key(replace(base, max_tokens=0), None, "p"),
        answer_key(replace(base, output_schema=""), None, "p"),
    }
    assert len(keys) == 4


# -- endpoint_family ---------------------------------------------------------------------------

HOST = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True)
PATH = st.lists(st.from_regex(r"[A-Za-z0-9_.~-]{1,8}", fullmatch=True), max_size=3).map(
    lambda parts: "".join("/" + p for p in parts)
)


@pytest.mark.parametrize(
    "url",
    [
        None,
        "",
        "https://api.openai.com/v1",
        "https://api.openai.com/v1/",
        "https://API.OpenAI.com/v1",
        "https://api.openai.com",
        "https://api.openai.com:443/v1",
        "  https://api.openai.com/v1  ",
    ],
)
def test_openai_is_one_family(url: str | None) -> None:
    assert endpoint_family(url) == "openai"


@pytest.mark.parametrize("url", [None, "https://api.openai.com/v1", "http://127.0.0.1:8080/v1"])
def test_bundled_model_is_its_own_family(url: str | None) -> None:
    assert endpoint_family(url, bundled=True) == "bundled"


@given(
    scheme=st.sampled_from(["http", "https"]),
    host=HOST,
    port=st.one_of(st.none(), st.integers(1, 65535)),
    path=PATH,
    slashes=st.integers(0, 3),
    data=st.data(),
)
def test_trailing_slashes_and_host_case_do_not_matter(
    scheme: str, host: str, port: int | None, path: str, slashes: int, data: st.DataObject
) -> None:
    assume(host != "api.openai.com")
    netloc = host if port is None else f"{host}:{port}"
    canonical = endpoint_family(f"{scheme}://{netloc}{path}")
    flips = data.draw(st.lists(st.booleans(), min_size=len(host), max_size=len(host)), label="upper")
    shouted = "".join(c.upper() if up else c for c, up in zip(host, flips, strict=True))
    shouted_netloc = shouted if port is None else f"{shouted}:{port}"
    variant = f"{scheme.upper() if flips and flips[0] else scheme}://{shouted_netloc}{path}{'/' * slashes}"
    assert endpoint_family(variant) == canonical
    assert canonical not in ("openai", "bundled")
    assert canonical.startswith(f"{scheme}://{host}")


# Port 80 is http's own: http://a:80 is http://a (the next test), so it is not "another" port.
_PORTS = st.integers(1, 65535).filter(lambda p: p != 80)


@given(host=HOST, path=PATH, ports=st.lists(_PORTS, min_size=2, max_size=2, unique=True))
def test_different_ports_are_different_endpoints(host: str, path: str, ports: list[int]) -> None:
    a, b = (endpoint_family(f"http://{host}:{p}{path}") for p in ports)
    assert a != b
    assert endpoint_family(f"http://{host}{path}") not in (a, b)


@given(host=HOST, path=PATH)
def test_the_default_port_is_the_same_endpoint(host: str, path: str) -> None:
    assert endpoint_family(f"http://{host}:80{path}") == endpoint_family(f"http://{host}{path}")


@given(host=HOST, path=PATH, other=HOST)
def test_different_hosts_or_paths_are_different_endpoints(host: str, path: str, other: str) -> None:
    assume(other != host)
    assert endpoint_family(f"http://{host}:8000{path}") != endpoint_family(f"http://{other}:8000{path}")
    assert endpoint_family(f"http://{host}:8000{path}") != endpoint_family(f"http://{host}:8000{path}/extra")


def test_credentials_and_query_are_not_part_of_the_family() -> None:
    plain = endpoint_family("http://llm.internal:8000/v1")
    assert endpoint_family("http://user:secret@llm.internal:8000/v1?key=abc") == plain
    assert "secret" not in plain


# -- charge_first ------------------------------------------------------------------------------

ROWS = st.lists(
    st.tuples(
        st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3", "k4"])),
        st.integers(0, 10_000),
        st.integers(0, 10_000),
    ),
    max_size=40,
)


@given(ROWS)
def test_charge_first_keeps_tokens_on_the_first_row_of_each_key(rows: list[tuple[str | None, int, int]]) -> None:
    # As the transform builds it: every row of a key carries that key's tokens (cached ones: a part of the input).
    tokens_of: dict[str, tuple[int, int, int]] = {}
    for key, inp, out in rows:
        if key is not None:
            tokens_of.setdefault(key, (inp, out, inp // 3))
    filled = [(k, *(tokens_of[k] if k is not None else (i, o, i // 3))) for k, i, o in rows]
    frame = pl.DataFrame(
        {
            "row": list(range(len(rows))),
            KEY_COLUMN: [k for k, _, _, _ in filled],
            INPUT_TOKENS_COLUMN: [i for _, i, _, _ in filled],
            OUTPUT_TOKENS_COLUMN: [o for _, _, o, _ in filled],
            CACHED_TOKENS_COLUMN: [c for _, _, _, c in filled],
        },
        schema={
            "row": pl.Int64, KEY_COLUMN: pl.String, INPUT_TOKENS_COLUMN: pl.Int64, OUTPUT_TOKENS_COLUMN: pl.Int64,
            CACHED_TOKENS_COLUMN: pl.Int64,
        },
    )  # fmt: skip
    out = charge_first(frame)
    assert out.columns == frame.columns
    assert out["row"].to_list() == frame["row"].to_list()
    assert out[KEY_COLUMN].to_list() == frame[KEY_COLUMN].to_list()
    seen: set[str] = set()
    tokens = out.select(KEY_COLUMN, INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN, CACHED_TOKENS_COLUMN)
    for key, inp, outp, cached in tokens.iter_rows():
        if key is None:
            assert (inp, outp, cached) == (0, 0, 0)  # no request was sent for a row without a key
        elif key in seen:
            assert (inp, outp, cached) == (0, 0, 0)
        else:
            assert (inp, outp, cached) == tokens_of[key]
            seen.add(key)
    sums = (
        out.filter(pl.col(KEY_COLUMN).is_not_null())
        .group_by(KEY_COLUMN)
        .agg(pl.col(INPUT_TOKENS_COLUMN).sum(), pl.col(OUTPUT_TOKENS_COLUMN).sum(), pl.col(CACHED_TOKENS_COLUMN).sum())
    )
    assert {k: (i, o, c) for k, i, o, c in sums.iter_rows()} == tokens_of


# -- prompt_keys -------------------------------------------------------------------------------

CELL = st.one_of(st.none(), st.sampled_from(["x", "y", "x y", "{b}", "é", ""]))
TABLE = st.lists(st.tuples(CELL, st.one_of(st.none(), st.integers(0, 2)), st.text(max_size=5)), min_size=1, max_size=30)


@settings(max_examples=60)
@given(rows=TABLE, system=st.one_of(st.none(), st.sampled_from(["Be brief.", ""])))
def test_prompt_keys_depend_only_on_the_template_columns(
    rows: list[tuple[str | None, int | None, str]], system: str | None
) -> None:
    frame = pl.DataFrame(
        {"a": [r[0] for r in rows], "b": [r[1] for r in rows], "unused": [r[2] for r in rows]},
        schema={"a": pl.String, "b": pl.Int64, "unused": pl.String},
    )
    identity = AnswerIdentity(model="m", endpoint="openai", temperature=0.0, max_tokens=16)
    spec = EnrichSpec(template=parse_template("Q: {a} / {b}"), output_column="answer", system=system, identity=identity)
    prompts, keys = prompt_keys(frame, spec)
    assert len(prompts) == len(keys) == frame.height
    key_of_values: dict[tuple[str, int], str] = {}
    for (a, b, _), prompt, key in zip(rows, prompts, keys, strict=True):
        if a is None or b is None:
            assert prompt is None and key is None
            continue
        assert prompt == f"Q: {a} / {b}"
        assert key == answer_key(identity, system, prompt)
        # Equal template values give equal keys whatever the unused column holds.
        assert key_of_values.setdefault((a, b), key) == key
    # Different template values give different keys.
    assert len(set(key_of_values.values())) == len(key_of_values)


def test_prompt_keys_follow_the_spec_identity_and_system() -> None:
    frame = pl.DataFrame({"a": ["x"]})
    base = EnrichSpec(template=parse_template("{a}"), output_column="o", identity=AnswerIdentity("m", "openai"))
    (_, [key]) = prompt_keys(frame, base)
    (_, [other_model]) = prompt_keys(frame, replace(base, identity=AnswerIdentity("m2", "openai")))
    (_, [with_system]) = prompt_keys(frame, replace(base, system="s"))
    (_, [other_template]) = prompt_keys(frame, replace(base, template=parse_template("{a}!")))
    assert len({key, other_model, with_system, other_template}) == 4
