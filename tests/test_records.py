"""The shared record format: chains, checkpoints and what verify_chain names."""

from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recorder import records as R

HOST = "host-a"


def _chain(n=6):
    key = Ed25519PrivateKey.generate()
    recs = list(R.chain(HOST, 1, R.GENESIS, [("event", f'{{"n":{i}}}') for i in range(1, n + 1)]))
    cps = [R.sign_checkpoint(key, HOST, r.seq, bytes.fromhex(r.hash), 1000 + r.seq) for r in recs if r.seq % 3 == 0]
    return key, recs, cps


def test_intact_chain_has_no_findings():
    key, recs, cps = _chain()
    assert R.verify_chain(HOST, recs, cps, key.public_key()) == []


def test_changed_record_is_named():
    key, recs, cps = _chain()
    recs[3] = replace(recs[3], body='{"n":99}')
    f = R.verify_chain(HOST, recs, cps, key.public_key())
    assert (f[0].problem, f[0].seq) == ("changed", 4)


def test_removed_record_is_named():
    key, recs, cps = _chain()
    del recs[1]
    f = R.verify_chain(HOST, recs, cps, key.public_key())
    assert (f[0].problem, f[0].seq) == ("removed", 2)


def test_inserted_record_is_named():
    key, recs, cps = _chain()
    # a record slipped in after seq 2, the rest renumbered, its hash made to fit the stored chain
    fake = next(R.chain(HOST, 3, bytes.fromhex(recs[1].hash), [("event", '{"n":"forged"}')]))
    tail = [replace(r, seq=r.seq + 1) for r in recs[2:]]
    f = R.verify_chain(HOST, recs[:2] + [fake] + tail, cps, key.public_key())
    assert (f[0].problem, f[0].seq) == ("inserted", 3)


def test_rewritten_chain_fails_its_checkpoint():
    key, recs, cps = _chain()
    forged = list(R.chain(HOST, 1, R.GENESIS, [(r.kind, r.body if r.seq != 2 else '{"n":0}') for r in recs]))
    f = R.verify_chain(HOST, forged, cps, key.public_key())
    assert f and f[0].problem == "bad-checkpoint" and f[0].seq == 3


def test_wrong_key_and_unsigned_tail():
    key, recs, cps = _chain(7)
    f = R.verify_chain(HOST, recs, cps, Ed25519PrivateKey.generate().public_key())
    assert [x.problem for x in f] == ["bad-checkpoint", "bad-checkpoint", "unsigned"]
    assert R.verify_chain(HOST, recs, cps, key.public_key())[0].problem == "unsigned"


def test_json_round_trip_and_refusals():
    key, recs, cps = _chain(3)
    for item in (recs[0], cps[0]):
        assert R.from_json(R.to_json(item)) == item
    for bad in ({}, {"type": "record"}, {**R.to_json(recs[0]), "seq": -1}, {**R.to_json(recs[0]), "kind": "x"},
                {**R.to_json(recs[0]), "body": {"n": 1}}, {**R.to_json(recs[0]), "hash": "zz"}, []):
        try:
            R.from_json(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
