"""The segment wing: image shards at SRC -> one Parquet row per image at DST.

    sources (list shards) -> shards / tar / parquet (records) -> decode -> predictor
    -> rows (encode, assemble) -> schema -> commits          job: the Ray Data plan over them
    output / show: reading, scoring and picturing what a job wrote

``from pipeline.segment import run_segment`` is the Python door to the job (DESIGN contract).
"""

from pipeline.segment.job import SegmentSummary, run_segment

__all__ = ["SegmentSummary", "run_segment"]
