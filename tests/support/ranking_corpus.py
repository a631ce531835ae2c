"""A deterministic English ranking corpus: queries, each with documents of graded relevance.

For tests that compare two rankings of the same model (int8 against float32): each query
names a topic, and its documents range from on-topic (the topic and its words), through
near-topic (its words only), to off-topic (another topic), so a real model's scores spread
out as they do on real retrieval data. Built from templates, no download.
"""

from __future__ import annotations

import random

# (topic, three words that belong with it)
TOPICS = (
    ("sourdough bread", "flour", "starter", "oven"),
    ("espresso coffee", "beans", "grinder", "crema"),
    ("vegetable garden", "tomatoes", "compost", "watering"),
    ("marathon training", "running", "mileage", "recovery"),
    ("electric cars", "battery", "charging", "range"),
    ("solar panels", "roof", "inverter", "sunlight"),
    ("home mortgage", "interest", "loan", "down payment"),
    ("job interview", "resume", "questions", "salary"),
    ("house cats", "kittens", "litter", "whiskers"),
    ("dog training", "puppy", "leash", "treats"),
    ("guitar lessons", "chords", "strings", "practice"),
    ("piano music", "keys", "scales", "sheet music"),
    ("mountain hiking", "trail", "boots", "summit"),
    ("ocean sailing", "boat", "wind", "harbor"),
    ("chess strategy", "opening", "pawns", "checkmate"),
    ("python programming", "functions", "modules", "debugging"),
    ("database indexes", "queries", "tables", "performance"),
    ("network security", "firewall", "passwords", "encryption"),
    ("cloud computing", "servers", "storage", "scaling"),
    ("machine learning", "training data", "models", "accuracy"),
    ("climate change", "emissions", "temperature", "carbon"),
    ("rain forests", "trees", "species", "rainfall"),
    ("volcano eruptions", "lava", "ash", "magma"),
    ("earthquake safety", "shaking", "faults", "buildings"),
    ("space telescopes", "galaxies", "mirrors", "orbit"),
    ("mars exploration", "rover", "red planet", "dust"),
    ("ancient rome", "emperors", "legions", "senate"),
    ("world war history", "battles", "soldiers", "treaties"),
    ("french cooking", "butter", "sauces", "wine"),
    ("japanese sushi", "rice", "fish", "seaweed"),
    ("healthy sleep", "bedtime", "insomnia", "dreams"),
    ("heart health", "blood pressure", "cholesterol", "exercise"),
    ("vaccines", "immunity", "doses", "viruses"),
    ("dental care", "teeth", "brushing", "cavities"),
    ("stock market", "shares", "investors", "dividends"),
    ("personal budget", "savings", "expenses", "income"),
    ("wedding planning", "guests", "venue", "flowers"),
    ("soccer tactics", "goals", "midfield", "defense"),
    ("basketball", "dribbling", "hoop", "rebounds"),
    ("tennis serve", "racket", "court", "spin"),
    ("photography", "camera", "lens", "exposure"),
    ("oil painting", "canvas", "brushes", "colors"),
    ("learning spanish", "grammar", "vocabulary", "verbs"),
    ("writing novels", "characters", "plot", "chapters"),
    ("bird watching", "binoculars", "feathers", "migration"),
    ("bee keeping", "hives", "honey", "queen"),
    ("wine tasting", "grapes", "vineyard", "aroma"),
    ("car repair", "engine", "brakes", "tires"),
    ("bicycle maintenance", "chain", "gears", "pedals"),
    ("home plumbing", "pipes", "leaks", "faucet"),
)

QUERY_TEMPLATES = (
    "how do I get started with {topic}",
    "what should a beginner know about {topic}",
    "common mistakes in {topic}",
    "{topic} tips and advice",
)

ON_TOPIC = (
    "A practical guide to {topic}: begin with the {a}, then take care of the {b}.",
    "Most people new to {topic} underestimate how much the {c} matters.",
    "{Topic} gets easier once you understand the {a} and the {c}.",
    "Experts in {topic} say the {b} is where beginners go wrong.",
    "Here is what I learned after a year of {topic}, from the {a} to the {b}.",
    "The basics of {topic} explained simply.",
)
NEAR_TOPIC = (
    "Notes on {a} and {b}, without much detail.",
    "Everything about the {c}, in short.",
    "A list of questions people ask about {b}.",
    "Why the {a} matters more than you think.",
)
OFF_TOPIC = (
    "A practical guide to {topic}: begin with the {a}, then take care of the {b}.",
    "Most people new to {topic} underestimate how much the {c} matters.",
    "Notes on {a} and {b}, without much detail.",
    "The history of {topic} in one page.",
)


def _fill(template: str, topic: tuple[str, str, str, str]) -> str:
    name, a, b, c = topic
    return template.format(topic=name, Topic=name.capitalize(), a=a, b=b, c=c)


def ranking_corpus(queries: int = 50, documents: int = 32, seed: int = 7) -> list[tuple[str, list[str]]]:
    """`queries` (query, documents) pairs: 8 on-topic, 8 near-topic and the rest off-topic, shuffled."""
    rng = random.Random(seed)
    corpus = []
    for i in range(queries):
        topic = TOPICS[i % len(TOPICS)]
        query = _fill(QUERY_TEMPLATES[i % len(QUERY_TEMPLATES)], topic)
        docs = [_fill(rng.choice(ON_TOPIC), topic) + f" ({n})" for n in range(8)]
        docs += [_fill(rng.choice(NEAR_TOPIC), topic) for _ in range(8)]
        others = [t for t in TOPICS if t is not topic]
        docs += [_fill(rng.choice(OFF_TOPIC), rng.choice(others)) for _ in range(documents - 16)]
        rng.shuffle(docs)
        corpus.append((query, docs))
    return corpus
