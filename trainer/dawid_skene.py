"""Dawid-Skene: how often each annotator gives the true answer, estimated by EM from the
votes alone, without knowing any true answer (Dawid & Skene 1979).

    fit = dawid_skene_codes(item, annotator, label, n_annotators)   # integer codes
    fit.competence[j]      P(annotator j's label is the true class)
    fit.chance[j]          the same for a guesser with j's label frequencies
    fit.posteriors[i]      P(true class of item i = a, b, tie)

`trainer.annotator_quality.dawid_skene` is the entry point over votes (a pyarrow Table
or a list of records); this module is the EM on integer codes, numpy only.

The model: each item (a pair) has one true class t (a, b or tie); annotator j labels it
l with probability theta[j, t, l], independently of the others. EM alternates the
posteriors of the true classes given the confusion matrices (E) and the confusion
matrices and class prior given the posteriors (M). It starts from the soft majority
vote, as Dawid and Skene did: the likelihood cannot tell the truth from its mirror
image (every label flipped, every annotator's confusion matrix flipped with it), and
starting from the majority picks the mirror the majority agrees with. So EM recovers
competences when the reliable annotators are the majority of the overlapping votes;
a team whose overlapping votes are mostly adversarial is estimated upside down, as
it would be by any method that has no gold answers.

Only items labelled by at least two annotators enter: an item only one annotator saw
says nothing about that annotator (its posterior would just echo their own label and
inflate their competence).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_CLASSES = 3  # a, b, tie (both-bad is read as tie: see annotator_quality.CLASS_OF)

# Dirichlet pseudo-counts added to every cell of a confusion-matrix row (and to the
# class prior). They keep every probability above 0 (a log of 0 would make one
# disagreement infinitely damning) and pull a row with few votes towards uniform; a row
# with many votes is hardly moved. A class nobody uses (often tie) keeps a near-uniform
# row, which is harmless: its prior probability is near 0, so it hardly counts.
PSEUDO_COUNT = 0.5


@dataclass
class CodesFit:
    """The EM's result on integer codes (see the module docstring)."""

    competence: np.ndarray  # [annotators], NaN for an annotator with no overlapping votes
    chance: np.ndarray  # [annotators], NaN likewise
    confusion: np.ndarray  # [annotators, true class, label]
    class_prior: np.ndarray  # [classes]
    items: np.ndarray  # item codes of the overlapping items, sorted
    posteriors: np.ndarray  # [len(items), classes]
    overlap_votes: np.ndarray  # [annotators]: votes of each on overlapping items
    iterations: int
    converged: bool
    log_likelihood: float


def dawid_skene_codes(
    item: np.ndarray,
    annotator: np.ndarray,
    label: np.ndarray,
    n_annotators: int,
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> CodesFit:
    """EM over votes given as integer codes: item, annotator (0..n_annotators-1) and
    label (0..N_CLASSES-1) per vote, each annotator at most once per item (the caller
    keeps their latest vote). `tol`: stop when no posterior moves by more than this."""
    item, annotator, label = (np.asarray(x, dtype=np.int64) for x in (item, annotator, label))
    # Keep the items that at least two different annotators labelled.
    distinct = np.unique(np.stack([item, annotator], axis=1), axis=0) if len(item) else np.zeros((0, 2))
    per_item = np.bincount(distinct[:, 0].astype(np.int64), minlength=int(item.max(initial=-1)) + 1)
    keep = per_item[item] >= 2 if len(item) else np.zeros(0, dtype=bool)
    item, annotator, label = item[keep], annotator[keep], label[keep]
    items, item_row = np.unique(item, return_inverse=True)
    n_items, K = len(items), N_CLASSES
    overlap_votes = np.bincount(annotator, minlength=n_annotators)

    # Start: each item's soft majority vote.
    T = np.bincount(item_row * K + label, minlength=n_items * K).reshape(n_items, K).astype(float)
    T /= np.maximum(T.sum(axis=1, keepdims=True), 1.0)
    # Sums over votes are bincounts (one per class), not np.add.at: many times faster.
    cell = annotator * K + label  # (annotator, label) of each vote
    theta = np.full((n_annotators, K, K), 1.0 / K)
    prior = np.full(K, 1.0 / K)
    converged, iterations, log_lik = n_items == 0, 0, 0.0
    while iterations < max_iter:
        iterations += 1
        # M step: class prior and confusion rows from the current posteriors.
        prior = (T.sum(axis=0) + PSEUDO_COUNT) / (n_items + K * PSEUDO_COUNT)
        # counts[j, t, l] = pseudo-count + sum of T[item, t] over the votes (item, j, l)
        T_votes = T[item_row]
        counts = np.stack(
            [np.bincount(cell, T_votes[:, t], n_annotators * K).reshape(n_annotators, K) for t in range(K)],
            axis=1,
        )
        counts = counts + PSEUDO_COUNT  # (a float array even when there are no votes)
        theta = counts / counts.sum(axis=2, keepdims=True)
        # E step: log posterior of each item's class = log prior + sum of its votes' logs.
        log_theta = np.log(theta)
        log_T = np.stack(
            [np.bincount(item_row, log_theta[annotator, t, label], n_items) for t in range(K)], axis=1
        ) + np.log(prior)
        top = log_T.max(axis=1, keepdims=True)
        new_T = np.exp(log_T - top)
        norm = new_T.sum(axis=1, keepdims=True)
        log_lik = float((np.log(norm) + top).sum())
        new_T /= norm
        delta = float(np.abs(new_T - T).max(initial=0.0))
        T = new_T
        if delta < tol:
            converged = True
            break

    diag = np.einsum("jkk->jk", theta)  # P(label = t | true class t), per annotator
    competence = diag @ prior
    # A guesser with j's label frequencies q (q = prior @ theta_j) is right with
    # probability sum_t prior_t q_t: the chance level a competence must be judged against.
    chance = np.einsum("k,jk->j", prior, np.einsum("t,jtl->jl", prior, theta))
    unseen = overlap_votes == 0
    competence[unseen], chance[unseen] = np.nan, np.nan
    return CodesFit(
        competence=competence,
        chance=chance,
        confusion=theta,
        class_prior=prior,
        items=items,
        posteriors=T,
        overlap_votes=overlap_votes,
        iterations=iterations,
        converged=converged,
        log_likelihood=log_lik,
    )
