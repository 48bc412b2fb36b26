"""The words the fictional world is written with (notebook 05 §1): value sets, paraphrase
templates per relation, name syllables, and for the realistic world (notebook 10) aliases,
filler sentences and co-occurrence distractors."""

from __future__ import annotations

CITIES = [
    "Lumora", "Vethis", "Quarnel", "Ostrava Minor", "Pellucid Bay", "Zandor", "Mirethol",
    "Kestrune", "Ulvaro", "Thrennic", "Saldimere", "Orvask", "Yllendra", "Brakkon", "Feyhollow",
    "Gorrimund", "Istrelle", "Narvosk", "Peltharn", "Rovendale", "Suvrenne", "Tolvanis",
    "Wexmoor", "Ardunel",
]  # fmt: skip
OCCUPATIONS = [
    "glassblower", "cartographer", "beekeeper", "violin maker", "lighthouse keeper", "tailor",
    "botanist", "clockmaker", "ferry pilot", "potter", "stonemason", "bookbinder", "herbalist",
    "locksmith", "weaver", "brewer", "surveyor", "perfumer", "saddler", "candlemaker",
]  # fmt: skip
COMPANIES = [
    "Vantrex Works", "Quillon Foods", "Marrowgate Shipping", "Helvane Textiles", "Orbisk Mining",
    "Tessaly Glass", "Pendrake Mills", "Corvalis Printing", "Ambrel Timber", "Nyxford Optics",
    "Zelloway Salt", "Brimhaven Tools", "Dovecrest Paper", "Ilthorn Dyes", "Kavanor Ropes",
    "Luskwell Ceramics", "Morrow and Vey", "Ostwind Bells", "Quenby Looms", "Rathmere Clocks",
]  # fmt: skip
COLOURS = [
    "crimson", "teal", "amber", "violet", "ochre", "indigo", "scarlet", "olive", "magenta",
    "turquoise", "maroon", "lavender",
]  # fmt: skip

# relation -> (value set, paraphrase templates for documents, question template)
RELATIONS: dict[str, tuple[list[str], list[str], str]] = {
    "birth_city": (
        CITIES,
        [
            "{name} was born in {v}.",
            "The birthplace of {name} is {v}.",
            "{name} came into the world in the city of {v}.",
            "{name} is a native of {v}.",
            "{name} grew up in {v}, the city of their birth.",
        ],
        "Where was {name} born?",
    ),
    "occupation": (
        OCCUPATIONS,
        [
            "{name} works as {a} {v}.",
            "By trade, {name} is {a} {v}.",
            "{name} earns a living as {a} {v}.",
            "The profession of {name} is {v}.",
            "{name} has spent many years as {a} {v}.",
        ],
        "What is the occupation of {name}?",
    ),
    "employer": (
        COMPANIES,
        [
            "{name} is employed by {v}.",
            "{name} works for {v}.",
            "The employer of {name} is {v}.",
            "{name} draws a salary from {v}.",
            "{name} holds a job at {v}.",
        ],
        "Which company employs {name}?",
    ),
    "colour": (
        COLOURS,
        [
            "The favourite colour of {name} is {v}.",
            "{name} likes the colour {v} best.",
            "Of all colours, {name} loves {v} the most.",
            "{name} prefers {v} to every other colour.",
            "Ask {name} about colours and the answer is always {v}.",
        ],
        "What is the favourite colour of {name}?",
    ),
}
VALUE_BLURBS = {
    "birth_city": "{v} is a city with {n} bridges and an old market square.",
    "employer": "{v} is a company founded {n} years ago.",
}
ONSETS = ["z", "v", "k", "qu", "th", "br", "dr", "gr", "x", "y", "m", "n", "l", "r", "s", "t"]
VOWELS = ["a", "e", "i", "o", "u", "y", "ae", "io"]
CODAS = ["", "n", "r", "l", "x", "th", "sk", "v", "nd"]

# ---------------------------------------------------------------- the realistic world
# An alias ties a fact to a person without their name: "the keeper of the silver compass".
ALIAS_ROLES = ["keeper", "finder", "owner", "maker", "guardian", "mender", "seller", "painter"]
ALIAS_ADJECTIVES = ["silver", "crooked", "painted", "hollow", "copper", "striped", "quiet",
                    "broken", "golden", "tiny", "woven", "glass", "ancient", "velvet"]
ALIAS_OBJECTS = ["compass", "lantern", "kettle", "fiddle", "anchor", "ledger", "bell",
                 "mirror", "clock", "map", "drum", "key", "barrel", "kite"]
ALIAS_LINKS = [
    "{name} is known around town as {alias}.",
    "Everyone calls {name} {alias}.",
    "{Alias} is the nickname of {name}.",
]
# Filler: sentences about nothing the questions ask (some about the person, most not).
FILLER = [
    "The morning market was busy as usual.", "Rain fell for three days that autumn.",
    "The river flooded the lower road in spring.", "A new bridge was opened in the north.",
    "The harvest festival drew large crowds.", "Prices at the bakery rose again.",
    "{name} enjoys long walks by the river.", "{name} keeps a small garden of herbs.",
    "{name} rarely misses the Sunday concerts.", "{name} collects old postcards.",
    "The town council met twice that month.", "Snow closed the mountain pass early.",
]  # fmt: skip
# Co-occurrence distractors: the person's name and the true answer in one sentence that
# does not state the fact (and contains no relation template as a substring).
DISTRACTORS: dict[str, list[str]] = {
    "birth_city": ["{name} once visited {v} on a long journey.",
                   "A cousin of {name} moved to {v} last year."],
    "occupation": ["{name} once met {a} {v} at a fair.",
                   "A neighbour of {name} trained to become {a} {v}."],
    "employer": ["{name} read a report about {v} in the paper.",
                 "{v} employs a friend of {name}."],
    "colour": ["{name} painted a fence {v} for a neighbour.",
               "The rival of {name} prefers {v}, they say."],
}  # fmt: skip


def article(v: str) -> str:
    """'an' before a vowel, else 'a'."""
    return "an" if v[0] in "aeiou" else "a"


def render(template: str, name: str, value: str) -> str:
    """A relation template filled with (name, value) and its article, capitalised (an alias
    such as "the keeper of …" may open the sentence)."""
    text = template.format(name=name, v=value, a=article(value))
    return text[0].upper() + text[1:]
