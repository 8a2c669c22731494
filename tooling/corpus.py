"""A reproducible, offline caption corpus built from WordNet 3.0 (Debian's `wordnet-base`).

Two sources, mixed:

* ``scene``: video-like scene captions ("a young woman is slicing a tomato in a
  kitchen") generated from templates whose slots are filled with WordNet
  vocabulary chosen by lexicographer class (noun.person, noun.animal,
  noun.artifact, noun.food, places found by hypernym closure; verb.motion,
  verb.contact, verb.consumption, ...), weighted by SemCor frequency
  (``cntlist.rev``) so that common words dominate.
* ``sentence``: WordNet's natural example sentences (the quoted text in glosses).

The split is held out by construction: scene captions are unique strings, and
example sentences are split by synset so that no held-out sentence shares a
gloss with a training one. Everything is a pure function of the WordNet files
and the seed.

Longer than 250 lines: the WordNet reader, the vocabulary tables and the templates are one
generator whose output must stay a pure function of the files and the seed.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from embcap.captions_file import read_caption_lines

WORDNET_DIR = Path("/usr/share/wordnet")

NOUN_LEX = {"animal": 5, "artifact": 6, "food": 13, "location": 15, "object": 17, "person": 18, "plant": 20}
VERB_LEX = {"body": 29, "communication": 32, "competition": 33, "consumption": 34, "contact": 35,
            "creation": 36, "motion": 38, "perception": 39, "possession": 40, "social": 41}
# Synsets (lemma, lexfile) whose hyponyms are places where a scene can happen.
PLACE_ROOTS = [("room", 6), ("building", 6), ("geological_formation", 17), ("body_of_water", 17),
               ("thoroughfare", 6), ("area", 15), ("tract", 15), ("facility", 6), ("mercantile_establishment", 6),
               ("field", 15), ("park", 15), ("vegetation", 3)]
# Intransitive "Somebody ----s" = frame 2; transitive with a thing object = 8/11; with a person = 9.
INTRANSITIVE, TRANSITIVE_THING, TRANSITIVE_PERSON = {2}, {8, 11}, {9}

ADJECTIVES_PERSON = ["young", "old", "little", "tall", "smiling", "tired", "happy", "elderly"]
ADJECTIVES_THING = ["red", "blue", "green", "black", "white", "yellow", "small", "large", "wooden", "old"]
NUMBERS = ["two", "three", "four", "several", "a group of"]
PLACE_PREPS = ["in", "at", "near", "outside", "inside", "next to", "behind"]
TIMES = ["at night", "in the morning", "at sunset", "in the rain", "in the snow", "during the day"]
SHOTS = ["close-up of", "a view of", "footage of", "a video of", "slow motion shot of"]


@dataclass(frozen=True)
class Caption:
    """One corpus line: its text, its source ("scene" or "sentence") and its group key."""

    text: str
    source: str
    group: str


@dataclass
class Vocabulary:
    """Frequency-weighted word lists for each slot."""

    people: list[tuple[str, int]] = field(default_factory=list)
    animals: list[tuple[str, int]] = field(default_factory=list)
    objects: list[tuple[str, int]] = field(default_factory=list)
    foods: list[tuple[str, int]] = field(default_factory=list)
    places: list[tuple[str, int]] = field(default_factory=list)
    verbs_intransitive: list[tuple[str, int]] = field(default_factory=list)
    verbs_thing: list[tuple[str, int]] = field(default_factory=list)
    verbs_food: list[tuple[str, int]] = field(default_factory=list)
    verbs_person: list[tuple[str, int]] = field(default_factory=list)


# ---------------------------------------------------------------- WordNet parsing

def _sense_counts(root: Path) -> dict[tuple[str, int, int], int]:
    """(lemma, ss_type, lexfile) -> SemCor tag count summed over senses."""
    counts: dict[tuple[str, int, int], int] = defaultdict(int)
    for line in (root / "cntlist.rev").read_text().splitlines():
        key, _sense, count = line.split()
        lemma, rest = key.split("%", 1)
        ss_type, lexfile = rest.split(":")[:2]
        counts[(lemma, int(ss_type), int(lexfile))] += int(count)
    return counts


def _data_lines(path: Path):
    for line in path.read_text(encoding="latin-1").splitlines():
        if line and not line.startswith(" "):
            yield line


@dataclass
class _Synset:
    offset: str
    lexfile: int
    words: list[str]
    hypernyms: list[str]
    frames: set[int]
    gloss: str
    instance: bool = False


def _parse_data(path: Path, pos: str) -> dict[str, _Synset]:
    synsets: dict[str, _Synset] = {}
    for line in _data_lines(path):
        head, _, gloss = line.partition(" | ")
        parts = head.split()
        offset, lexfile, n_words = parts[0], int(parts[1]), int(parts[3], 16)
        words = [parts[4 + 2 * i].lower() for i in range(n_words)]
        i = 4 + 2 * n_words
        n_ptr = int(parts[i])
        hypernyms = []
        instance = False
        for j in range(n_ptr):
            symbol, target = parts[i + 1 + 4 * j], parts[i + 2 + 4 * j]
            if symbol in ("@", "@i"):
                hypernyms.append(target)
                instance = instance or symbol == "@i"
        i += 1 + 4 * n_ptr
        frames: set[int] = set()
        if pos == "v" and i < len(parts):
            n_frames = int(parts[i])
            for j in range(n_frames):
                frames.add(int(parts[i + 2 + 3 * j]))
        synsets[offset] = _Synset(offset, lexfile, words, hypernyms, frames, gloss, instance)
    return synsets


def _descends(offset: str, synsets: dict[str, _Synset], roots: set[str], memo: dict[str, bool]) -> bool:
    if offset in memo:
        return memo[offset]
    memo[offset] = False  # guards against cycles
    synset = synsets.get(offset)
    result = offset in roots or (synset is not None
                                 and any(_descends(h, synsets, roots, memo) for h in synset.hypernyms))
    memo[offset] = result
    return result


_WORD = re.compile(r"^[a-z]+$")


def _ranked(words: dict[str, int], min_count: int, limit: int) -> list[tuple[str, int]]:
    items = [(w, c) for w, c in words.items() if c >= min_count and _WORD.match(w) and 2 < len(w) <= 12]
    items.sort(key=lambda wc: (-wc[1], wc[0]))
    return items[:limit]


BLOCKLIST = {
    "god", "spirit", "jew", "christian", "negro", "nigger", "muslim", "catholic", "protestant", "devil", "satan",
    "kill", "murder", "rape", "shoot", "stab", "strangle", "slaughter", "execute", "whip", "torture", "assassinate",
    "thing", "work", "world", "product", "cell", "earth", "surface", "ground", "art", "plant", "area", "place",
    "site", "center", "front", "facility", "country", "feed", "ration", "diet", "fare", "anode", "cathode",
    "female", "male", "head", "queen", "game", "meat", "use", "need", "cause", "mean", "fail", "have", "get",
    "hoof", "tail", "feather", "young", "larva", "algae", "beef", "giant", "adult", "egg", "buckskin", "andrena",
    "door", "car", "bed", "floor", "box", "boot", "scene", "drug", "bullet", "system", "piece", "block", "hay",
    "imagine", "note", "sound", "reflect", "reveal", "publish", "present", "develop", "produce", "employ",
    "apply", "afford", "utilize", "exercise", "exert", "exploit", "starve", "expend", "avail", "indulge", "mine",
    "crave", "nourish", "cater", "down", "try", "make", "control", "conduct", "manage", "succeed", "promote",
    "engage", "honor", "retire", "bother", "install", "test", "fool", "comrade", "american", "british", "rumen",
}
FOOD_VERBS = {"cook", "cut", "slice", "chop", "bake", "fry", "peel", "grill", "serve", "wash", "hold", "eat",
              "drink", "taste", "mix", "pour", "stir", "boil", "roast", "prepare", "carry", "share", "buy", "sell"}


def _dominant(counts: dict[tuple[str, int, int], int], ss_type: int) -> dict[str, int]:
    """word -> its most frequent lexicographer file for this part of speech."""
    best: dict[str, tuple[int, int]] = {}
    for (word, st, lexfile), count in counts.items():
        if st == ss_type and (word not in best or count > best[word][0]):
            best[word] = (count, lexfile)
    return {word: lexfile for word, (_, lexfile) in best.items()}


def load_vocabulary(root: Path = WORDNET_DIR) -> Vocabulary:
    """Frequency-ranked single-word vocabulary for each slot, from WordNet files.

    A word joins a class only if that class is its most frequent sense's class (so
    "man" is a person, not an animal), and a short blocklist drops abstract,
    offensive or violent words.
    """
    counts = _sense_counts(root)
    noun_home, verb_home = _dominant(counts, 1), _dominant(counts, 2)
    nouns = _parse_data(root / "data.noun", "n")
    verbs = _parse_data(root / "data.verb", "v")
    roots = {s.offset for s in nouns.values() for lemma, lex in PLACE_ROOTS
             if s.lexfile == lex and lemma in s.words[:1]}
    memo: dict[str, bool] = {}
    place_offsets = {o for o in nouns if _descends(o, nouns, roots, memo)}

    def noun_words(lexfiles: set[int], exclude_places: bool = False, only_places: bool = False) -> dict[str, int]:
        words: dict[str, int] = defaultdict(int)
        for synset in nouns.values():
            if synset.lexfile not in lexfiles or synset.instance:
                continue
            is_place = synset.offset in place_offsets
            if (exclude_places and is_place) or (only_places and not is_place):
                continue
            for word in synset.words:
                if word in BLOCKLIST or noun_home.get(word, synset.lexfile) != synset.lexfile:
                    continue
                words[word] = max(words[word], counts.get((word, 1, synset.lexfile), 0))
        return words

    def verb_words(lexfiles: set[int], frames: set[int]) -> dict[str, int]:
        words: dict[str, int] = defaultdict(int)
        for synset in verbs.values():
            if synset.lexfile in lexfiles and synset.frames & frames:
                for word in synset.words:
                    if word in BLOCKLIST or (verb_home.get(word, synset.lexfile) != synset.lexfile
                                             and word not in FOOD_VERBS):
                        continue
                    words[word] = max(words[word], counts.get((word, 2, synset.lexfile), 0))
        return words

    lex = NOUN_LEX
    vlex = VERB_LEX
    people = _ranked(noun_words({lex["person"]}), 3, 150)
    animals = _ranked(noun_words({lex["animal"]}), 1, 80)
    objects = _ranked(noun_words({lex["artifact"], lex["object"], lex["plant"]}, exclude_places=True), 3, 250)
    foods = _ranked(noun_words({lex["food"]}), 1, 70)
    places = _ranked(noun_words({lex["artifact"], lex["object"], lex["location"], 3}, only_places=True), 2, 120)
    return Vocabulary(
        people=people, animals=animals, objects=objects, foods=foods, places=places,
        verbs_intransitive=_ranked(verb_words({vlex["motion"], vlex["body"], vlex["competition"]}, INTRANSITIVE),
                                   2, 80),
        verbs_thing=_ranked(verb_words({vlex["contact"], vlex["creation"], vlex["perception"]}, TRANSITIVE_THING),
                            2, 100),
        verbs_food=[wc for wc in _ranked(verb_words(set(vlex.values()), TRANSITIVE_THING), 0, 10**6)
                    if wc[0] in FOOD_VERBS or verb_home.get(wc[0]) == vlex["consumption"]][:30],
        verbs_person=_ranked(verb_words({vlex["social"], vlex["contact"]}, TRANSITIVE_PERSON), 2, 50),
    )


def example_sentences(root: Path = WORDNET_DIR, min_words: int = 4, max_words: int = 18) -> list[Caption]:
    """WordNet's natural example sentences (quoted in glosses), grouped by synset."""
    found: list[Caption] = []
    seen: set[str] = set()
    for pos, name in (("n", "data.noun"), ("v", "data.verb"), ("a", "data.adj"), ("r", "data.adv")):
        for line in _data_lines(root / name):
            offset = line.split(" ", 1)[0]
            gloss = line.partition(" | ")[2]
            for quoted in re.findall(r'"([^"]+)"', gloss):
                text = re.sub(r"\s+", " ", quoted.replace("--", " ").replace("`", "'")).strip(" ;,")
                if not (min_words <= len(text.split()) <= max_words) or text.lower() in seen:
                    continue
                seen.add(text.lower())
                found.append(Caption(text, "sentence", f"{pos}{offset}"))
    return found


# ---------------------------------------------------------------- inflection

_VOWELS = set("aeiou")


def third_person(verb: str) -> str:
    """'run' -> 'runs', 'wash' -> 'washes', 'carry' -> 'carries'."""
    if verb.endswith(("s", "x", "z", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and len(verb) > 1 and verb[-2] not in _VOWELS:
        return verb[:-1] + "ies"
    return verb + "s"


def present_participle(verb: str) -> str:
    """'run' -> 'running', 'make' -> 'making', 'tie' -> 'tying', 'visit' -> 'visiting'."""
    if verb.endswith("ie"):
        return verb[:-2] + "ying"
    if verb.endswith("e") and not verb.endswith(("ee", "ye", "oe")) and len(verb) > 2:
        return verb[:-1] + "ing"
    syllables = len(re.findall(r"[aeiou]+", verb))
    if (syllables == 1 and len(verb) >= 3 and verb[-1] not in _VOWELS | set("wxy")
            and verb[-2] in _VOWELS and verb[-3] not in _VOWELS):
        return verb + verb[-1] + "ing"
    return verb + "ing"


def plural(noun: str) -> str:
    """'dog' -> 'dogs', 'box' -> 'boxes', 'baby' -> 'babies', 'man' -> 'men'."""
    irregular = {"man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
                 "goose": "geese", "foot": "feet", "tooth": "teeth", "sheep": "sheep", "fish": "fish",
                 "deer": "deer", "wife": "wives", "knife": "knives", "leaf": "leaves", "wolf": "wolves",
                 "calf": "calves", "ox": "oxen"}
    if noun in irregular:
        return irregular[noun]
    if noun.endswith("man"):
        return noun[:-3] + "men"
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in _VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


def article(word: str) -> str:
    """'a' or 'an' for `word`."""
    return "an" if word[0] in _VOWELS else "a"


# ---------------------------------------------------------------- scene captions

class SceneGenerator:
    """Fills caption templates with frequency-weighted WordNet vocabulary."""

    def __init__(self, vocab: Vocabulary, rng: random.Random) -> None:
        self.vocab = vocab
        self.rng = rng
        self._tables: dict[int, tuple[list[str], list[float]]] = {}

    def _pick(self, items: list[tuple[str, int]]) -> str:
        # sqrt-frequency weighting keeps common words common without drowning the tail
        table = self._tables.get(id(items))
        if table is None:
            words = [w for w, _ in items]
            cumulative, total = [], 0.0
            for _, count in items:
                total += max(count, 1) ** 0.5
                cumulative.append(total)
            table = self._tables[id(items)] = (words, cumulative)
        return self.rng.choices(table[0], cum_weights=table[1])[0]

    def _np(self, items: list[tuple[str, int]], adjectives: list[str], p_adj: float = 0.3) -> str:
        noun = self._pick(items)
        if adjectives and self.rng.random() < p_adj:
            adjective = self.rng.choice(adjectives)
            return f"{article(adjective)} {adjective} {noun}"
        return f"{article(noun)} {noun}"

    def _subject(self) -> tuple[str, bool, str]:
        """(noun phrase, plural?, kind) for a person or an animal subject."""
        kind = "person" if self.rng.random() < 0.7 else "animal"
        items = self.vocab.people if kind == "person" else self.vocab.animals
        if self.rng.random() < 0.2:
            return f"{self.rng.choice(NUMBERS)} {plural(self._pick(items))}", True, kind
        adjectives = ADJECTIVES_PERSON if kind == "person" else ADJECTIVES_THING[:8]
        return self._np(items, adjectives), False, kind

    def _place(self) -> str:
        place = self._pick(self.vocab.places)
        text = f"{self.rng.choice(PLACE_PREPS)} {article(place)} {place}"
        if self.rng.random() < 0.15:
            text += " " + self.rng.choice(TIMES)
        return text

    def _verb_phrase(self, verb: str, plural_subject: bool) -> str:
        if self.rng.random() < 0.6:
            return f"{'are' if plural_subject else 'is'} {present_participle(verb)}"
        return verb if plural_subject else third_person(verb)

    def caption(self) -> str:
        """One scene caption."""
        roll = self.rng.random()
        if roll < 0.07:
            return f"{self.rng.choice(SHOTS)} {self._np(self.vocab.objects, ADJECTIVES_THING)} {self._place()}"
        subject, is_plural, kind = self._subject()
        if kind == "animal" or roll < 0.3:
            if kind == "animal" and self.rng.random() < 0.3:
                verb = self._pick(self.vocab.verbs_food)
                food = self._np(self.vocab.foods, [])
                return f"{subject} {self._verb_phrase(verb, is_plural)} {food} {self._place()}"
            verb = self._pick(self.vocab.verbs_intransitive)
            return f"{subject} {self._verb_phrase(verb, is_plural)} {self._place()}"
        if roll < 0.6:
            verb = self._pick(self.vocab.verbs_thing)
            obj = self._np(self.vocab.objects, ADJECTIVES_THING)
        elif roll < 0.78:
            verb = self._pick(self.vocab.verbs_food)
            obj = self._np(self.vocab.foods, [], 0.0)
        else:
            verb = self._pick(self.vocab.verbs_person)
            obj = self._np(self.vocab.people, ADJECTIVES_PERSON)
        text = f"{subject} {self._verb_phrase(verb, is_plural)} {obj}"
        if self.rng.random() < 0.75:
            text += " " + self._place()
        return text


def scene_captions(vocab: Vocabulary, count: int, seed: int) -> list[Caption]:
    """`count` unique scene captions, deterministic for `seed`."""
    generator = SceneGenerator(vocab, random.Random(seed))
    seen: set[str] = set()
    out: list[Caption] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 20 * count:
            raise RuntimeError("vocabulary too small for the requested number of unique captions")
        text = generator.caption()
        if text not in seen:
            seen.add(text)
            out.append(Caption(text, "scene", "scene"))
    return out


# ---------------------------------------------------------------- corpus + split

@dataclass
class Corpus:
    """Training and held-out captions."""

    train: list[Caption]
    heldout: list[Caption]


def build_corpus(
    seed: int = 0,
    heldout_size: int = 1000,
    scene_fraction: float = 0.75,
    max_train: int | None = 80_000,
    root: Path = WORDNET_DIR,
) -> Corpus:
    """Mix scene captions and example sentences (``scene_fraction`` scenes) and hold out a test split.

    The defaults are the default model's corpus: 60,000 scene + 20,000 sentence training captions
    and 750 + 250 held-out ones.

    Sentences are split by synset; scenes are unique strings. Both splits keep the same mix.
    """
    if not (root / "data.noun").is_file():
        raise FileNotFoundError(f"WordNet not found under {root}: apt-get install wordnet-base")
    rng = random.Random(seed)
    sentences = example_sentences(root)
    groups = sorted({c.group for c in sentences})
    rng.shuffle(groups)
    held_sentences_n = round(heldout_size * (1 - scene_fraction))
    held_groups: set[str] = set()
    held_sentences: list[Caption] = []
    by_group: dict[str, list[Caption]] = defaultdict(list)
    for caption in sentences:
        by_group[caption.group].append(caption)
    for group in groups:
        if len(held_sentences) >= held_sentences_n:
            break
        held_groups.add(group)
        held_sentences.extend(by_group[group][:1])  # one sentence per held-out synset
    train_sentences = [c for c in sentences if c.group not in held_groups]
    if max_train is not None:
        rng.shuffle(train_sentences)
        train_sentences = train_sentences[: round(max_train * (1 - scene_fraction))]
    n_train_scenes = round(len(train_sentences) * scene_fraction / (1 - scene_fraction))
    n_held_scenes = heldout_size - len(held_sentences)
    scenes = scene_captions(load_vocabulary(root), n_train_scenes + n_held_scenes, seed)
    held_scenes, train_scenes = scenes[:n_held_scenes], scenes[n_held_scenes:]
    train = train_scenes + train_sentences
    heldout = held_scenes + held_sentences
    rng.shuffle(train)
    rng.shuffle(heldout)
    return Corpus(train=train, heldout=heldout)


def write_captions(captions: list[Caption], path: str | Path) -> Path:
    """Write `source<TAB>text` lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{c.source}\t{c.text}\n" for c in captions))
    return path


def read_captions(path: str | Path) -> list[Caption]:
    """Read a captions file (embcap.captions_file): one Caption per line, grouped by its source."""
    return [Caption(text, source, source) for text, source in zip(*read_caption_lines(path))]
