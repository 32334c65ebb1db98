"""How a set's probabilities are told (predict.py's table and verdict, the figures of predict.py
and visualize.py alike): the odd one out declared only when it is clear, a model at chance
recognised, and percentages with the decimals it takes to tell them apart.
"""

import numpy as np

# The odd one out is declared only when it is this many times as likely as the next image: a model
# that cannot tell gives every image about the same probability, and the top one is then chance.
CLEAR_RATIO = 1.5


def is_clear(probs):
    """Whether the most likely image is CLEAR_RATIO times as likely as the next one."""
    top, runner_up = np.sort(probs)[::-1][:2]
    return bool(top >= CLEAR_RATIO * runner_up)


def at_chance(probs):
    """Whether the model cannot tell the images apart: the most likely is not CLEAR_RATIO times as
    likely as the least likely, so every image lies near 1/N. Never clear (is_clear) then."""
    return bool(np.max(probs) < CLEAR_RATIO * np.min(probs))


def probability_texts(probs):
    """probs as text with the fewest decimals, 2 to 6, at which different probabilities read
    differently, so that the printed numbers rank the images as the model does."""
    distinct = len(set(np.asarray(probs).tolist()))
    for decimals in range(2, 7):
        texts = [f"{p:.{decimals}f}" for p in probs]
        if len(set(texts)) == distinct:
            break
    return texts


def percent_texts(probs):
    """probs as percentages, "12.34%", with the decimals that tell them apart (probability_texts):
    the unit of every probability shown, in the figures and in predict.py's table alike."""
    return [f"{t}%" for t in probability_texts(100 * np.asarray(probs, dtype=np.float64))]
