"""Stage 4: the student measured against the teacher — quality retention, latency, cost, the gate.

``distillery-trainer evaluate --config FILE`` (:mod:`.cli`) runs :func:`.run.evaluate`; the pieces are
pure where they can be (:mod:`.metrics`, :mod:`.stats`, :mod:`.judge` parsing, :mod:`.quality`) and
do their HTTP through one small client (:mod:`.client`).
"""
