"""The cache of generated pairs (annotate/pair_cache.py): which file a server's pairs go
to, and that what one server appended (a torn last line included) another reads back."""

from annotate.pair_cache import append_pairs, cache_file, read_pairs
from annotate.pairs import pair_from_row
from trainer.endpoints import Endpoint

SAMPLING = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 128}


def endpoint(**recommended) -> Endpoint:
    return Endpoint("ep", "served-model", "http://127.0.0.1:9/v1", "key", recommended=recommended)


def pair(i: int):
    row = {"pair_id": f"p{i}", "prompt": f"Question {i}?", "response_a": "yes", "response_b": "no"}
    return pair_from_row({**row, "model_a": "m1", "model_b": "m2"})


def test_the_file_is_named_by_models_settings_seed_and_what_an_endpoint_really_samples(tmp_path):
    base = cache_file(tmp_path, ["m1", "m2"], SAMPLING, 0)
    assert base == cache_file(tmp_path, ["m2", "m1"], SAMPLING, 0)  # the models' order is no matter
    assert base != cache_file(tmp_path, ["m1", "m2"], SAMPLING, 1)
    assert base != cache_file(tmp_path, ["m1", "m2"], {**SAMPLING, "top_p": 1.0}, 0)
    assert cache_file(None, ["m1"], SAMPLING, 0) is None

    plain = cache_file(tmp_path, ["m1", "ep"], SAMPLING, 0, {"ep": endpoint()})
    # an endpoint not among the models changes nothing; one among them is keyed by how it is served
    assert cache_file(tmp_path, ["m1", "m2"], SAMPLING, 0, {"ep": endpoint()}) == base
    assert plain != cache_file(tmp_path, ["m1", "ep"], SAMPLING, 0)
    # recommended_config changes what the model samples with: other pairs, another file
    hotter = cache_file(tmp_path, ["m1", "ep"], SAMPLING, 0, {"ep": endpoint(temperature=1.2)})
    assert hotter != plain
    # ...but not when it says what the command says already
    assert cache_file(tmp_path, ["m1", "ep"], SAMPLING, 0, {"ep": endpoint(temperature=0.8)}) == plain


def test_appended_pairs_read_back_in_order_after_a_torn_line(tmp_path):
    path = cache_file(tmp_path / "pairs", ["m1", "m2"], SAMPLING, 0)
    assert read_pairs(path) == []  # no file yet
    append_pairs(path, [pair(0), pair(1)])
    with open(path, "ab") as f:  # a server killed mid-write
        f.write(b'{"pair_id": "p9", "prompt": "Ques')
    append_pairs(path, [pair(2)])
    assert [p.pair_id for p in read_pairs(path)] == ["p0", "p1", "p2"]
    assert read_pairs(path)[2] == pair(2)
