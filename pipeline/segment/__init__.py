"""The segment wing: image shards at SRC -> one Parquet row per image at DST.

    sources (list shards) -> shards / tar / parquet (records) -> decode -> predictor
    -> rows (encode, assemble) -> schema -> commits          job: the Ray Data plan over them
    output / show: reading, scoring and picturing what a job wrote

``from pipeline.segment import run_segment`` is the Python door to the job (DESIGN contract).
"""

from __future__ import annotations

__all__ = ["SegmentSummary", "run_segment"]


def __getattr__(name: str):
    # Lazy, so that a worker importing one stage (decode, commits...) does not load Ray Data
    # and torch with the job.
    if name in __all__:
        from pipeline.segment import job

        return getattr(job, name)
    raise AttributeError(f"module 'pipeline.segment' has no attribute {name!r}")
