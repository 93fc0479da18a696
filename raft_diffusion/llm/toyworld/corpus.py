"""The toy text world: short product/place/media reviews drawn from templates and word lists.

Everything here is deterministic given a seed. The sentiment lexicon that generates the reviews is
also the *gold* sentiment measure: a completion's gold score is the mean polarity of the lexicon
words it contains (a word right after "not" counts -0.5 times its polarity), in [-3, 3], 0 when it
contains none. The reward model is trained on labels only (each review's 1-5 star rating, which
follows from its gold score) and never sees the lexicon, so reward and gold can disagree, as a
learned reward would.
"""

from __future__ import annotations

import random
import re

# -- lexicon: word -> polarity -----------------------------------------------------------------
GENERAL_POS = {
    "excellent": 3,
    "amazing": 3,
    "wonderful": 3,
    "fantastic": 3,
    "superb": 3,
    "outstanding": 3,
    "great": 2,
    "lovely": 2,
    "impressive": 2,
    "beautiful": 2,
    "charming": 2,
    "fun": 2,
    "good": 1,
    "nice": 1,
    "pleasant": 1,
    "solid": 1,
    "decent": 1,
    "fine": 1,
}
GENERAL_NEG = {
    "terrible": -3,
    "awful": -3,
    "horrible": -3,
    "dreadful": -3,
    "atrocious": -3,
    "pathetic": -3,
    "bad": -2,
    "disappointing": -2,
    "poor": -2,
    "annoying": -2,
    "useless": -2,
    "frustrating": -2,
    "mediocre": -1,
    "weak": -1,
    "dull": -1,
    "meh": -1,
    "forgettable": -1,
    "underwhelming": -1,
}
DOMAINS = {
    "restaurant": {
        "aspects": ["food", "service", "staff", "pasta", "pizza", "soup", "dessert", "prices", "portions", "waiter", "coffee", "music"],
        "pos": {"delicious": 3, "tasty": 2, "fresh": 2, "friendly": 2, "cozy": 1, "generous": 1},
        "neg": {"bland": -2, "stale": -2, "greasy": -1, "rude": -2, "cold": -1, "overpriced": -2},
        "openers": [
            "we had dinner at this restaurant and",
            "i ordered the pasta here and",
            "my friends took me to this place and",
            "we stopped at this cafe for lunch and",
            "i came here for my birthday and",
            "this restaurant opened last month and",
            "we tried the new bistro downtown and",
        ],
    },
    "movie": {
        "aspects": ["plot", "acting", "ending", "soundtrack", "dialogue", "cast", "pacing", "visuals", "story", "director", "humor", "villain"],
        "pos": {"gripping": 3, "moving": 2, "hilarious": 2, "clever": 2, "stunning": 3, "touching": 2},
        "neg": {"boring": -2, "predictable": -1, "confusing": -1, "cheesy": -1, "lifeless": -2, "clumsy": -2},
        "openers": [
            "i watched this movie last night and",
            "we saw this film at the cinema and",
            "my kids wanted to see this movie and",
            "i streamed this film on the weekend and",
            "this movie came out last year and",
            "i rented this film for a quiet evening and",
            "we went to the premiere of this film and",
        ],
    },
    "phone": {
        "aspects": ["battery", "screen", "camera", "speaker", "charger", "design", "software", "price", "keyboard", "case", "display", "sound"],
        "pos": {"reliable": 2, "sharp": 2, "sleek": 2, "speedy": 2, "sturdy": 1, "responsive": 2},
        "neg": {"buggy": -2, "flimsy": -2, "laggy": -2, "dim": -1, "clunky": -1, "faulty": -3},
        "openers": [
            "i bought this phone last month and",
            "i got this tablet as a gift and",
            "my old phone broke so i bought this one and",
            "i have used this laptop for a year and",
            "i ordered these headphones online and",
            "this phone arrived yesterday and",
            "i switched to this phone in the spring and",
        ],
    },
    "hotel": {
        "aspects": ["room", "bed", "staff", "breakfast", "view", "pool", "location", "lobby", "bathroom", "shower", "wifi", "balcony"],
        "pos": {"clean": 2, "spacious": 2, "comfortable": 2, "quiet": 1, "welcoming": 2, "relaxing": 2},
        "neg": {"dirty": -3, "cramped": -2, "noisy": -2, "uncomfortable": -2, "smelly": -2, "shabby": -2},
        "openers": [
            "we stayed at this hotel for a week and",
            "i booked this hotel for a conference and",
            "our family spent the holidays here and",
            "we checked into this resort on friday and",
            "i stayed one night at this inn and",
            "this hotel was recommended to us and",
            "we spent our honeymoon at this hotel and",
        ],
    },
    "book": {
        "aspects": ["story", "characters", "writing", "ending", "plot", "chapters", "cover", "author", "heroine", "prose", "twist", "dialogue"],
        "pos": {"gripping": 3, "moving": 2, "clever": 2, "engaging": 2, "vivid": 2, "elegant": 2},
        "neg": {"boring": -2, "predictable": -1, "confusing": -1, "tedious": -2, "shallow": -2, "clumsy": -2},
        "openers": [
            "i read this book on vacation and",
            "my book club picked this novel and",
            "i finished this novel in two days and",
            "a friend lent me this book and",
            "i listened to the audiobook version and",
            "this novel won an award and",
            "i bought this book at the airport and",
        ],
    },
}
POS_VERBS = {"loved": 3, "adored": 3, "enjoyed": 2, "liked": 1, "appreciated": 1, "admired": 2}
NEG_VERBS = {"hated": -3, "despised": -3, "disliked": -2, "regretted": -2, "resented": -2, "tolerated": -1}
POS_NOUNS = {"delight": 3, "joy": 2, "treat": 2, "highlight": 2, "gem": 3, "triumph": 3}
NEG_NOUNS = {"disaster": -3, "nightmare": -3, "mess": -2, "letdown": -2, "failure": -3, "joke": -2}
POS_ENDINGS = [
    ("highly recommended", {"recommended": 2}),
    ("worth every penny", {"worth": 2}),
    ("i would recommend it to anyone", {"recommend": 2}),
    ("a real gem", {"gem": 3}),
    ("i will happily return", {"happily": 2}),
    ("what a pleasure", {"pleasure": 3}),
]
NEG_ENDINGS = [
    ("what a waste of money", {"waste": -3}),
    ("avoid at all costs", {"avoid": -3}),
    ("i would not recommend it", {}),
    ("never again", {"never": -2}),
    ("i want my money back", {"back": 0}),
    ("such a shame", {"shame": -2}),
]
INTENSIFIERS = ["", "", "very", "really", "quite", "so", "truly", "rather"]
CONNECTORS = ["and", "and", "but", "but", ".", "although", "while", ", and"]

LEXICON: dict[str, float] = {}
for _d in (GENERAL_POS, GENERAL_NEG, POS_VERBS, NEG_VERBS, POS_NOUNS, NEG_NOUNS):
    LEXICON.update(_d)
for _dom in DOMAINS.values():
    LEXICON.update(_dom["pos"])
    LEXICON.update(_dom["neg"])
for _text, _words in POS_ENDINGS + NEG_ENDINGS:
    LEXICON.update({w: v for w, v in _words.items() if v})
NEUTRAL_FILLERS = ["the first time", "overall", "to be honest", "in my opinion", "if you ask me", "for the price"]

_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def gold_score(text: str) -> float:
    """Mean lexicon polarity of ``text`` (negated words count -0.5x); 0.0 when it has no sentiment word."""
    ws = words(text)
    vals = []
    for i, w in enumerate(ws):
        v = LEXICON.get(w)
        if v:
            vals.append(-0.5 * v if i > 0 and ws[i - 1] == "not" else float(v))
    return sum(vals) / len(vals) if vals else 0.0


def gold_sentiment(prompts, completions, **kwargs) -> list[float | None]:
    """Text reward: the gold sentiment of each completion (the prompt is not scored)."""
    return [gold_score(c) for c in completions]


# -- generation --------------------------------------------------------------------------------
def _adjectives(domain: dict, positive: bool) -> dict:
    return {**(GENERAL_POS if positive else GENERAL_NEG), **(domain["pos"] if positive else domain["neg"])}


def _clause(rng: random.Random, domain: dict, positive: bool) -> str:
    aspect = rng.choice(domain["aspects"])
    kind = rng.random()
    if kind < 0.5:
        intens = rng.choice(INTENSIFIERS)
        adj = rng.choice(sorted(_adjectives(domain, positive)))
        return " ".join(x for x in ("the", aspect, "was", intens, adj) if x)
    if kind < 0.6:  # negated opposite: "the soup was not bad" reads mildly positive
        adj = rng.choice(sorted(_adjectives(domain, not positive)))
        return f"the {aspect} was not {adj}"
    if kind < 0.8:
        verb = rng.choice(sorted(POS_VERBS if positive else NEG_VERBS))
        return f"i {verb} the {aspect}"
    noun = rng.choice(sorted(POS_NOUNS if positive else NEG_NOUNS))
    return f"the {aspect} was a {noun}"


def review(rng: random.Random, domain_name: str | None = None, opener: str | None = None, *, independent: bool = False) -> str:
    """One review: opener + 1-3 clauses + optional ending.

    Natural reviews draw a share q of positive clauses per reviewer, and 'but' usually flips the polarity;
    ``independent`` reviews flip a fair coin for every clause and the ending (used to train the reward
    model, so that no single part -- e.g. the closing phrase -- predicts the label on its own).
    """
    domain_name = domain_name or rng.choice(sorted(DOMAINS))
    dom = DOMAINS[domain_name]
    opener = opener or rng.choice(dom["openers"])
    q = 0.5 if independent else rng.choice([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])  # this reviewer's share of positive clauses
    pos = rng.random() < q
    parts = [opener]
    if rng.random() < 0.15:
        parts.append(rng.choice(NEUTRAL_FILLERS))
    parts.append(_clause(rng, dom, pos))
    for _ in range(rng.choice([0, 1, 1, 2, 2])):
        conn = rng.choice(CONNECTORS)
        flip = conn in ("but", "although", "while") and rng.random() < 0.8 and not independent
        pos = (not pos) if flip else (rng.random() < q)
        parts += [conn, _clause(rng, dom, pos)]
    if rng.random() < 0.5:
        ending = rng.choice(POS_ENDINGS if rng.random() < q else NEG_ENDINGS)[0]
        parts += [".", ending]
    return " ".join(parts).replace(" ,", " ,") + " ."


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [review(rng) for _ in range(n)]


def all_openers() -> list[tuple[str, str]]:
    return [(name, o) for name in sorted(DOMAINS) for o in DOMAINS[name]["openers"]]


def prompt_sets() -> tuple[list[str], list[str]]:
    """Training and held-out prompts: openers, and openers continued up to an aspect ('... and the food was').

    The held-out set takes the last opener of each domain (and its continuations), so held-out prompts
    never appear among the training prompts of RAFT (the LM itself saw every opener in its corpus).
    """
    train, held = [], []
    for name in sorted(DOMAINS):
        dom = DOMAINS[name]
        for j, o in enumerate(dom["openers"]):
            aspects = [dom["aspects"][(j * 5 + t) % len(dom["aspects"])] for t in range(2)]
            ps = [o] + [f"{o} the {a} was" for a in aspects[:1]]
            (held if j == len(dom["openers"]) - 1 else train).extend(ps)
    return train, held


def vocabulary() -> list[str]:
    """Every word the generator can emit (plus punctuation), sorted: the tokenizer's vocabulary."""
    seen = set()
    texts = []
    for dom in DOMAINS.values():
        texts += dom["openers"] + dom["aspects"] + list(dom["pos"]) + list(dom["neg"])
    texts += list(GENERAL_POS) + list(GENERAL_NEG) + list(POS_VERBS) + list(NEG_VERBS) + list(POS_NOUNS) + list(NEG_NOUNS)
    texts += [t for t, _ in POS_ENDINGS + NEG_ENDINGS] + INTENSIFIERS + CONNECTORS + NEUTRAL_FILLERS
    texts += ["the was not i a . ,"]
    for t in texts:
        seen.update(t.split())
    return sorted(w for w in seen if w)
