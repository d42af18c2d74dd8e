"""DataRow masking: placeholders in text-like values, valid JSON for json/jsonb, NULL for types a
placeholder would break, correct lengths throughout."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.postgres import masking, wire
from proxy.postgres.masking import MaskSpec, RowMasker, mask_copy_data, mask_data_row
from proxy.postgres.wire import FieldDescription as F

TEXT, VARCHAR, BPCHAR, NAME, INT4, INT8, NUMERIC, BYTEA, JSON, JSONB, TEXTARR, DATE, XML = (
    25, 1043, 1042, 19, 23, 20, 1700, 17, 114, 3802, 1009, 1082, 142)


def desc(*fields: F) -> wire.RowDescription:
    return wire.RowDescription(tuple(fields))


def row(*values) -> bytes:
    return wire.data_row(values)


def values_of(data: bytes) -> list[bytes | None]:
    (r,) = wire.read_messages("backend", data)
    return [None if v is None else bytes(v) for v in r.values]


def test_text_columns_keep_their_other_content():
    m = RowMasker(desc(F("id", INT4), F("note", TEXT), F("v", VARCHAR), F("c", BPCHAR), F("n", NAME)))
    out = m.mask(row("7", "mail alice@example.com now", "AKIAIOSFODNN7EXAMPLE", "078-05-1120", "plain"))
    assert values_of(out) == [b"7", b"mail [masked:email] now", b"[masked:aws_access_key]", b"[masked:us_ssn]",
                              b"plain"]
    assert m.counts == {"email": 1, "aws_access_key": 1, "us_ssn": 1}


def test_unchanged_rows_return_none_and_one_shot_returns_input():
    d = desc(F("note", TEXT))
    data = row("nothing to see")
    assert RowMasker(d).mask(data) is None
    assert mask_data_row(data, d) == data
    assert RowMasker(d).mask(row(None)) is None


def test_lengths_are_rewritten():
    d = desc(F("a", TEXT), F("b", TEXT), F("c", TEXT))
    out = RowMasker(d).mask(row("x@y.org", None, "z"))
    (r,) = wire.read_messages("backend", out)
    assert len(r.values) == 3 and r.values[1] is None
    assert out[1:5] == (len(out) - 1).to_bytes(4, "big")


def test_column_name_rules_mask_whole_values():
    d = desc(F("password_hash", TEXT), F("ssn", INT4), F("api_key", VARCHAR), F("dob", DATE), F("token_count", INT4))
    out = RowMasker(d).mask(row("$2b$12$abcdef", "123456789", "k-1", "1990-01-01", "12"))
    assert values_of(out) == [b"[masked:password]", None, b"[masked:api_key]", None, b"12"]


def test_non_text_types_become_null_when_content_matches():
    d = desc(F("card", INT8), F("amount", NUMERIC), F("n", INT4))
    out = RowMasker(d).mask(row("4111111111111111", "12.50", "411111111"))
    assert values_of(out) == [None, b"12.50", b"411111111"]


def test_json_is_masked_as_json():
    d = desc(F("doc", JSON))
    doc = {"user": {"email": "a@b.io", "password": "hunter2", "n": 4111111111111111},
           "tags": ["x", "call +44 20 7946 0958"], "ok": True, "none": None}
    out = values_of(RowMasker(d).mask(row(json.dumps(doc))))[0]
    assert json.loads(out) == {"user": {"email": "[masked:email]", "password": "[masked:password]",
                                        "n": "[masked:credit_card]"},
                               "tags": ["x", "call [masked:phone]"], "ok": True, "none": None}


def test_invalid_json_falls_back_to_text_masking():
    out = values_of(RowMasker(desc(F("doc", JSON))).mask(row('{"broken": "a@b.io"')))[0]
    assert out == b'{"broken": "[masked:email]"'


def test_whole_json_column_stays_valid_json():
    out = values_of(RowMasker(desc(F("secret", JSONB))).mask(row('{"a": 1}')))[0]
    assert json.loads(out) == "[masked:secret]"


def test_binary_text_and_jsonb():
    d = desc(F("note", TEXT, format=1), F("doc", JSONB, format=1), F("n", INT8, format=1),
             F("password", JSONB, format=1))
    data = row("x@y.org", b"\x01" + b'{"k": "x@y.org"}', (4111111111111111).to_bytes(8, "big"), b'\x01"pw"')
    out = values_of(RowMasker(d).mask(data))
    assert out[0] == b"[masked:email]"
    assert out[1][:1] == b"\x01" and json.loads(out[1][1:]) == {"k": "[masked:email]"}
    assert out[2] == (4111111111111111).to_bytes(8, "big")  # binary int8 cannot be read as text: untouched
    assert out[3][:1] == b"\x01" and json.loads(out[3][1:]) == "[masked:password]"


def test_binary_non_text_column_rule_becomes_null():
    d = desc(F("ssn", INT4, format=1))
    assert values_of(RowMasker(d).mask(row((123456789).to_bytes(4, "big")))) == [None]


def test_jsonb_binary_with_unknown_version_is_left_alone():
    d = desc(F("doc", JSONB, format=1))
    assert RowMasker(d).mask(row(b"\x02a@b.io")) is None


def test_bytea_text_and_binary():
    d = desc(F("blob", BYTEA), F("raw", BYTEA, format=1), F("clean", BYTEA))
    out = values_of(RowMasker(d).mask(row("\\x" + b"x@y.org".hex(), b"mail x@y.org", "\\x00ff")))
    assert out == [None, None, b"\\x00ff"]


def test_text_arrays_keep_array_syntax():
    d = desc(F("emails", TEXTARR))
    out = values_of(RowMasker(d).mask(row('{a@b.io,"x y@z.org",plain}')))[0]
    assert out == b'{[masked:email],"x [masked:email]",plain}'


def test_user_defined_types_in_text_get_placeholders():
    d = desc(F("e", 16500), F("password", 16501))
    assert values_of(RowMasker(d).mask(row("a@b.io", "x"))) == [b"[masked:email]", b"[masked:password]"]


def test_xml_is_text():
    out = values_of(RowMasker(desc(F("x", XML))).mask(row("<a>x@y.org</a>")))[0]
    assert out == b"<a>[masked:email]</a>"


def test_result_formats_override_the_description():
    """After Describe(statement) every format code is 0; Bind's result formats are the truth."""
    d = desc(F("n", INT8), F("note", TEXT))
    binary_card = (4111111111111111).to_bytes(8, "big")
    assert RowMasker(d, result_formats=(1,)).mask(row(binary_card, "a@b.io")) is not None
    out = values_of(RowMasker(d, result_formats=(1, 0)).mask(row(binary_card, "a@b.io")))
    assert out == [binary_card, b"[masked:email]"]


def test_spec_from_decision_names():
    d = desc(F("email", TEXT), F("password", TEXT), F("notes", TEXT))
    data = row("a@b.io", "pw", "ssn 078-05-1120")
    assert values_of(RowMasker(d, MaskSpec.from_names([])).mask(data)) == [
        b"[masked:email]", b"[masked:password]", b"ssn [masked:us_ssn]"]
    assert values_of(RowMasker(d, MaskSpec.from_names(["email"])).mask(data)) == [
        b"[masked:email]", b"pw", b"ssn 078-05-1120"]
    assert values_of(RowMasker(d, MaskSpec.from_names(["password"])).mask(data)) == [
        b"a@b.io", b"[masked:password]", b"ssn 078-05-1120"]
    assert values_of(RowMasker(d, MaskSpec.from_names(["Notes"])).mask(data)) == [
        b"a@b.io", b"pw", b"[masked:notes]"]
    assert values_of(RowMasker(d, MaskSpec.from_names(["pii"])).mask(data)) == [
        b"[masked:email]", b"pw", b"ssn [masked:us_ssn]"]
    assert values_of(RowMasker(d, MaskSpec.from_names(["default", "notes"])).mask(data)) == [
        b"[masked:email]", b"[masked:password]", b"[masked:notes]"]


def test_inactive_masker_is_free():
    m = RowMasker(desc(F("id", INT4), F("d", DATE)))
    assert not m.active
    assert m.mask(b"garbage") is None  # not even parsed


@pytest.mark.parametrize("data,match", [
    (row("a", "b"), "2 columns"),
    (b"T\0\0\0\6\0\0", "not a DataRow"),
    (b"D\0\0\0\x0a\0\1\0\0\0\x09", "length invalid"),
    (b"D\0\0\0\x06\0\1", "truncated"),
    (row("a") + b"x", "trailing"),
])
def test_malformed_rows_raise_protocol_error(data, match):
    data = bytearray(data)
    if match == "trailing":
        data[1:5] = (len(data) - 1).to_bytes(4, "big")
    with pytest.raises(wire.ProtocolError, match=match):
        RowMasker(desc(F("note", TEXT))).mask(bytes(data))


def test_accepts_a_frame_view():
    d = desc(F("note", TEXT))
    reader = wire.FrameReader("backend")
    reader.feed(row("x@y.org"))
    frame = reader.next_frame()
    assert values_of(RowMasker(d).mask(frame.data)) == [b"[masked:email]"]


def test_copy_data_and_text():
    assert mask_copy_data(b"1\ta@b.io\tok\n") == b"1\t[masked:email]\tok\n"
    assert mask_copy_data(b"1\tplain\n") is None
    assert masking.mask_text("SELECT 'a@b.io'") == "SELECT '[masked:email]'"


_VALUE = st.one_of(
    st.none(),
    st.text(max_size=30),
    st.sampled_from(["a@b.io", "4111 1111 1111 1111", "078-05-1120", "AKIAIOSFODNN7EXAMPLE", '{"password": 1}',
                     "\\x" + b"x@y.org".hex(), "12", "{a@b.io}"]),
)
_TYPES = st.sampled_from([TEXT, VARCHAR, INT4, INT8, JSON, JSONB, BYTEA, TEXTARR, DATE, 16500])
_NAMES = st.sampled_from(["note", "password", "ssn", "id", "token_count", "email"])


@settings(max_examples=300, deadline=None)
@given(cols=st.lists(st.tuples(_NAMES, _TYPES, st.integers(0, 1), _VALUE), min_size=1, max_size=6))
def test_property_masked_rows_are_well_formed(cols):
    d = desc(*[F(n, t, format=f) for n, t, f, _ in cols])
    values = [None if v is None else v.encode() for *_, v in cols]
    data = wire.data_row(values)
    m = RowMasker(d)
    out = m.mask(data)
    if out is None:
        return
    (r,) = wire.read_messages("backend", out)
    assert len(r.values) == len(cols)
    for (_, t, f, _), before, after in zip(cols, values, r.values, strict=True):
        if before is None:
            assert after is None  # NULL stays NULL
        if after is not None and t in (JSON, JSONB) and f == 0 and bytes(after) != before and _is_json(before):
            json.loads(bytes(after))  # rewritten JSON still parses


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def test_json_too_deep_to_inspect_is_hidden():
    deep = "[" * 5000 + "]" * 5000
    out = values_of(RowMasker(desc(F("doc", JSONB))).mask(row(deep)))[0]
    assert json.loads(out) == "[masked:json_too_deep]"
    shallow = '{"a": ' * 50 + '"x@y.org"' + "}" * 50
    out = values_of(RowMasker(desc(F("doc", JSON))).mask(row(shallow)))[0]
    assert b"[masked:email]" in out
