"""Stage 1, ``distillery-trainer collect``: the teacher's answers (and top-k logprobs) for every prompt.

One module per concern: :mod:`.prompts` (sources, ids, split, shard slice), :mod:`.teacher` (the request
and the OpenAI response shape), :mod:`.verdict` (what a failure means; when and how often to retry is
:mod:`distillery_trainer.retry`'s), :mod:`.ratelimit`, :mod:`.cache`, :mod:`.store` (the shard's files and
resuming), :mod:`.collector` (the async engine), :mod:`.progress`, :mod:`.identity` (the teacher's
tokenizer), :mod:`.stage` (one shard end to end), :mod:`.command` (the CLI).
Output format: see :mod:`distillery_trainer.layout` and :mod:`distillery_trainer.data.topk`.
"""
