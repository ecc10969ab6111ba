"""Each generation's ROUGE F-measures against its reference, with Google's `rouge-score` package (its Porter stemmer
on), over several processes for many rows. Apart from score.py so that those processes import rouge-score alone,
not the job's torch and transformers (they start in a fraction of a second).
"""

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

METRICS = ("rouge1", "rouge2", "rougeL")
ROWS_PER_PROCESS = 2000  # rouge-score takes ~0.3-1 ms a row: fewer rows than this per process are not worth one


def rouge_f1(generations: list[str], references: list[str | None], processes: int = 1) -> dict[str, list[float | None]]:
    """Each generation's F-measure against its reference, per metric (METRICS), row for row; None where the row has
    no reference. rouge-score is pure Python: `processes` score slices of the rows side by side (fork server
    processes: safe beside CUDA)."""
    processes = max(1, min(processes, len(generations) // ROWS_PER_PROCESS))
    if processes == 1:
        return _rouge_f1(generations, references)
    size = -(-len(generations) // (4 * processes))  # several slices each, so that one slow slice does not hold all
    starts = range(0, len(generations), size)
    with ProcessPoolExecutor(processes, mp_context=mp.get_context("forkserver")) as pool:
        slices = list(pool.map(_rouge_f1, [generations[i:i + size] for i in starts],
                               [references[i:i + size] for i in starts]))
    return {metric: [score for part in slices for score in part[metric]] for metric in METRICS}


def _rouge_f1(generations: list[str], references: list[str | None]) -> dict[str, list[float | None]]:
    from rouge_score.rouge_scorer import RougeScorer  # with nltk, ~0.3 s: imported by jobs that score only
    from rouge_score.tokenizers import DefaultTokenizer

    # The tokenizer RougeScorer makes itself (use_stemmer=True), given: made by RougeScorer it logs a line per call.
    scorer = RougeScorer(list(METRICS), use_stemmer=True, tokenizer=DefaultTokenizer(use_stemmer=True))
    scores: dict[str, list[float | None]] = {metric: [] for metric in METRICS}
    for generation, reference in zip(generations, references, strict=True):
        score = scorer.score(reference, generation or "") if reference and reference.strip() else None
        for metric in METRICS:
            scores[metric].append(None if score is None else score[metric].fmeasure)
    return scores
