"""The WordNet caption corpus: deterministic for a seed, with a clean held-out split."""

from __future__ import annotations

import pytest

from tooling import corpus
from tooling.corpus import build_corpus, plural, present_participle, read_captions, third_person, write_captions

pytestmark = pytest.mark.skipif(not (corpus.WORDNET_DIR / "data.noun").is_file(),
                                reason="WordNet not installed (apt-get install wordnet-base)")


@pytest.fixture(scope="module")
def small() -> corpus.Corpus:
    return build_corpus(seed=3, heldout_size=80, max_train=2000)


def test_deterministic_for_a_seed(small):
    again = build_corpus(seed=3, heldout_size=80, max_train=2000)
    assert again.train == small.train and again.heldout == small.heldout
    other = build_corpus(seed=4, heldout_size=80, max_train=2000)
    assert other.train != small.train


def test_sizes_and_mix(small):
    assert len(small.heldout) == 80
    assert len(small.train) == pytest.approx(2000, abs=2)
    scenes = sum(c.source == "scene" for c in small.train)
    assert scenes / len(small.train) == pytest.approx(0.75, abs=0.01)
    assert {c.source for c in small.heldout} == {"scene", "sentence"}


def test_heldout_is_disjoint(small):
    assert not {c.text for c in small.heldout} & {c.text for c in small.train}
    held_groups = {c.group for c in small.heldout if c.source == "sentence"}
    assert not held_groups & {c.group for c in small.train if c.source == "sentence"}


def test_scene_captions_look_like_scenes(small):
    scenes = [c.text for c in small.train if c.source == "scene"]
    assert all(3 <= len(s.split()) <= 20 for s in scenes)
    assert all(s == s.lower() for s in scenes)
    vocab = corpus.load_vocabulary()
    people = {w for w, _ in vocab.people}
    assert {"man", "woman", "child"} <= people and "god" not in people
    assert "dog" in {w for w, _ in vocab.animals} and "man" not in {w for w, _ in vocab.animals}


def test_roundtrip_file(small, tmp_path):
    path = write_captions(small.heldout, tmp_path / "heldout.txt")
    back = read_captions(path)
    assert [c.text for c in back] == [c.text for c in small.heldout]
    assert [c.source for c in back] == [c.source for c in small.heldout]


@pytest.mark.parametrize("verb,ing,s", [("run", "running", "runs"), ("make", "making", "makes"),
                                        ("tie", "tying", "ties"), ("wash", "washing", "washes"),
                                        ("carry", "carrying", "carries"), ("visit", "visiting", "visits"),
                                        ("see", "seeing", "sees"), ("play", "playing", "plays")])
def test_inflection(verb, ing, s):
    assert present_participle(verb) == ing and third_person(verb) == s


def test_plural():
    assert [plural(w) for w in ["dog", "box", "baby", "man", "fireman", "child", "day"]] == [
        "dogs", "boxes", "babies", "men", "firemen", "children", "days"]
