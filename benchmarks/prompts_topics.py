"""Prompts of the SmolLM2 comparison (benchmarks/smollm_comparison.py): templates × everyday topics.

Three disjoint topic lists: training (the reference samples the methods train on), KL (the held-out
prompts on which KLBudgetCallback estimates KL while training) and evaluation (the held-out prompts
of the win rates). No topic appears in two lists, so neither the KL estimate nor the evaluation
sees a training topic. Every template asks for one short sentence, so that few completions reach
the token cap (about 3% of SmolLM2-135M-Instruct's at 48 new tokens, in a timing run).

Prompts are ordered template-major (every topic under the first template, then every topic under
the second, ...), so the first ``len(topics) · j`` prompts cover every topic with j templates.
"""

from __future__ import annotations

TEMPLATES = [
    "Tell me about {} in one short sentence.",
    "What do you think of {}? Answer in one short sentence.",
    "Describe {} in a single short sentence.",
    "In one short sentence, how would you feel about {}?",
    "Give me a one-sentence opinion of {}.",
    "Say something brief about {}, in one sentence.",
    "What comes to mind when you think of {}? One short sentence, please.",
    "Sum up {} in one short sentence.",
]

TOPICS_TRAIN = [
    "green tea", "a picnic", "a rainy day", "your neighbour", "a long train ride", "homework", "a job interview",
    "a birthday party", "running in the morning", "a houseplant", "learning guitar", "a power cut", "Monday mornings",
    "a crowded bus", "baking bread", "a lost umbrella", "a new phone", "the dentist", "a board game night",
    "a traffic jam", "cooking soup", "a museum", "moving house", "the weather", "a school trip", "a library",
    "an old friend", "a noisy street", "waiting in line", "a camping trip", "a dog walk", "a snowstorm",
    "a farmers market", "a sunrise", "doing the laundry", "a broken laptop", "a family dinner", "a yoga class",
    "a hot summer day", "a lost key", "a new haircut", "a spelling test", "a village fair", "a slow internet connection",
    "a paper map", "a walk in the woods", "a sore throat", "a surprise visit",
    # 80 more (issue 25: ≥ 1024 training prompts = 128 topics × 8 templates)
    "a fountain pen", "an early flight", "a bowl of noodles", "a flea market", "a jigsaw puzzle", "a school bus",
    "a thunder clap", "a window seat", "a cup of hot chocolate", "a marathon", "a new notebook", "a bus stop",
    "a leaking tap", "an open-air cinema", "a music lesson", "a sunflower field", "a late-night snack",
    "a group project", "a wool scarf", "a quiet beach", "a car wash", "a village church", "an online class",
    "a tomato plant", "a foggy morning", "a bookshelf", "a roller coaster", "a cat nap", "an electric scooter",
    "a hot bath", "a tax form", "a picnic blanket", "a tennis match", "a small apartment", "a street festival",
    "a fruit salad", "a night shift", "a charity run", "a vintage car", "a garden shed", "a bike lane",
    "a pottery class", "a rainy weekend", "a video call", "a science museum", "a packed lunch", "a clean desk",
    "a first day at work", "a birthday cake", "a mountain hike", "a loud alarm clock", "a pair of sunglasses",
    "a fishing trip", "a quiz night", "a rainbow", "a library card", "a coffee shop queue", "a forgotten password",
    "a sleepover", "a dance class", "a cardboard box", "a city tour", "a walk by the canal", "a homemade pizza",
    "a winter coat", "a neighbourhood barbecue", "a laundry basket", "a football scarf", "a garden party",
    "a power bank", "a bedtime story", "a rainy commute", "a bird feeder", "a snow day", "a spare room",
    "a karaoke night", "a flower shop", "a long weekend", "a broken umbrella", "a movie marathon",
]

TOPICS_KL = [
    "a wooden bench", "an empty parking lot", "a second-hand bookshop", "a late bus", "a quiet morning",
    "a new neighbour's cat", "a muddy football pitch", "a cheap hotel", "an old radio", "a shopping list",
    "a tram ride", "a hiking boot",
]

TOPICS_EVAL = [
    "a bicycle", "the ocean", "a city park", "a cup of coffee", "a delayed flight", "a thunderstorm", "a garden",
    "a football match", "exams", "a small cafe", "winter evenings", "a busy kitchen", "a mountain lake",
    "a street musician", "a long meeting", "a pet goldfish", "an autumn forest", "a night market", "a cold shower",
    "a road trip", "a sandwich", "a science fair", "a flat tyre", "an art class", "a swimming pool",
    "a grocery store", "a concert", "a desert", "a phone call with a friend", "a fireplace", "a playground",
    "public transport", "a hospital waiting room", "a vegetable soup", "a lighthouse", "a school reunion",
    "a strawberry", "a city at night", "a rooftop garden", "a chess game", "an old photograph", "a wedding",
    "a ferry crossing", "a power nap", "a bakery", "a long queue at the post office", "a snowman", "a podcast",
    "a crossword puzzle", "a river", "a thrift store", "a new pair of shoes", "a cooking show", "a barbecue",
    "a train station", "a spring morning", "a hammock", "a zoo", "a lemonade stand", "a kite",
    "an ice cream truck", "a windy beach", "a mobile game", "a candle",
]

assert not (set(TOPICS_TRAIN) & set(TOPICS_KL) or set(TOPICS_TRAIN) & set(TOPICS_EVAL)
            or set(TOPICS_KL) & set(TOPICS_EVAL)), "topic lists must be disjoint"
assert len(set(TOPICS_EVAL)) == len(TOPICS_EVAL) >= 64
assert len(set(TOPICS_TRAIN)) == len(TOPICS_TRAIN) >= 128


def make_prompts(topics: list[str], count: int, templates: list[str] = TEMPLATES) -> list[str]:
    """The first ``count`` prompts of ``topics`` × ``templates``, template-major."""
    everything = [template.format(topic) for template in templates for topic in topics]
    if count > len(everything):
        raise ValueError(f"asked for {count} prompts, but {len(topics)} topics × {len(templates)} templates make "
                         f"only {len(everything)}")
    return everything[:count]
