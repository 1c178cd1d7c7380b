"""The vectorised machinery behind score.cons_at_k: one problem's majority vote averaged over many
subsets of its responses at once, as numpy arrays [draws, groups]. score.py groups the answers,
orders each forking token's responses and says how many each token gives; this file only lists or
draws the subsets and counts their votes. Nothing here knows what a forking token or an answer is.
"""
import itertools
import math

import numpy as np

CONS_EXACT = 5000  # every subset the tokens can give is averaged when there are at most this many
CONS_DRAWS = 1000  # else this many random draws (standard error <= 0.016 per problem)


def mean_vote(groups, correct, give, draws=CONS_DRAWS):
    """The mean, in [0, 1], of the majority vote over subsets that take give[t] of token t's
    responses, for every token t at once. groups[t]: [responses of t] vote-group labels 0, 1, ...
    (-1: no answer, never votes); correct[t]: [responses of t] bools; give[t] <= len(groups[t]).
    A vote is worth the largest group's share of correct responses, averaged over tied largest
    groups, 0 when nobody answers (score.majority_vote). Averages every combination when there are
    at most CONS_EXACT, else `draws` uniform draws without replacement from a generator of seed 0,
    so that the result depends only on the order of each token's responses as given."""
    subsets = [math.comb(len(g), n) for g, n in zip(groups, give)]
    exact = math.prod(subsets) <= CONS_EXACT
    draws = math.prod(subsets) if exact else draws
    rng = np.random.default_rng(0)
    width = max([0, *(label for g in groups for label in g)]) + 1
    votes = np.zeros((draws, width))  # [draws, groups]: responses
    right = np.zeros_like(votes)  # [draws, groups]: of them graded correct
    for position, (labels, grades, n) in enumerate(zip(groups, correct, give)):
        if exact:  # draw d takes the subsets numbered by unravelling d over the subset counts
            choices = np.array(list(itertools.combinations(range(len(labels)), n)), dtype=int)
            choices = choices.reshape(subsets[position], n)  # [subsets of this token, n]
            picks = choices[np.unravel_index(np.arange(draws), subsets)[position]]
        else:
            picks = rng.random((draws, len(labels))).argsort(axis=1)[:, :n]
        group = np.array(labels, dtype=int)[picks]  # [draws, n]
        grade = np.array(grades, dtype=float)[picks]
        rows = np.broadcast_to(np.arange(draws)[:, None], picks.shape)
        voting = group >= 0
        np.add.at(votes, (rows[voting], group[voting]), 1)
        np.add.at(right, (rows[voting], group[voting]), grade[voting])
    top = votes.max(axis=1, keepdims=True)
    tied = (votes == top) & (top > 0)  # the largest groups; none when no response has an answer
    worth = np.where(tied, right / np.maximum(votes, 1), 0).sum(axis=1)
    return float((worth / np.maximum(tied.sum(axis=1), 1)).mean())
