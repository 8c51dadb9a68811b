"""Writes the tiny CPU config's corpus and tokenizer (deterministic; output is committed).

The corpus is generated English: short stories about animals and small arithmetic
facts, so a tiny model can show within a minute that its loss falls on real words.

  python configs/data/make_tiny_corpus.py
"""

import os
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
ANIMALS = "fox dog cat owl horse rabbit goat duck mouse bear".split()
COLOURS = "red brown grey white black small old young quiet happy".split()
PLACES = "river hill barn forest field garden road village lake meadow".split()
VERBS = "sees follows greets helps watches chases finds meets".split()


def story(rng: random.Random) -> str:
    a, b = rng.sample(ANIMALS, 2)
    ca, cb = rng.choice(COLOURS), rng.choice(COLOURS)
    place = rng.choice(PLACES)
    lines = [
        f"The {ca} {a} lives near the {place}.",
        f"One morning the {a} {rng.choice(VERBS)} a {cb} {b}.",
        f"The {b} says hello to the {a}, and they walk to the {rng.choice(PLACES)} together.",
    ]
    x, y = rng.randrange(7), rng.randrange(6)
    lines.append(
        f"The {a} has {NUMBERS[x]} apples and the {b} has {NUMBERS[y]}, "
        f"so together they have {NUMBERS[x + y]} apples."
    )
    lines.append(f"At night the {a} goes back to the {place} and sleeps.")
    return " ".join(lines)


def main():
    rng = random.Random(0)
    docs = [story(rng) for _ in range(1500)]
    corpus = os.path.join(HERE, "tiny_corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n\n".join(docs) + "\n")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=256, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False
    )
    tok.train([corpus], trainer)
    tok.save(os.path.join(HERE, "tokenizer.json"))
    with open(os.path.join(HERE, "tokenizer_config.json"), "w") as f:
        f.write(
            '{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", '
            '"add_bos_token": true}\n'
        )


if __name__ == "__main__":
    main()
