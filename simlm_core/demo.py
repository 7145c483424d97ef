"""A generated retrieval task, so the whole pipeline runs offline in minutes on a laptop CPU.

The task is built so that the pipeline's stages have something real to show:

- Vocabulary mismatch. Each passage is about one *topic*: an agent, an action, a quality, an
  object and a place, each a *concept* with several surface forms (``doctor/physician/medic``).
  The passage uses one form per concept; its query names three of the concepts, usually with a
  different form. Exact-match BM25 therefore misses many relevant passages.
- BM25 distractors. Part of the corpus is passages built to share the query's surface forms for
  two of its concepts while being about a different topic, so exact matching ranks them high.
- Learnable. Dev queries are about other passages than train queries but draw on the same
  concepts and the same synonym groups, so a dense model that learns the synonyms from train
  queries beats BM25 on dev. ``normalise`` maps every form to its concept: BM25 over normalised
  text is the ceiling that shows the gap is learnable (tests/test_demo.py measures both).
- Real lowercase English words in English-ish sentences, so a WordPiece vocabulary trained on
  the corpus or BERT's uncased vocabulary both tokenise it sensibly. Queries have 5-12 words,
  passages 30-60.

Deterministic: the same arguments give byte-identical Parquet files.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from simlm_core.io import ANSWERS_SCHEMA, CORPUS_SCHEMA, QRELS_SCHEMA, QUERIES_SCHEMA, PathLike, write_table

# Concept groups per slot: every word belongs to exactly one group (checked in the tests).
AGENTS: tuple[tuple[str, ...], ...] = (
    ("doctor", "physician", "medic"), ("teacher", "tutor", "instructor"),
    ("farmer", "grower", "rancher"), ("sailor", "mariner", "seaman"),
    ("soldier", "trooper", "warrior"), ("lawyer", "attorney", "counsel"),
    ("chef", "cook", "caterer"), ("writer", "author", "novelist"),
    ("singer", "vocalist", "crooner"), ("painter", "artist", "illustrator"),
    ("builder", "contractor", "constructor"), ("driver", "chauffeur", "motorist"),
    ("student", "pupil", "learner"), ("child", "kid", "youngster"),
    ("merchant", "trader", "dealer"), ("thief", "robber", "burglar"),
    ("king", "monarch", "ruler"), ("judge", "magistrate", "justice"),
    ("officer", "cop", "policeman"), ("pilot", "aviator", "flyer"),
    ("scientist", "researcher", "scholar"), ("nurse", "caregiver", "attendant"),
    ("priest", "cleric", "pastor"), ("hunter", "trapper", "tracker"),
    ("dog", "hound", "puppy"), ("cat", "kitten", "feline"),
    ("horse", "pony", "stallion"), ("athlete", "sportsman", "competitor"),
    ("engineer", "technician", "mechanic"), ("banker", "financier", "lender"),
    ("worker", "laborer", "employee"), ("boss", "manager", "supervisor"),
    ("friend", "companion", "buddy"), ("neighbor", "resident", "dweller"),
    ("guard", "sentry", "watchman"), ("dancer", "ballerina", "performer"),
    ("gardener", "landscaper", "planter"), ("tourist", "traveler", "visitor"),
)
ACTIONS: tuple[tuple[str, ...], ...] = (
    ("repairs", "fixes", "mends"), ("buys", "purchases", "acquires"),
    ("sells", "retails", "vends"), ("builds", "constructs", "assembles"),
    ("cleans", "washes", "scrubs"), ("paints", "colors", "decorates"),
    ("studies", "examines", "inspects"), ("carries", "transports", "hauls"),
    ("finds", "discovers", "locates"), ("hides", "conceals", "buries"),
    ("destroys", "wrecks", "demolishes"), ("protects", "defends", "shields"),
    ("cooks", "simmers", "roasts"), ("steals", "pilfers", "swipes"),
    ("borrows", "rents", "leases"), ("throws", "tosses", "hurls"),
    ("catches", "grabs", "seizes"), ("watches", "observes", "views"),
    ("opens", "unlocks", "unseals"), ("closes", "shuts", "seals"),
    ("measures", "weighs", "gauges"), ("collects", "gathers", "accumulates"),
    ("delivers", "brings", "ships"), ("loses", "misplaces", "forgets"),
    ("fills", "loads", "stuffs"), ("cuts", "slices", "chops"),
    ("polishes", "shines", "buffs"), ("ties", "binds", "fastens"),
    ("moves", "shifts", "relocates"), ("orders", "requests", "requisitions"),
    ("draws", "sketches", "traces"), ("pulls", "drags", "tows"),
    ("pushes", "shoves", "presses"), ("lifts", "raises", "hoists"),
    ("tests", "checks", "tries"), ("stores", "stockpiles", "hoards"),
    ("sorts", "arranges", "organizes"), ("feeds", "nourishes", "nurtures"),
    ("breaks", "smashes", "shatters"), ("donates", "gives", "contributes"),
)
QUALITIES: tuple[tuple[str, ...], ...] = (
    ("big", "large", "huge"), ("small", "tiny", "little"), ("old", "ancient", "aged"),
    ("new", "modern", "recent"), ("red", "crimson", "scarlet"), ("quiet", "silent", "calm"),
    ("famous", "renowned", "celebrated"), ("broken", "damaged", "cracked"),
    ("cheap", "inexpensive", "affordable"), ("beautiful", "pretty", "lovely"),
    ("dirty", "filthy", "grimy"), ("heavy", "weighty", "hefty"), ("strange", "odd", "peculiar"),
    ("expensive", "costly", "pricey"), ("wet", "damp", "soggy"), ("strong", "sturdy", "robust"),
    ("shiny", "glossy", "gleaming"), ("dark", "dim", "shadowy"), ("fast", "quick", "speedy"),
    ("rare", "scarce", "uncommon"), ("simple", "plain", "basic"), ("empty", "vacant", "hollow"),
    ("wooden", "timber", "oaken"), ("golden", "gilded", "gilt"), ("secret", "hidden", "covert"),
    ("ugly", "hideous", "unsightly"), ("clean", "spotless", "tidy"), ("hot", "warm", "heated"),
    ("cold", "chilly", "frozen"), ("soft", "fluffy", "plush"),
)
OBJECTS: tuple[tuple[str, ...], ...] = (
    ("car", "automobile", "vehicle"), ("bicycle", "bike", "cycle"), ("boat", "ship", "vessel"),
    ("house", "home", "dwelling"), ("book", "novel", "volume"), ("letter", "message", "note"),
    ("picture", "image", "photo"), ("money", "cash", "currency"), ("gift", "present", "offering"),
    ("stone", "rock", "pebble"), ("bag", "sack", "pouch"), ("box", "crate", "carton"),
    ("coat", "jacket", "cloak"), ("shoe", "boot", "sneaker"), ("hat", "cap", "bonnet"),
    ("chair", "seat", "stool"), ("table", "desk", "bench"), ("knife", "blade", "dagger"),
    ("rope", "cord", "cable"), ("bottle", "flask", "jug"), ("cup", "mug", "tumbler"),
    ("lamp", "lantern", "torch"), ("clock", "timepiece", "chronometer"), ("map", "chart", "atlas"),
    ("door", "gate", "portal"), ("bread", "loaf", "baguette"), ("soup", "broth", "stew"),
    ("drink", "beverage", "refreshment"), ("medicine", "drug", "remedy"),
    ("tool", "instrument", "implement"), ("machine", "engine", "motor"),
    ("computer", "laptop", "terminal"), ("phone", "telephone", "handset"),
    ("document", "paper", "record"), ("jewel", "gem", "diamond"), ("toy", "plaything", "doll"),
    ("blanket", "quilt", "duvet"), ("carpet", "rug", "mat"),
)
PLACES: tuple[tuple[str, ...], ...] = (
    ("harbor", "port", "dock"), ("market", "bazaar", "marketplace"),
    ("school", "academy", "college"), ("hospital", "clinic", "infirmary"),
    ("church", "chapel", "cathedral"), ("forest", "woods", "jungle"),
    ("river", "stream", "creek"), ("mountain", "hill", "peak"), ("city", "town", "metropolis"),
    ("village", "hamlet", "settlement"), ("garden", "yard", "orchard"),
    ("field", "meadow", "pasture"), ("shop", "store", "boutique"),
    ("restaurant", "diner", "cafe"), ("hotel", "inn", "motel"), ("station", "depot", "stop"),
    ("airport", "airfield", "airstrip"), ("library", "archive", "athenaeum"),
    ("prison", "jail", "penitentiary"), ("palace", "castle", "mansion"),
    ("farm", "ranch", "homestead"), ("office", "bureau", "workplace"),
    ("kitchen", "galley", "pantry"), ("beach", "shore", "coast"), ("island", "isle", "atoll"),
    ("desert", "wasteland", "dunes"), ("lake", "pond", "lagoon"),
    ("bridge", "viaduct", "overpass"), ("tunnel", "passage", "underpass"),
    ("factory", "plant", "mill"), ("warehouse", "storehouse", "stockroom"),
    ("museum", "gallery", "exhibition"), ("stadium", "arena", "ballpark"),
    ("park", "playground", "commons"), ("cave", "cavern", "grotto"),
    ("valley", "canyon", "gorge"), ("theater", "cinema", "playhouse"),
    ("cellar", "basement", "vault"), ("tower", "spire", "turret"),
    ("camp", "campsite", "encampment"),
)
SLOTS: tuple[str, ...] = ("agent", "action", "quality", "object", "place")
GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "agent": AGENTS, "action": ACTIONS, "quality": QUALITIES, "object": OBJECTS, "place": PLACES,
}

# Background words (never concept forms): they pad passages to length like real prose does.
BACKGROUND = (
    "history family music weather season winter summer spring autumn morning evening night "
    "week month year story song dinner breakfast lunch holiday festival wedding party journey "
    "rain snow wind sun cloud storm fog sky light noise smell taste color shape price "
    "language culture tradition custom legend rumor report news crowd group team club "
    "council committee company business industry region country province county district "
    "street road avenue square corner neighborhood community population government election "
    "century decade generation childhood memory habit hobby game sport football tennis chess "
    "painting poetry dance film radio television newspaper magazine journal"
).split()
BACKGROUND_ADJ = (
    "popular common usual local national public private busy early late nearby important "
    "pleasant friendly careful patient honest gentle proud lucky happy sad"
).split()
FILLER_SENTENCES = (
    "many people in the {r} talk about the {b} and the {b2} .",
    "it is {a} to see how the {b} changes every {t} .",
    "during the {t} the {b} was {a} and the {b2} was {a2} .",
    "some say the {b} of the {r} is {a} .",
    "after the {b} everyone went back for the {t} .",
    "the {b} was {a} this {t} , as it often is .",
    "nobody expected the {b} to be so {a} .",
    "the {r} has a long {b} of {b2} .",
    "in the {t} there is always a {a} {b} .",
)
TIMES = ("day", "week", "month", "year", "season", "evening", "morning", "winter", "summer")
REGIONS = ("region", "country", "province", "county", "district", "neighborhood", "community")
QUESTION_WORDS = ("who", "has", "where", "does", "keep", "what", "do", "with", "at", "in", "near")


def concept_of() -> dict[str, str]:
    """Every surface form -> its concept name (the group's first form, prefixed by the slot)."""
    return {form: f"{slot}:{group[0]}" for slot, groups in GROUPS.items() for group in groups for form in group}


def normalise(text: str) -> str:
    """Replace each surface form in ``text`` by its concept name (the learnable ceiling)."""
    table = concept_of()
    return " ".join(table.get(w, w) for w in text.split())


@dataclass
class _Topic:
    """Concept index per slot, and the surface form index the passage uses for each."""

    concepts: dict[str, int]
    forms: dict[str, int]

    def word(self, slot: str) -> str:
        return GROUPS[slot][self.concepts[slot]][self.forms[slot]]


@dataclass
class _Query:
    target: int  # index of the relevant passage
    slots: tuple[str, ...]  # the three concepts it names
    forms: dict[str, int]  # surface form index per named slot


def _random_topic(rng: random.Random) -> _Topic:
    concepts = {s: rng.randrange(len(GROUPS[s])) for s in SLOTS}
    forms = {s: rng.randrange(len(GROUPS[s][concepts[s]])) for s in SLOTS}
    return _Topic(concepts, forms)


def _make_query(rng: random.Random, target: int, topic: _Topic, same_form: float) -> _Query:
    """Name the object and two other concepts; keep the passage's form with prob ``same_form``."""
    others = rng.sample([s for s in SLOTS if s != "object"], 2)
    slots = tuple(s for s in SLOTS if s == "object" or s in others)
    forms = {}
    for s in slots:
        n = len(GROUPS[s][topic.concepts[s]])
        if rng.random() < same_form:
            forms[s] = topic.forms[s]
        else:
            forms[s] = rng.choice([f for f in range(n) if f != topic.forms[s]])
    return _Query(target, slots, forms)


def _distractor(rng: random.Random, topic: _Topic, query: _Query) -> _Topic:
    """A topic sharing two of the query's concepts, in the query's own words, but not the third."""
    shared = rng.sample(list(query.slots), 2)
    out = _random_topic(rng)
    for s in SLOTS:
        if s in shared:
            out.concepts[s], out.forms[s] = topic.concepts[s], query.forms[s]
        elif out.concepts[s] == topic.concepts[s]:
            out.concepts[s] = (out.concepts[s] + 1 + rng.randrange(len(GROUPS[s]) - 1)) % len(GROUPS[s])
            out.forms[s] = rng.randrange(len(GROUPS[s][out.concepts[s]]))
    return out


def _filler(rng: random.Random) -> list[str]:
    template = rng.choice(FILLER_SENTENCES)
    b, b2 = rng.sample(BACKGROUND, 2)
    a, a2 = rng.sample(BACKGROUND_ADJ, 2)
    return template.format(b=b, b2=b2, a=a, a2=a2, t=rng.choice(TIMES), r=rng.choice(REGIONS)).split()


def _passage(rng: random.Random, topic: _Topic, length: tuple[int, int], remention: float) -> str:
    """Topic sentence, a second mention, then background sentences up to a drawn length.

    The second mention refers to each concept with another of its forms with probability
    ``remention`` (as real text varies its wording): the corpus itself then shows which forms
    are synonyms, which is what pre-training on the corpus can learn and labels alone barely can.
    """
    w = topic.word

    def w2(slot: str) -> str:
        forms = GROUPS[slot][topic.concepts[slot]]
        if rng.random() < remention:
            return rng.choice([f for i, f in enumerate(forms) if i != topic.forms[slot]])
        return w(slot)

    words = f"the {w('agent')} {w('action')} the {w('quality')} {w('object')} at the {w('place')} .".split()
    second = rng.choice((
        f"every {rng.choice(TIMES)} the {w2('agent')} comes back to the {w2('place')} .",
        f"the {w2('quality')} {w2('object')} stays at the {w2('place')} for a {rng.choice(TIMES)} .",
        f"that is why the {w2('agent')} {w2('action')} it with care .",
    ))
    words += second.split()
    target = rng.randint(*length)
    while True:
        more = _filler(rng)
        if len(words) + len(more) > length[1]:
            if len(words) >= length[0]:
                break
            continue
        words += more
        if len(words) >= target:
            break
    return " ".join(words)


def _query_text(rng: random.Random, topic: _Topic, query: _Query) -> str:
    """A question about the named concepts, in the query's surface forms; its question word
    follows what is left out (who: the agent, where: the place, what ... do: the action)."""
    f = {s: GROUPS[s][topic.concepts[s]][query.forms[s]] for s in query.slots}
    thing = ["the"] + ([f["quality"]] if "quality" in f else []) + [f["object"]]
    where = [rng.choice(("at", "in", "near")), "the", f["place"]] if "place" in f else []
    if "agent" not in f:
        words = ["who"] + ([f["action"]] if "action" in f else ["has"]) + thing + where
    elif "place" not in f:
        words = ["where", "does", "the", f["agent"]] + ([f["action"]] if "action" in f else ["keep"]) + thing
    else:
        words = ["what", "does", "the", f["agent"], "do", "with"] + thing + where
    return " ".join(words)


def _write(out: Path, corpus: list[tuple[str, str]], splits: dict[str, list[tuple[str, str, str]]]) -> dict[str, int]:
    titles = [""] * len(corpus)
    write_table(pa.table({"pid": [p for p, _ in corpus], "title": titles, "text": [t for _, t in corpus]},
                         schema=CORPUS_SCHEMA), out / "corpus.parquet", CORPUS_SCHEMA)
    counts = {"corpus.parquet": len(corpus)}
    for name, rows in splits.items():
        qids = [r[0] for r in rows]
        write_table(pa.table({"qid": qids, "text": [r[1] for r in rows]}, schema=QUERIES_SCHEMA),
                    out / "queries" / f"{name}.parquet", QUERIES_SCHEMA)
        write_table(pa.table({"qid": qids, "pid": [r[2] for r in rows], "relevance": [1] * len(rows)},
                             schema=QRELS_SCHEMA), out / "qrels" / f"{name}.parquet", QRELS_SCHEMA)
        write_table(pa.table({"qid": [], "answers": []}, schema=ANSWERS_SCHEMA),
                    out / "answers" / f"{name}.parquet", ANSWERS_SCHEMA)  # no answers: 0 rows
        counts[f"queries/{name}.parquet"] = counts[f"qrels/{name}.parquet"] = len(rows)
        counts[f"answers/{name}.parquet"] = 0
    return counts


def generate_demo(
    out_dir: PathLike,
    seed: int = 13,
    num_passages: int = 3000,
    num_train_queries: int = 2000,
    num_dev_queries: int = 200,
    passage_words: tuple[int, int] = (30, 60),
    query_same_form: float = 0.4,
    remention: float = 0.8,
) -> dict[str, Any]:
    """Write the demo corpus, queries and qrels (splits ``train``, ``dev``) under ``out_dir``.

    One passage per query is its target; the remaining ``num_passages - queries`` passages are
    BM25 distractors for randomly chosen queries. ``query_same_form`` is the chance that a query
    repeats the passage's own word for a concept (lower = harder for BM25); ``remention`` the
    chance that a passage's second mention of a concept uses another of its forms.
    Returns the same summary shape as ``simlm_core.data.prepare_dataset``.
    """
    n_queries = num_train_queries + num_dev_queries
    if num_passages < n_queries or min(num_train_queries, num_dev_queries) < 1:
        raise ValueError(f"demo needs num_passages >= train + dev queries >= 2, got {num_passages}, "
                         f"{num_train_queries}, {num_dev_queries}")
    lo, hi = passage_words
    if not 20 <= lo <= hi:
        raise ValueError(f"passage_words must be (lo, hi) with 20 <= lo <= hi, got {passage_words}")
    rng = random.Random(seed)
    topics = [_random_topic(rng) for _ in range(n_queries)]
    queries = [_make_query(rng, i, t, query_same_form) for i, t in enumerate(topics)]
    for q in rng.choices(queries, k=num_passages - n_queries):
        topics.append(_distractor(rng, topics[q.target], q))
    order = list(range(num_passages))
    rng.shuffle(order)  # pid order reveals nothing about targets vs distractors
    pid_of = {i: f"p{rank}" for rank, i in enumerate(order)}
    corpus = [(pid_of[i], _passage(rng, topics[i], (lo, hi), remention)) for i in order]
    rows = [(f"q{k}", _query_text(rng, topics[q.target], q), pid_of[q.target]) for k, q in enumerate(queries)]
    out = Path(out_dir)
    counts = _write(out, corpus, {"train": rows[:num_train_queries], "dev": rows[num_train_queries:]})
    return {"format": "demo", "splits": ["train", "dev"], "counts": counts, "corpus_row_groups": 1, "warnings": []}


__all__ = ["generate_demo", "normalise", "concept_of", "GROUPS", "SLOTS", "BACKGROUND"]
